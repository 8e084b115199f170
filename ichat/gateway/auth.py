"""Who may call what: three route classes, each with its own credential.

    class    routes                                   credential (auth.*)          none configured
    client   /v1/* (the data plane, /v1/models)       api_keys                     loopback peers only
    admin    /v1/admin/*, /v1/logs/*, /ui             admin_key                    loopback peers only
    worker   /v1/workers/*                            worker_token, or a managed   loopback peers only
                                                      child's own secret
    open     /health, /metrics, anything else         none                         everyone

A class with a credential configured needs it from every peer, loopback included (401 when it
is missing or wrong); one exception: the console's static page under ``/ui`` (no data in it; a
browser cannot send a bearer header when it loads a page, and every call the page makes carries
the key). A class without one answers loopback peers and refuses everyone else with
403, naming the setting to add: nothing is open to the network by accident, and ``make run``
works on one machine with nothing configured. A client key is never an admin key unless
``auth.allow_client_keys_for_admin`` says so.

The class is decided from the route the router matched (its pattern), not from the raw path,
so no spelling of a path (percent-encoding, dot segments) reaches an admin handler as a client
route. Keys are compared with ``hmac.compare_digest`` against every accepted key, so timing
reveals neither the key nor which one matched.

Managed children (started by this gateway's supervisor) authenticate with a secret of their
own (``X-IChat-Worker-Id`` + ``Authorization: Bearer <secret>``, see ichat.gateway.childkeys),
so a rotated ``worker_token`` never locks them out. After a reload changes ``worker_token``,
the previous token is accepted for ``auth.worker_token_grace_s`` more seconds.

The principal a request authenticated as is left at ``request[PRINCIPAL]`` for handlers (the
registry needs to know whether a beat came with a token, from a child, or from loopback).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

import attrs
from aiohttp import web

from ichat.config import AuthSettings
from ichat.errors import AuthenticationFailed, PermissionDenied
from ichat.protocol import CHILD_HEADER

log = logging.getLogger("ichat.gateway.auth")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (worker_id, presented secret) -> is it that managed child's secret
ChildVerifier = Callable[[str, str], bool]

CLIENT, ADMIN, WORKER, OPEN = "client", "admin", "worker", "open"
#: where handlers find the Principal of a request

_ADMIN_PREFIXES = ("/v1/admin/", "/v1/logs/", "/ui/")
_SETTING = {CLIENT: "auth.api_keys", ADMIN: "auth.admin_key", WORKER: "auth.worker_token"}
_WHAT = {CLIENT: "The data plane", ADMIN: "The admin API", WORKER: "Worker registration"}
_HOW = {
    CLIENT: "set auth.api_keys (or auth.api_keys_env) in the gateway config and send 'Authorization: Bearer <key>'",
    ADMIN: "set auth.admin_key (or auth.admin_key_env) in the gateway config and send 'Authorization: Bearer <key>'",
    WORKER: "set auth.worker_token (or auth.worker_token_env) in the gateway config and start the worker with --worker-token",
}


def route_class(path: str) -> str:
    """Pure: the class of a route pattern or path."""
    if path in ("/v1/admin", "/v1/logs", "/ui") or path.startswith(_ADMIN_PREFIXES):
        return ADMIN
    if path == "/v1/workers" or path.startswith("/v1/workers/"):
        return WORKER
    if path == "/v1" or path.startswith("/v1/"):
        return CLIENT
    return OPEN


def is_loopback(host: str | None) -> bool:
    """Pure: an IP literal of this machine's loopback (IPv4-mapped IPv6 included)."""
    if host in ("127.0.0.1", "::1"):
        return True  # the common case, without parsing
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@attrs.frozen
class Principal:
    #: "key" (a configured credential), "child" (a managed child's secret), "loopback"
    #: (no credential configured, a loopback peer), "open" (a route of the open class)
    kind: str
    route_class: str
    #: the managed child's id, for kind "child"
    worker_id: str | None = None


PRINCIPAL = web.RequestKey("ichat_principal", Principal)


def peer_host(request: web.BaseRequest) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return None


def _bearer(request: web.BaseRequest) -> bytes | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def _matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    matched = False
    for key in keys:  # no early exit: constant time in which key matched
        matched |= hmac.compare_digest(presented, key)
    return matched


class Authenticator:
    def __init__(
        self,
        auth: AuthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        child_verifier: ChildVerifier | None = None,
    ) -> None:
        self._clock = clock
        self._child_verifier = child_verifier
        self._keys: dict[str, tuple[bytes, ...]] = {}
        #: the worker token a reload replaced, and until when it is still accepted
        self._previous_token: tuple[bytes, float] | None = None
        self.settings = auth
        self._apply(auth)

    def _apply(self, auth: AuthSettings) -> None:
        self.settings = auth
        self._keys = {
            CLIENT: tuple(k.encode() for k in auth.api_keys),
            ADMIN: tuple(k.encode() for k in auth.admin_keys()),
            WORKER: (auth.worker_token.encode(),) if auth.worker_token else (),
        }

    def configure(self, auth: AuthSettings) -> None:
        """A reloaded config's credentials. A replaced worker token stays valid for the grace."""
        old = self.settings.worker_token
        if old and old != auth.worker_token and auth.worker_token_grace_s > 0:
            self._previous_token = (old.encode(), self._clock() + auth.worker_token_grace_s)
            log.warning(
                "worker_token changed: the previous token is still accepted for %.0fs; restart workers "
                "on other hosts with the new --worker-token before then", auth.worker_token_grace_s,
            )  # fmt: skip
        elif old != auth.worker_token:
            self._previous_token = None
        self._apply(auth)

    def protected(self, cls: str) -> bool:
        """A credential is configured for this class."""
        return bool(self._keys.get(cls))

    def required_keys(self, path: str) -> tuple[bytes, ...]:
        """The keys accepted on ``path`` now (empty: no credential, loopback peers only)."""
        return self._accepted(route_class(path))

    def _accepted(self, cls: str) -> tuple[bytes, ...]:
        keys = self._keys.get(cls, ())
        if cls == WORKER and self._previous_token is not None:
            token, until = self._previous_token
            if self._clock() <= until:
                keys += (token,)
            else:
                self._previous_token = None
        return keys

    def authenticate(self, request: web.BaseRequest, path: str | None = None) -> Principal:
        """The Principal, or AuthenticationFailed (401) / PermissionDenied (403)."""
        path = request.path if path is None else path
        cls = route_class(path)
        if cls == OPEN:
            return Principal("open", cls)
        if cls == ADMIN and (path == "/ui" or path.startswith("/ui/")) and self._accepted(ADMIN):
            # The console's static page (ichat.gateway.console) holds no data, and a browser cannot
            # send a Bearer header when it loads a page: every call the page makes goes to
            # /v1/admin and /v1/logs with the key the operator types in. Without an admin key the
            # page stays loopback-only, like the rest of the class.
            return Principal("open", cls)
        presented = _bearer(request)
        if cls == WORKER and CHILD_HEADER in request.headers:
            child = request.headers[CHILD_HEADER]
            if presented is None or self._child_verifier is None:
                raise AuthenticationFailed(f"{CHILD_HEADER} needs 'Authorization: Bearer <the child's secret>'.")
            if not self._child_verifier(child, presented.decode("utf-8", "surrogateescape")):
                raise AuthenticationFailed("Invalid managed-worker secret.")
            return Principal("child", cls, worker_id=child)
        keys = self._accepted(cls)
        if keys:
            if presented is None:
                raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
            if not _matches(presented, keys):
                raise AuthenticationFailed("Invalid API key.")
            return Principal("key", cls)
        if is_loopback(peer_host(request)):
            return Principal("loopback", cls)
        raise PermissionDenied(
            f"{_WHAT[cls]} is served to loopback clients only, because no credential is configured for it: {_HOW[cls]}.",
            code="loopback_only",
            param=_SETTING[cls],
        )

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        authenticate = self.authenticate

        @web.middleware
        async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            # The matched route's pattern decides the class (see the module docstring); a path
            # no route matched (404/405) is classed by itself.
            resource = request.match_info.route.resource
            canonical = resource.canonical if resource is not None else ""
            request[PRINCIPAL] = authenticate(request, canonical or request.path)
            return await handler(request)

        return auth_middleware


def describe_access(auth: AuthSettings, host: str) -> list[str]:
    """Pure: the start-up block saying which route classes are open to whom."""
    network = host not in ("127.0.0.1", "::1", "localhost") and not is_loopback(host)
    anyone = "anyone who can reach " + (f"{host}" if host not in ("0.0.0.0", "::", "") else "this machine")
    lines = [f"who can reach what (listening on {host}{'' if network else ', loopback only'}):"]

    def line(name: str, routes: str, who: str) -> None:
        lines.append(f"  {name:<8} {routes:<38} {who}")

    def closed(cls: str) -> str:
        return f"loopback clients only (set {_SETTING[cls]} to open it to other hosts)"

    line("client", "/v1/* (chat, completions, models...)", f"clients with one of {len(auth.api_keys)} key(s)" if auth.api_keys else closed(CLIENT))
    if auth.admin_key or (auth.allow_client_keys_for_admin and auth.api_keys):
        who = "holders of auth.admin_key" if auth.admin_key else ""
        if auth.allow_client_keys_for_admin and auth.api_keys:
            who = (who + " and " if who else "") + "every client key (allow_client_keys_for_admin)"
        line("admin", "/v1/admin/*, /v1/logs/*, /ui", who)
    else:
        line("admin", "/v1/admin/*, /v1/logs/*, /ui", closed(ADMIN))
    if auth.worker_token:
        line("worker", "/v1/workers/*", "workers with auth.worker_token; managed children by their own secret")
    else:
        line("worker", "/v1/workers/*", closed(WORKER) + "; managed children by their own secret")
    line("open", "/health, /metrics", anyone if network else "loopback clients")
    if auth.api_keys and not auth.admin_key and not auth.allow_client_keys_for_admin:
        lines.append(
            "  note: client keys no longer open the admin API (see README, Security: migration); set "
            "auth.admin_key, or auth.allow_client_keys_for_admin: true to keep the old behaviour"
        )
    return lines
