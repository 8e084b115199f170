"""The routing policy interface and its registry (entry points group ``ichat.routing``).

A policy is a small object with one method, ``select(candidates, request, rng) -> Endpoint``.
``candidates`` is never empty and holds only endpoints that may take traffic now; live load is
pushed into the endpoints (``inflight``, ``reported_load``), never fetched by the policy. The
table keeps one policy instance per model, so a stateful policy (round robin, the prefix index
of cache_aware) keeps its state per pool. ``select`` is the dispatch: the proxy counts the
request in the chosen endpoint's ``inflight`` before it next yields to the event loop.

Optional methods, called by the table when the policy has them:

* ``configure(settings)``: the gateway's ``routing`` settings (at creation and on every config
  reload; a reload keeps the instance, and so its state, when the policy name is unchanged);
* ``forget(endpoint_id)``: the endpoint left the pool (removed, evicted): drop its state;
* ``samples()``: metrics, as ``(name, help, kind, labels, value)`` tuples (see
  :meth:`ichat.gateway.metrics.GatewayMetrics.add_source`); the table adds the ``model`` label.

To add one, expose a class in the ``ichat.routing`` entry point group of any installed package;
it is constructed without arguments.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

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
    #: a session id the caller already knows; policies that use sessions otherwise read it
    #: from ``headers`` or ``body`` (see ichat.routing.session)
    session_key: str | None = None
    #: the request's JSON body, already parsed by the proxy (None for a multipart form): read
    #: by the policies that need it (the prompt for cache_aware), never re-parsed
    body: Any = None
    #: the client's request headers (a case-insensitive mapping)
    headers: Mapping[str, str] | None = None
    #: set by a policy: headers to add to the upstream request (precise cache_aware sends the
    #: prompt's block hashes to the worker, see ichat.protocol.PREFIX_BLOCKS_HEADER)
    upstream_headers: list[tuple[bytes, bytes]] | None = None


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
