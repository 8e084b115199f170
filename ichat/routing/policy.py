"""The routing policy interface and its registry (entry points group ``ichat.routing``).

A policy is a small object with one method, ``select(candidates, request, rng) -> Endpoint``.
``candidates`` is never empty and holds only endpoints that may take traffic now; live load is
pushed into the endpoints (``inflight``, ``reported_load``), never fetched by the policy. The
table keeps one policy instance per model, so a stateful policy (round robin) counts per pool.

To add one, expose a class in the ``ichat.routing`` entry point group of any installed package;
it is constructed without arguments.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

import attrs

from ichat.errors import ConfigError

if TYPE_CHECKING:
    from ichat.routing.table import Endpoint

GROUP = "ichat.routing"


@attrs.define(slots=True)
class RequestInfo:
    """What a policy may know of a request (built once per request: keep it cheap)."""

    model: str
    #: the client-facing path, e.g. ``/v1/chat/completions``
    route: str
    body_len: int = 0
    stream: bool = False
    #: for session-affinity policies (e.g. a user or conversation id); unset today
    session_key: str | None = None
    #: for prefix-aware policies (e.g. the first bytes of the prompt); unset today
    prefix: bytes | None = None


class Policy(Protocol):
    def select(self, candidates: Sequence[Endpoint], request: RequestInfo, rng: random.Random) -> Endpoint: ...


def available_policies() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load_policy(name: str) -> Policy:
    """Instantiate the policy registered as ``name``; ConfigError lists the known names."""
    for ep in entry_points(group=GROUP, name=name):
        return ep.load()()
    known = ", ".join(available_policies()) or "(none: is ichat installed?)"
    raise ConfigError(f"unknown routing policy {name!r}; registered policies: {known}")
