"""The gateway's state on disk: workers launched through the admin API, and private files.

``launched-workers.json`` lists the specs of workers started with ``POST /v1/admin/workers/launch``
so that a restarted gateway starts (or adopts) them again. Writes are atomic and durable: a
temporary file of mode 0600 is written and fsynced, renamed over the old one, and the directory
is fsynced, so a crash leaves the old list or the new one, never a torn file. Reading keeps every
good entry: a bad one is moved aside into ``launched-workers.rejected-<time>.json`` and reported,
and a file that is not JSON at all is moved aside whole, so the next write never overwrites
what an operator may still want to repair.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson

from ichat.config import ManagedWorkerSpec, structure_managed_worker
from ichat.errors import ConfigError

log = logging.getLogger("ichat.gateway.statefile")

STATE_FILE = "launched-workers.json"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "ichat"


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: mode 0600, file and directory fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older tmp file of another mode may have been there
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def spec_to_dict(spec: ManagedWorkerSpec) -> dict[str, Any]:
    return attrs.asdict(spec)


def spec_from_dict(data: Any, where: str) -> ManagedWorkerSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    # attrs.asdict folded engine flags into "engine_flags": unfold them for the structurer
    data = dict(data)
    flags = data.pop("engine_flags", {}) or {}
    if not isinstance(flags, dict):
        raise ConfigError(f"{where}: engine_flags: expected a mapping")
    data.update(flags)
    return structure_managed_worker(data, where)


@attrs.frozen
class Loaded:
    specs: list[ManagedWorkerSpec]
    #: one line per entry (or whole file) that was moved aside
    problems: list[str]


class LaunchedStore:
    """``<state_dir>/launched-workers.json``."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = state_dir / STATE_FILE
        self._clock = clock

    def save(self, specs: list[ManagedWorkerSpec]) -> None:
        body = {"launched_workers": [spec_to_dict(s) for s in specs]}
        write_private(self.path, orjson.dumps(body, option=orjson.OPT_INDENT_2))

    def _aside(self, suffix: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        return self.path.with_name(f"{self.path.stem}.{suffix}-{stamp}.json")

    def load(self) -> Loaded:
        path = self.path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return Loaded([], [])
        except OSError as exc:
            problem = f"cannot read {path} ({exc.strerror or exc}); no launched worker restarted"
            log.error("%s", problem)
            return Loaded([], [problem])
        try:
            data = orjson.loads(raw)
            entries = data["launched_workers"]
            if not isinstance(entries, list):
                raise TypeError("launched_workers is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            aside = self._aside("unreadable")
            try:
                os.replace(path, aside)
            except OSError as move_exc:
                problem = f"{path} is unreadable ({exc}) and cannot be moved aside ({move_exc}); no launched worker restarted"
                log.error("%s", problem)
                return Loaded([], [problem])
            problem = f"{path} is unreadable ({exc}); moved aside to {aside.name}, no launched worker restarted"
            log.error("%s", problem)
            return Loaded([], [problem])
        specs: list[ManagedWorkerSpec] = []
        bad: list[Any] = []
        problems: list[str] = []
        for i, entry in enumerate(entries):
            try:
                specs.append(spec_from_dict(entry, f"{path.name}: launched_workers[{i}]"))
            except ConfigError as exc:
                bad.append(entry)
                problems.append(exc.message)
        if bad:
            aside = self._aside("rejected")
            try:
                write_private(aside, orjson.dumps({"launched_workers": bad}, option=orjson.OPT_INDENT_2))
                self.save(specs)
            except OSError as exc:  # the good entries still start; the file stays as it was
                log.error("cannot move bad entries of %s aside (%s); the file is left as it is", path, exc)
            for problem in problems:
                log.error("launched worker not restarted: %s (entry moved to %s)", problem, aside.name)
        return Loaded(specs, problems)
