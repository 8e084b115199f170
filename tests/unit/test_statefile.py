"""launched-workers.json: durable private writes, bad entries moved aside (never all dropped)."""

from __future__ import annotations

import os
import stat

import orjson

from ichat.config import ManagedWorkerSpec
from ichat.gateway.statefile import LaunchedStore, write_private

A = ManagedWorkerSpec(model_name="a", model_path="/p", port=8001, engine_flags={"max_model_len": 512})
B = ManagedWorkerSpec(model_name="b", model_path="/p", port=8002)


def test_round_trip_keeps_engine_flags(tmp_path):
    store = LaunchedStore(tmp_path)
    store.save([A, B])
    assert store.load().specs == [A, B]


def test_written_private_and_atomically(tmp_path):
    store = LaunchedStore(tmp_path / "new")
    store.save([A])
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temp file left
    path = tmp_path / "key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_private(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_one_bad_entry_is_moved_aside_and_the_rest_kept(tmp_path):
    """Before: one bad entry made the loader drop every entry, and the next write overwrote the file."""
    store = LaunchedStore(tmp_path, clock=lambda: 0.0)
    store.save([A, B])
    data = orjson.loads(store.path.read_bytes())
    data["launched_workers"].insert(1, {"model_name": "c", "port": "eighty", "model_path": "/p"})
    store.path.write_bytes(orjson.dumps(data))
    loaded = store.load()
    assert loaded.specs == [A, B] and len(loaded.problems) == 1 and "port" in loaded.problems[0]
    aside = [p for p in tmp_path.iterdir() if "rejected" in p.name]
    assert len(aside) == 1
    assert orjson.loads(aside[0].read_bytes())["launched_workers"][0]["model_name"] == "c"
    assert store.load().specs == [A, B]  # the file now holds the good ones only


def test_an_unreadable_file_is_moved_aside_whole(tmp_path):
    store = LaunchedStore(tmp_path, clock=lambda: 0.0)
    store.path.write_bytes(b"{not json")
    loaded = store.load()
    assert loaded.specs == [] and loaded.problems
    assert not store.path.exists()
    assert [p.read_bytes() for p in tmp_path.iterdir() if "unreadable" in p.name] == [b"{not json"]
