"""The gateway's HTTP API as the CLI sees it: one aiohttp session, timeouts, and every failure
turned into one :class:`CliError` whose message is the single line the user reads.

    aiohttp.ClientConnectorError / timeout  -> "cannot reach the gateway at URL ...; set --gateway or ICHAT_GATEWAY"
    401 / 403 on an admin route            -> names --admin-key / ICHAT_ADMIN_KEY
    401 / 403 on a client route            -> names --api-key / ICHAT_API_KEY
    404 worker_not_found                   -> "no worker 'x' (see `ichat workers`)"
    any other status                       -> the gateway's own OpenAI-shaped error message
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from ichat.errors import IChatError

DEFAULT_GATEWAY = "http://127.0.0.1:4000"
#: seconds to open a connection to the gateway
CONNECT_TIMEOUT_S = 5.0
#: seconds for a whole admin call (a stop waits for the worker to drain: see the supervisor)
ADMIN_TIMEOUT_S = 120.0


class CliError(IChatError):
    """A failure to report as one line; ``exit_code`` is the process's exit status. In the one
    error tree (ichat.errors) like every iChat error; it never reaches an HTTP answer."""

    type = "cli_error"
    code = "cli_error"

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Unreachable(CliError):
    """No answer from the gateway at all (a follower may retry; a refusal it must not)."""


def _error_message(body: bytes) -> tuple[str, str | None]:
    """(message, code) from an OpenAI-shaped error body, or the raw text."""
    try:
        data = orjson.loads(body)
        error = data["error"]
        return str(error.get("message") or error), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip()
        return (text[:300] or "(empty body)"), None


class GatewayClient:
    def __init__(self, base_url: str, *, admin_key: str | None = None, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.admin_key = admin_key
        self.api_key = api_key
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use GatewayClient as an async context manager"
        return self._session

    def _headers(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else (self.api_key or self.admin_key)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def unreachable(self, exc: BaseException) -> Unreachable:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = "timed out"
        elif isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error is not None:
            os_error = exc.os_error
            reason = os.strerror(os_error.errno) if os_error.errno else (os_error.strerror or str(os_error))
        return Unreachable(f"cannot reach the gateway at {self.base_url} ({reason}); set --gateway or ICHAT_GATEWAY")

    def http_error(self, status: int, body: bytes, *, admin: bool, what: str) -> CliError:
        message, code = _error_message(body)
        if status in (401, 403):
            if admin:
                setting = "--admin-key or ICHAT_ADMIN_KEY"
                have = "no admin key was sent" if not self.admin_key else "the admin key was refused"
            else:
                setting = "--api-key or ICHAT_API_KEY"
                have = "no API key was sent" if not (self.api_key or self.admin_key) else "the API key was refused"
            return CliError(f"{what}: {status} {message} ({have}; set {setting})")
        if status == 404 and code == "worker_not_found":
            return CliError(f"{message} (see `ichat workers`)")
        return CliError(f"{what}: {status} {message}")

    async def request(self, method: str, path: str, *, json: Any = None, admin: bool = True, what: str | None = None) -> Any:
        """One JSON call; the decoded body, or CliError."""
        what = what or f"{method} {path}"
        data = orjson.dumps(json) if json is not None else None
        headers = self._headers(admin)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(method, self.base_url + path, data=data, headers=headers) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise self.http_error(resp.status, body, admin=admin, what=what)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise self.unreachable(exc) from exc
        try:
            return orjson.loads(body)
        except ValueError as exc:
            raise CliError(f"{what}: the gateway answered something that is not JSON: {body[:200]!r}") from exc

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
        json: Any = None, admin: bool = True, what: str,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open streaming response (status checked). No total timeout: a followed log never
        ends; a read gap longer than ``idle_s`` (see callers) is their business."""
        all_headers = {**self._headers(admin), **(headers or {})}
        data = None
        if json is not None:
            data = orjson.dumps(json)
            all_headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=None)
        try:
            resp = await self.session.request(
                method, self.base_url + path, params=params, headers=all_headers, data=data, timeout=timeout
            )
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise self.unreachable(exc) from exc
        try:
            if resp.status >= 400:
                raise self.http_error(resp.status, await resp.read(), admin=admin, what=what)
            yield resp
        finally:
            resp.close()  # a stream left early must not go back to the pool half read
