"""Secrets that let a managed child prove it is this gateway's child.

The gateway keeps one random key in ``<state_dir>/supervisor.key`` (mode 0600, created on
first use). Each managed worker's secret is ``HMAC(key, worker_id)``: the supervisor hands it
to the child in ``ICHAT_WORKER_SECRET`` (never on a command line, which any local user can
read), and the child sends it with its heartbeats. Because the secret is derived, a gateway
restarted after a crash recognises the children of its predecessor from the same file, without
a list of them.

Adoption never takes the secret over the wire: the gateway sends a fresh random challenge to
the worker's ``/info``, and the worker answers ``HMAC(secret, challenge|pid|port)``
(:func:`ichat.protocol.child_proof`), binding the proof to the process and the port it
answers for.

If the state directory cannot be written the key lives in memory only: children still
authenticate, but a restarted gateway cannot adopt them (it says so in its log).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

from ichat.gateway.statefile import write_private

log = logging.getLogger("ichat.gateway.childkeys")

KEY_FILE = "supervisor.key"


class ChildKeys:
    def __init__(self, state_dir: Path | None) -> None:
        self._path = state_dir / KEY_FILE if state_dir is not None else None
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = self._load()
        return self._key

    def _load(self) -> bytes:
        if self._path is None:
            return secrets.token_bytes(32)
        try:
            raw = self._path.read_bytes().strip()
            if len(raw) == 64:
                return bytes.fromhex(raw.decode("ascii"))
            log.warning("%s is not a key this gateway wrote; making a new one", self._path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); making a new one", self._path, exc)
        key = secrets.token_bytes(32)
        try:
            write_private(self._path, key.hex().encode("ascii") + b"\n")
        except OSError as exc:
            log.warning(
                "cannot write %s (%s): managed workers' secrets live in memory only, so a restarted "
                "gateway cannot adopt them", self._path, exc,
            )  # fmt: skip
        return key

    def secret_for(self, worker_id: str) -> str:
        return hmac.new(self.key, b"child:" + worker_id.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()

    def verify(self, worker_id: str, presented: str) -> bool:
        return hmac.compare_digest(self.secret_for(worker_id).encode(), presented.encode("utf-8", "surrogateescape"))


def new_challenge() -> str:
    return secrets.token_hex(16)
