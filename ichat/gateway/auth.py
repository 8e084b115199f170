"""Bearer-key checks, by path prefix.

``/v1/`` (the data plane) needs one of ``auth.api_keys`` when any are configured; ``/health``
and everything outside the protected prefixes stay open. Later modules protect their own
prefixes with other credentials, e.g. ``app[AUTH_KEY].protect("/v1/admin/", [admin_key])``;
the longest matching prefix decides. Keys are compared with ``hmac.compare_digest`` against
every configured key, so timing reveals neither the key nor which one matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from ichat.errors import AuthenticationFailed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Authenticator:
    def __init__(self) -> None:
        # (prefix, accepted keys), longest prefix first; an empty key tuple means "open".
        self._rules: list[tuple[str, tuple[bytes, ...]]] = []

    def protect(self, prefix: str, keys: Iterable[str]) -> None:
        """Require one of ``keys`` under ``prefix``; no keys leaves the prefix open."""
        encoded = tuple(k.encode() for k in keys if k)
        self._rules = [r for r in self._rules if r[0] != prefix]
        self._rules.append((prefix, encoded))
        self._rules.sort(key=lambda r: len(r[0]), reverse=True)

    @property
    def enabled(self) -> bool:
        return any(keys for _, keys in self._rules)

    def required_keys(self, path: str) -> tuple[bytes, ...]:
        for prefix, keys in self._rules:
            if path.startswith(prefix):
                return keys
        return ()

    def check(self, request: web.BaseRequest) -> None:
        keys = self.required_keys(request.path)
        if not keys:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
        presented = token.strip().encode()
        matched = False
        for key in keys:  # no early exit: constant time in which key matched
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise AuthenticationFailed("Invalid API key.")

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        check = self.check

        @web.middleware
        async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self._rules:
                check(request)
            return await handler(request)

        return auth_middleware
