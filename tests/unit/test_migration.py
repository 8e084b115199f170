"""The stream splicer alone (pure): whole events only, counting, continuation bodies, skipping."""

from __future__ import annotations

import orjson

from ichat.gateway.migration import StreamSplicer, migratable

CHAT = "/v1/chat/completions"


def event(content: str, **extra: object) -> bytes:
    chunk = {"id": "a", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    chunk.update(extra)
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def body(**extra: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, **extra}


def test_only_whole_events_reach_the_client_and_tokens_are_counted_without_running_usage():
    splicer = StreamSplicer(CHAT, body(max_tokens=10))
    whole, cut = event("Hel") + event("lo"), event(" wor")
    out = splicer.feed(whole + cut[:20])
    assert out == whole and splicer.text == "Hello" and splicer.sent_tokens() == 2
    assert orjson.loads(splicer.continuation_body())["max_tokens"] == 8


def test_running_usage_is_the_count_and_is_stripped_when_not_asked_for():
    splicer = StreamSplicer(CHAT, body())
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    out = splicer.feed(event("abc", usage=usage))
    assert splicer.sent_tokens() == 3 and b"usage" not in out
    assert orjson.loads(splicer.upstream_body())["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_trailing_whitespace_is_held_back_and_not_written_twice():
    splicer = StreamSplicer(CHAT, body())
    splicer.feed(event("Here:") + event("\n\n"))
    sent = orjson.loads(splicer.continuation_body())
    assert sent["messages"][-1] == {"role": "assistant", "content": "Here:"}
    splicer.next_segment()
    out = splicer.feed(event("\n\n") + event("* Monday"))
    assert splicer.text == "Here:\n\n* Monday"
    assert [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in out.split(b"\n\n") if e] == ["", "* Monday"]


def test_a_finished_answer_or_a_spent_budget_is_not_continued():
    splicer = StreamSplicer(CHAT, body(max_tokens=1))
    splicer.feed(event("a"))
    assert splicer.continuation_body() is None  # nothing left of max_tokens
    done = StreamSplicer(CHAT, body())
    done.feed(event("a") + b"data: [DONE]\n\n")
    assert not done.can_continue() and done.continuation_body() is None


def test_what_can_migrate():
    assert migratable(CHAT, body())
    assert not migratable(CHAT, body(n=2)) and not migratable(CHAT, {**body(), "stream": False})
    assert migratable("/v1/completions", {"prompt": "p", "stream": True})
    assert not migratable("/v1/completions", {"prompt": ["p"], "stream": True})
    assert not migratable("/v1/completions", {"prompt": "p", "stream": True, "echo": True})
    assert not migratable("/v1/embeddings", {"input": "p", "stream": True})
