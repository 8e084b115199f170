"""What the engine's prefix cache really holds, in the gateway's terms (precise cache_aware).

The gateway's ``cache_aware`` policy hashes a prompt's text in blocks (``ichat.routing.prompt``);
an engine caches KV blocks keyed by hashes of token ids. Neither side can compute the other's
hashes cheaply: the gateway would need every model's tokenizer and chat template, and the engine's
hashes are seeded per process. So the two meet here, in the worker, which sees both:

* The gateway sends each request's block hashes with it (``X-Ichat-Prefix-Blocks``, see
  ``ichat.protocol``), and the worker sees the request's prompt token ids as the engine gets them
  (:meth:`PrefixCacheTracker.observe_prompt`). Gateway block ``i`` ends at about
  ``(i + 1) / units`` of the prompt's tokens; it counts as held while the engine holds the token
  block that holds that token plus a margin (text and tokens do not align exactly, so the end is
  placed a little late: held then means held). A gateway block that ends in the prompt's last,
  partial token block is never held: engines cache whole blocks only.
* The engine publishes its cache's changes (vLLM's KV-cache events: ``BlockStored``,
  ``BlockRemoved``, ``AllBlocksCleared``): :meth:`stored`, :meth:`removed`, :meth:`cleared`.
  Token blocks are keyed here by a chain of our own hashes over their token ids (parent key,
  block tokens), so keys computed from a prompt and keys computed from events agree without
  knowing how the engine hashes.
* A prompt's blocks count as held from the moment the engine is given the request (it is about
  to store them: a waiting request must not look like a miss) until the engine either stores
  them, and later evicts them, or has not stored them ``pending_reports`` reports later (the
  request failed or was aborted before its prefill).
* :meth:`report` turns that into the set of gateway hashes held now, sent in heartbeats as
  deltas from the last report, or whole (``full``) every ``full_every`` reports and after a
  report may have been lost.

Bounded: at most ``max_gateway_blocks`` gateway hashes are remembered (least recently seen
dropped first; a report never lists more), and at most ``max_engine_blocks`` engine blocks (the
engine's own cache is smaller; past the bound, everything is forgotten and learned again).
Pure: no I/O, no clock; the KV-event subscriber and the heartbeat are the edges.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

#: the chain's seed (any constant: keys only need to agree within this process)
_SEED = 0x5EED
#: where a gateway block's end is placed in the tokens, past the proportional estimate (since
#: characters per token vary along a prompt): this many tokens plus this share of the position
MARGIN_TOKENS = 4
MARGIN_SHARE = 0.02


def token_chain(token_ids: Sequence[int], block_size: int, blocks: int, parent: int = _SEED) -> list[int]:
    """Our keys of the first ``blocks`` whole token blocks of ``token_ids``."""
    keys = []
    h = parent
    for start in range(0, min(blocks, len(token_ids) // block_size) * block_size, block_size):
        h = hash((h, tuple(token_ids[start : start + block_size])))
        keys.append(h)
    return keys


class PrefixCacheTracker:
    def __init__(
        self,
        block_size: int,
        *,
        max_gateway_blocks: int = 2048,
        max_engine_blocks: int = 1 << 20,
        full_every: int = 10,
        pending_reports: int = 30,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.block_size = block_size
        self.max_gateway_blocks = max_gateway_blocks
        self.max_engine_blocks = max_engine_blocks
        self.full_every = full_every
        self.pending_reports = pending_reports
        self.on_change = on_change
        #: our key -> the engine's block hash, for blocks the engine holds
        self._resident: dict[int, Hashable] = {}
        #: the engine's block hash -> our key
        self._key_of: dict[Hashable, int] = {}
        #: gateway block hash -> (our key of the token block it needs, the report it was seen
        #: in), least recently seen first
        self._gateway: OrderedDict[int, tuple[int, int]] = OrderedDict()
        #: keys of prompts given to the engine that it has not stored yet
        self._awaited: set[int] = set()
        self._reported: set[int] = set()
        self._seq = -1
        self._must_send_full = True

    # -- the engine's events ----------------------------------------------------------------

    def stored(self, block_hashes: Sequence[Hashable], parent: Hashable | None, token_ids: Sequence[int], block_size: int) -> None:
        if block_size != self.block_size:
            if self._resident or block_size <= 0:
                return  # not the cache this tracker mirrors (another KV group)
            # the engine hashes in blocks of another size than its configured one: adopt it
            self.block_size = block_size
            self._gateway.clear()
            self._awaited.clear()
        if len(token_ids) < len(block_hashes) * block_size:
            return  # malformed
        if parent is None:
            key = _SEED
        else:
            found = self._key_of.get(parent)
            if found is None:
                return  # a chain whose start we never saw: unknowable, leave it out
            key = found
        if len(self._resident) + len(block_hashes) > self.max_engine_blocks:
            self.cleared()
        awaited = self._awaited
        for i, engine_hash in enumerate(block_hashes):
            key = hash((key, tuple(token_ids[i * block_size : (i + 1) * block_size])))
            self._resident[key] = engine_hash
            awaited.discard(key)
            self._key_of[engine_hash] = key
        self._changed()

    def removed(self, block_hashes: Iterable[Hashable]) -> None:
        for engine_hash in block_hashes:
            key = self._key_of.pop(engine_hash, None)
            if key is not None and self._resident.get(key) == engine_hash:
                del self._resident[key]
        self._changed()

    def cleared(self) -> None:
        self._resident.clear()
        self._key_of.clear()
        self._awaited.clear()
        self._changed()

    # -- the requests -----------------------------------------------------------------------

    def observe_prompt(self, gateway_blocks: tuple[float, Sequence[int]] | None, token_ids: Sequence[int] | None) -> None:
        """A request the engine is given: its gateway blocks (units, hashes) and token ids."""
        if not gateway_blocks or not token_ids:
            return
        units, hashes = gateway_blocks
        if units <= 0 or not hashes:
            return
        size = self.block_size
        whole = len(token_ids) // size
        tokens = len(token_ids)
        ends = []
        for i in range(len(hashes)):
            end = tokens * (i + 1) / units
            block = int(-(-(end * (1 + MARGIN_SHARE) + MARGIN_TOKENS) // size)) - 1  # ceil, then index
            if block >= whole:
                break
            ends.append(block)
        if not ends:
            return
        keys = token_chain(token_ids, size, ends[-1] + 1)
        table, resident, awaited, seq = self._gateway, self._resident, self._awaited, self._seq
        for h, end in zip(hashes, ends):
            if 0 <= end < len(keys):
                key = keys[end]
                table[h] = (key, seq)
                table.move_to_end(h)
                if key not in resident:
                    awaited.add(key)
        while len(table) > self.max_gateway_blocks:
            key, _ = table.popitem(last=False)[1]
            awaited.discard(key)
        self._changed()

    # -- the reports ------------------------------------------------------------------------

    def held(self) -> set[int]:
        resident, awaited = self._resident, self._awaited
        oldest = self._seq - self.pending_reports
        held = set()
        for h, (key, seen) in self._gateway.items():
            if key in resident:
                held.add(h)
            elif key in awaited:
                if seen >= oldest:
                    held.add(h)
                else:
                    awaited.discard(key)  # never stored: the request ended before its prefill
        return held

    def report(self) -> dict[str, Any]:
        """The next report: what changed since the last one, or everything (``full``)."""
        held = self.held()
        self._seq += 1
        full = self._must_send_full or self._seq % self.full_every == 0
        if full:
            added, removed = held, set()
        else:
            added, removed = held - self._reported, self._reported - held
            if len(added) + len(removed) > self.max_gateway_blocks:
                full, added, removed = True, held, set()
        self._reported = held
        self._must_send_full = False
        return {"seq": self._seq, "full": full, "added": sorted(added), "removed": sorted(removed)}

    def resync(self) -> None:
        """The last report may not have arrived: the next one is whole."""
        self._must_send_full = True

    @property
    def engine_blocks(self) -> int:
        return len(self._resident)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def prompt_token_ids(prompt: Any) -> Sequence[int] | None:
    """The token ids of what a serving class hands the engine (a dict-like prompt or an
    ``EngineCoreRequest``); None for anything else (encoder-decoder prompts, embeddings)."""
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
    return ids if isinstance(ids, list) and ids else None
