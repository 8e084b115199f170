"""The prompt of an OpenAI request as a chain of block hashes: what prefix-aware routing compares.

Pure and bounded: at most ``max_blocks`` blocks are hashed, whatever the body's size. The body
is the one the proxy already parsed; nothing is parsed again.

* chat (``messages``): a canonical rendering, ``role`` ␟ ``content`` ␞ per message, where a
  list of content parts contributes its text parts (and an image's URL). Two conversations
  that share their first messages share a prefix of this rendering, as they share a prefix of
  the engine's chat template; tools and other fields are left out (an approximation: requests
  that differ only there look alike).
* completions (``prompt``): the string, or the token ids (the first prompt of a batch).
* embeddings and the rest (``input``): the same rules as ``prompt``.

Blocks are ``block_chars`` characters (token-id prompts: ``block_chars // 4`` ids, about the
same number of tokens). Only whole blocks are hashed (as engines do), and each block's hash
covers every block before it: ``h[i] = hash((h[i-1], block[i]))``, so equal hashes at depth i
mean equal prefixes (up to a 64-bit collision). Python's ``hash`` is randomised per process,
which is fine for an index that lives in one gateway process.
"""

from __future__ import annotations

from typing import Any

_TEXT_SEED = 0x1C
_TOKEN_SEED = 0x1D
#: characters per token id in the sizing of token-id blocks
CHARS_PER_TOKEN = 4


def prompt_of(body: Any, max_chars: int) -> str | list[int] | None:
    """The prompt a request carries, rendered, cut at ``max_chars`` (token ids: at
    ``max_chars // CHARS_PER_TOKEN`` ids); None when there is none."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list):
        return _render_messages(messages, max_chars)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return prompt[: max_chars // CHARS_PER_TOKEN]
        prompt = first  # a batch: its first prompt (a string, or a list of token ids)
        if isinstance(prompt, list):
            return prompt[: max_chars // CHARS_PER_TOKEN] if prompt and isinstance(prompt[0], int) else None
    if isinstance(prompt, str):
        return prompt[:max_chars]
    return None


def _render_messages(messages: list[Any], max_chars: int) -> str:
    # Bounded by max_chars whatever the body holds: stops at that many characters, or after
    # that many items (a list of empty or malformed messages costs no more than text would).
    parts: list[str] = []
    size = 0
    for count, message in enumerate(messages):
        if size >= max_chars or count >= max_chars:
            break
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, list):
            content = _parts_text(content, max_chars - size)
        elif not isinstance(content, str):
            content = ""
        if not isinstance(role, str):
            role = ""
        parts += (role, "\x1f", content, "\x1e")  # joined once below: the text is copied once
        size += len(role) + len(content) + 2
    text = "".join(parts)
    return text[:max_chars] if size > max_chars else text


def _parts_text(content: list[Any], max_chars: int) -> str:
    texts: list[str] = []
    size = 0
    for count, part in enumerate(content):
        if size >= max_chars or count >= max_chars:
            break
        text = _part_text(part)
        texts.append(text)
        size += len(text)
    return "".join(texts)


def _part_text(part: Any) -> str:
    if not isinstance(part, dict):
        return ""
    text = part.get("text")
    if isinstance(text, str):
        return text
    image = part.get("image_url")
    if isinstance(image, dict) and isinstance(image.get("url"), str):
        return "\x1dimage:" + image["url"][:256]
    return ""


def block_hashes(prompt: str | list[int], block_chars: int) -> list[int]:
    """The chained hashes of the prompt's whole blocks (see the module doc)."""
    hashes: list[int] = []
    append = hashes.append
    if isinstance(prompt, str):
        h = _TEXT_SEED
        for start in range(0, len(prompt) - block_chars + 1, block_chars):
            h = hash((h, prompt[start : start + block_chars]))
            append(h)
    else:
        size = max(1, block_chars // CHARS_PER_TOKEN)
        h = _TOKEN_SEED
        try:
            for start in range(0, len(prompt) - size + 1, size):
                h = hash((h, tuple(prompt[start : start + size])))
                append(h)
        except TypeError:
            pass  # an unhashable item (not a token id): the blocks before it still count
    return hashes


def prompt_units(prompt: str | list[int], block_chars: int) -> float:
    """The prompt's length in blocks (a fraction for the last, partial one)."""
    if isinstance(prompt, str):
        return len(prompt) / block_chars
    return len(prompt) / max(1, block_chars // CHARS_PER_TOKEN)
