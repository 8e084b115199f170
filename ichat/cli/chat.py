"""``ichat chat MODEL [PROMPT]``: one streamed answer, or a conversation on stdin.

Tokens are printed as the gateway relays them (``stream: true``, OpenAI's SSE chunks). Without
a prompt, each line read from stdin is a user turn and the conversation is kept, so follow-up
questions see the earlier answers; an empty line or end of input ends it.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

import orjson

from ichat.cli.client import CliError, GatewayClient
from ichat.logs.sse import SSEParser

#: seconds without a byte of the answer before giving up (a cold or busy engine can be slow)
READ_IDLE_S = 300.0


def delta_text(data: str) -> str:
    """Pure: the text of one chat-completion chunk (``""`` for role-only or usage chunks).
    An error event mid-stream raises CliError with the gateway's message."""
    chunk = orjson.loads(data)
    if isinstance(chunk, dict) and "error" in chunk:
        error = chunk["error"]
        raise CliError(f"chat: the answer broke off: {error.get('message') if isinstance(error, dict) else error}")
    parts = []
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            parts.append(content)
    return "".join(parts)


async def stream_answer(
    client: GatewayClient, model: str, messages: list[dict[str, Any]], out: TextIO, options: dict[str, Any]
) -> str:
    """Print the answer as it streams; return it whole."""
    body = {"model": model, "messages": messages, "stream": True, **options}
    parser = SSEParser()
    answer: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body, admin=False, what="chat") as resp:
        while True:
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), READ_IDLE_S)
            except asyncio.TimeoutError as exc:
                raise CliError(f"chat: no answer for {READ_IDLE_S:.0f}s") from exc
            if not chunk:
                break
            for event in parser.feed(chunk):
                if event.data.strip() == "[DONE]":
                    out.write("\n")
                    out.flush()
                    return "".join(answer)
                text = delta_text(event.data)
                if text:
                    answer.append(text)
                    out.write(text)
                    out.flush()
    out.write("\n")
    return "".join(answer)


async def read_line(prompt: str, out: TextIO) -> str | None:
    """One line of stdin without blocking the loop; None at end of input."""
    out.write(prompt)
    out.flush()
    loop = asyncio.get_running_loop()
    # reading stdin blocks: the default executor keeps the event loop free meanwhile
    line = await loop.run_in_executor(None, sys.stdin.readline)
    return line.rstrip("\n") if line else None


async def converse(client: GatewayClient, model: str, out: TextIO, options: dict[str, Any], system: str | None) -> int:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        out.write(f"chatting with {model} through {client.base_url}; an empty line or Ctrl-D ends\n")
    while True:
        line = await read_line("> " if interactive else "", out)
        if line is None or not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        answer = await stream_answer(client, model, messages, out, options)
        messages.append({"role": "assistant", "content": answer})
