"""vLLM's KV-cache events, in process, for the worker's prefix-cache reports (``--report-prefix-cache``).

vLLM's engine core publishes every change of its prefix cache (``BlockStored``, ``BlockRemoved``,
``AllBlocksCleared``; ``vllm.distributed.kv_events``) on a ZeroMQ PUB socket when
``kv_events_config`` enables them. The worker points that socket at an ``ipc://`` path of its
own (nothing listens on the network) and subscribes here; each batch updates a
:class:`~ichat.worker.prefixcache.PrefixCacheTracker`. The tracker also needs each request's
prompt token ids and the gateway's block hashes for it: :func:`observe_prompts` wraps the
engine client's ``generate`` (what vLLM's serving classes call, in the request's task), and
:data:`GATEWAY_BLOCKS` carries the parsed ``X-Ichat-Prefix-Blocks`` header there.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from ichat.worker.prefixcache import PrefixCacheTracker, prompt_token_ids

log = logging.getLogger("ichat.engines.vllm")

#: the gateway's (units, block hashes) for the request being handled, or None
GATEWAY_BLOCKS: contextvars.ContextVar[tuple[float, list[int]] | None] = contextvars.ContextVar(
    "ichat_gateway_blocks", default=None
)
TOPIC = b"kv"
#: a subscriber that falls behind this far drops events (the next full report resets the view)
RECEIVE_HWM = 100_000


def events_config(endpoint: str) -> Any:
    """vLLM's KVEventsConfig publishing to ``endpoint`` (an ``ipc://`` path)."""
    from vllm.config import KVEventsConfig

    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic=TOPIC.decode())


def observe_prompts(client: Any, tracker: PrefixCacheTracker) -> None:
    """Make ``client.generate`` tell the tracker each prompt it is given (this instance only)."""
    original = client.generate

    def generate(prompt: Any, *args: Any, **kwargs: Any) -> Any:
        blocks = GATEWAY_BLOCKS.get()
        if blocks is not None:
            try:
                tracker.observe_prompt(blocks, prompt_token_ids(prompt))
            except Exception as exc:  # a routing hint must never fail a request
                log.debug("prefix-cache tracking skipped a prompt: %r", exc)
        return original(prompt, *args, **kwargs)

    client.generate = generate


async def follow_events(endpoint: str, tracker: PrefixCacheTracker) -> None:
    """Apply the engine's KV-cache events to ``tracker`` until cancelled."""
    import msgspec
    import zmq
    import zmq.asyncio
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    socket.setsockopt(zmq.SUBSCRIBE, TOPIC)
    last_seq = None
    try:
        while True:
            frames = await socket.recv_multipart()
            if len(frames) != 3:
                continue
            _topic, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big")
            if last_seq is not None and seq != last_seq + 1:
                # events were dropped: what the engine holds is unknown; start over (the blocks
                # it still holds come back as requests reuse them)
                log.warning("prefix-cache events %d..%d lost; forgetting the engine's cache view", last_seq + 1, seq - 1)
                tracker.cleared()
                tracker.resync()
            last_seq = seq
            try:
                batch = decoder.decode(payload)
            except msgspec.DecodeError as exc:
                log.warning("undecodable prefix-cache event batch skipped: %s", exc)
                continue
            for event in batch.events:
                if isinstance(event, BlockStored):
                    if getattr(event, "medium", None) not in (None, "GPU"):
                        continue  # an offloading tier's copy: not what a prefill reuses directly
                    tracker.stored(event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size)
                elif isinstance(event, BlockRemoved):
                    if getattr(event, "medium", None) not in (None, "GPU"):
                        continue
                    tracker.removed(event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    tracker.cleared()
    finally:
        socket.close(linger=0)
        context.term()
