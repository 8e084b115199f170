"""An endpoint's prefix cache as its engine reports it (precise ``cache_aware`` routing).

A worker started with ``--report-prefix-cache`` sends, in its heartbeats, the gateway block
hashes (``ichat.routing.prompt``) whose KV blocks its engine holds now (see
``ichat.worker.prefixcache``): whole every few reports, as deltas in between. This keeps the
gateway's copy. A delta applies only on top of the report before it (same worker instance, the
next ``seq``); after a gap the copy is out of sync and not used until the next whole report.

Bounded by the protocol (``MAX_PREFIX_REPORT_BLOCKS`` a report) and here (``max_blocks``: past
it the copy is dropped and waits for a whole report). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ichat.protocol import MAX_PREFIX_REPORT_BLOCKS


class CachedPrefixes:
    __slots__ = ("instance_id", "seq", "blocks", "synced", "max_blocks")

    def __init__(self, max_blocks: int = 2 * MAX_PREFIX_REPORT_BLOCKS) -> None:
        self.instance_id: str | None = None
        self.seq = -1
        self.blocks: set[int] = set()
        #: whether ``blocks`` is the worker's current view (False until a whole report, and after a gap)
        self.synced = False
        self.max_blocks = max_blocks

    def apply(self, instance_id: str, report: Mapping[str, Any]) -> None:
        """Apply one validated report (``ichat.protocol``'s ``prefix_cache``) of ``instance_id``."""
        seq = report["seq"]
        if report["full"]:
            self.instance_id, self.seq, self.synced = instance_id, seq, True
            self.blocks = set(report.get("added", ()))
            return
        if instance_id == self.instance_id and seq <= self.seq:
            return  # a report seen already (the same beat applied twice)
        if not self.synced or instance_id != self.instance_id or seq != self.seq + 1:
            self.instance_id, self.seq, self.synced = instance_id, seq, False
            self.blocks = set()
            return
        self.seq = seq
        blocks = self.blocks
        blocks.difference_update(report.get("removed", ()))
        blocks.update(report.get("added", ()))
        if len(blocks) > self.max_blocks:
            self.blocks, self.synced = set(), False

    def depth(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the engine holds (0 when out of sync)."""
        if not self.synced:
            return 0
        blocks = self.blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self.blocks) if self.synced else 0
