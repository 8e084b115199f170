"""The aiohttp fallback, for upstreams the keep-alive client does not speak to (``https://``).

It wraps the process's one ``aiohttp.ClientSession`` (owned by the data plane) so that the proxy
sees the same response interface (``status``, ``headers``, ``content_type``, ``read()``,
``read_chunk()``, ``close()``) and the same errors (:mod:`.errors`) as from the small client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from ichat.gateway.upstream.errors import ConnectFailed, ConnectionBroken, ReadTimeout, UpstreamFailure


class AiohttpResponse:
    """An ``aiohttp.ClientResponse`` behind :class:`UpstreamResponse`'s interface, with its
    errors translated to ours."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = response.raw_headers
        self.content_length = response.content_length
        self.content_type = response.headers.get("Content-Type", "").lower().encode("latin-1", "replace")
        self.chunked = response.headers.get("Transfer-Encoding", "").lower().endswith("chunked")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _translate(exc, answered=True) from exc

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _translate(exc, answered=True) from exc

    def close(self) -> None:
        self._response.close()


def _translate(exc: BaseException, *, answered: bool) -> UpstreamFailure:
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError)):
        return ConnectFailed(str(exc))
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return ReadTimeout(str(exc) or "upstream did not answer in time")
    return ConnectionBroken(f"{type(exc).__name__}: {exc}", answered=answered)


async def aiohttp_request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Any,
    body: bytes,
    timeout: aiohttp.ClientTimeout | None = None,
) -> AiohttpResponse:
    try:
        if timeout is None:
            response = await session.request(method, url, data=body, headers=headers)
        else:
            response = await session.request(method, url, data=body, headers=headers, timeout=timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise _translate(exc, answered=False) from exc
    return AiohttpResponse(response)
