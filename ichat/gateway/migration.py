"""Stream migration: a generation that outlives the worker serving it (pure, no I/O).

When a model opts in (``routing.migration.models``), the proxy relays its streamed chat and
completion answers through a :class:`StreamSplicer`. The splicer forwards whole SSE events
only (an event cut by a dying worker is never half-sent), remembers the text the client has
seen, and, when the stream breaks, builds the request that continues it on another replica:

* chat: the conversation plus the text so far as a final, partial assistant message, with
  ``continue_final_message: true`` and ``add_generation_prompt: false`` (vLLM's serving
  layer renders that message without its end-of-turn, so the model carries on writing it);
* completions: the prompt followed by the text so far.

``max_tokens`` (or ``max_completion_tokens``) is lowered by the tokens already sent. The
continuation's events are rewritten to carry the first answer's ``id``, ``created`` and
``model``; its opening role-only chunk is dropped; the client sees one ``[DONE]``; usage is
summed (the original prompt's tokens, plus every completion token sent by every replica).

Exact token counts come from the engine: the upstream request asks for
``stream_options: {include_usage: true, continuous_usage_stats: true}`` (vLLM), so every
chunk carries the running usage; the splicer strips what the client did not ask for. From an
engine that sends no running usage, each chunk with text counts as one token.

What it will not migrate (the stream then ends with the SSE error event, as without
migration): ``n`` > 1, ``best_of``, ``echo``, a completions prompt that is not one string,
a model whose answer is not a stream of OpenAI chunks, and any break after ``[DONE]``.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
#: an SSE event (``data: ...``) bigger than this is not OpenAI chunk traffic: stop following
MAX_EVENT_BYTES = 4 * 2**20


def migratable(route: str, body: dict[str, Any]) -> bool:
    """Whether a streamed request on ``route`` can be continued on another replica."""
    if route not in (CHAT_ROUTE, COMPLETIONS_ROUTE) or body.get("stream") is not True:
        return False
    if body.get("n", 1) not in (1, None) or body.get("best_of") not in (None, 1):
        return False
    if route == CHAT_ROUTE:
        messages = body.get("messages")
        return isinstance(messages, list) and bool(messages)
    return isinstance(body.get("prompt"), str) and not body.get("echo")


class StreamSplicer:
    """Follows one streamed answer across the replicas that produce it."""

    def __init__(self, route: str, body: dict[str, Any]) -> None:
        self.route = route
        self.chat = route == CHAT_ROUTE
        self.original = body
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        self.client_usage = bool(options.get("include_usage"))
        self.client_continuous = bool(options.get("continuous_usage_stats"))
        #: the text the client has received (choice 0)
        self.text = ""
        #: the first answer's identity, kept for every later chunk
        self.identity: dict[str, Any] = {}
        self.prompt_tokens: int | None = None
        #: completion tokens of replicas that finished their part (segments before this one)
        self.tokens_before = 0
        #: completion tokens the current replica has sent (running usage of its last event)
        self.segment_tokens = 0
        self.segments = 1
        self.done = False
        self.finished = False  # a finish_reason was relayed
        self.broken_format = False
        #: whitespace the client has and the next replica was not shown (see continuation_body)
        self.skip = ""
        self._buffer = b""

    # -- requests ----------------------------------------------------------------------------

    def upstream_body(self) -> bytes:
        """The first replica's request: the client's, asking for running usage."""
        return orjson.dumps(self._with_usage(dict(self.original)))

    def _with_usage(self, body: dict[str, Any]) -> dict[str, Any]:
        options = dict(body.get("stream_options") or {})
        options.update(include_usage=True, continuous_usage_stats=True)
        body["stream_options"] = options
        return body

    def sent_tokens(self) -> int:
        return self.tokens_before + self.segment_tokens

    def can_continue(self) -> bool:
        """Whether the answer is unfinished and could go on elsewhere."""
        return not (self.done or self.finished or self.broken_format)

    def continuation_body(self) -> bytes | None:
        """The next replica's request, or None when the stream cannot be continued."""
        if not self.can_continue():
            return None
        body = copy.deepcopy(self.original)
        sent = self.sent_tokens()
        for key in ("max_tokens", "max_completion_tokens"):
            limit = body.get(key)
            if isinstance(limit, int):
                if limit - sent <= 0:
                    return None
                body[key] = limit - sent
        if self.chat:
            # Chat templates commonly trim a message's trailing whitespace, and transformers then
            # renders the partial message without it (SmolLM2's does): send the text without it,
            # and drop it from the front of what the next replica writes, which writes it again.
            text = self.text.rstrip()
            self.skip = self.text[len(text) :]
            messages = list(body["messages"])
            last = messages[-1] if messages else None
            if body.get("continue_final_message") and isinstance(last, dict) and last.get("role") == "assistant":
                messages[-1] = {**last, "content": str(last.get("content") or "") + text}
            else:
                messages.append({"role": "assistant", "content": text})
            body["messages"] = messages
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        else:
            body["prompt"] = body["prompt"] + self.text
        return orjson.dumps(self._with_usage(body))

    def next_segment(self) -> None:
        """A new replica takes over: its running usage starts from zero."""
        self.tokens_before += self.segment_tokens
        self.segment_tokens = 0
        self.segments += 1
        self._buffer = b""

    # -- events ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Bytes from the current replica -> bytes for the client (whole events only)."""
        buffer = self._buffer + data if self._buffer else data
        out = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            event = self._event(buffer[start:end])
            if event:
                out.append(event)
            start = end + 2
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_EVENT_BYTES:
            self.broken_format = True
            out.append(self._buffer)
            self._buffer = b""
        return b"".join(out)

    def _event(self, raw: bytes) -> bytes:
        raw = raw.strip(b"\r\n")
        if not raw.startswith(b"data:"):
            return raw + b"\n\n" if raw else b""  # a comment or another field: as it came
        payload = raw[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return b"data: [DONE]\n\n"
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.broken_format = True
            return raw + b"\n\n"
        if not isinstance(chunk, dict) or "error" in chunk:
            self.broken_format = not isinstance(chunk, dict)
            return raw + b"\n\n"
        return self._chunk(chunk)

    def _chunk(self, chunk: dict[str, Any]) -> bytes:
        if not self.identity:
            self.identity = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        else:
            chunk.update(self.identity)
        usage = chunk.get("usage")
        counted = False
        if isinstance(usage, dict):
            if self.prompt_tokens is None and isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                self.segment_tokens = usage["completion_tokens"]
                counted = True
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            self.broken_format = True
            return b"data: " + orjson.dumps(chunk) + b"\n\n"
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if self.chat:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if self.skip and isinstance(content, str) and content:
                        content = self._skip_whitespace(content)
                        delta["content"] = content
                    if self.segments > 1:
                        delta.pop("role", None)  # the client had its role chunk already
                        if not content and len(delta) == 0 and not choice.get("finish_reason"):
                            choices = []  # the continuation's opening role-only chunk
                            break
                    if isinstance(content, str):
                        self.text += content
                        if content and not counted:
                            self.segment_tokens += 1  # an engine without running usage: a chunk a token
            else:
                text = choice.get("text")
                if isinstance(text, str):
                    self.text += text
                    if text and not counted:
                        self.segment_tokens += 1
            if choice.get("finish_reason"):
                self.finished = True
        if not choices and chunk.get("choices"):
            return b""  # dropped opening chunk
        if not choices:  # the usage-only chunk that ends a stream with include_usage
            if not self.client_usage:
                return b""
            chunk["usage"] = self._usage()
        elif self.client_continuous and isinstance(usage, dict):
            chunk["usage"] = self._usage()
        else:
            chunk.pop("usage", None)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _skip_whitespace(self, content: str) -> str:
        """Drop from ``content`` the held-back whitespace the next replica writes again."""
        skip = self.skip
        n = 0
        while n < len(skip) and n < len(content) and skip[n] == content[n]:
            n += 1
        if n < len(content) or n == len(skip):
            self.skip = ""  # it wrote something else, or all of it: either way, done skipping
        else:
            self.skip = skip[n:]
        return content[n:]

    def _usage(self) -> dict[str, int]:
        prompt = self.prompt_tokens or 0
        completion = self.sent_tokens()
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
