"""HTTP answers, the one place both the gateway and the worker use: JSON bodies, and iChat errors.

Every error leaves as an OpenAI-shaped body (``ichat.errors``); aiohttp's own HTTP exceptions
(no route, wrong method, body too large, a body that cannot be read) are translated the same way; anything unexpected is
logged with its traceback and answered with a 500 that shows none of it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ichat.errors import IChatError, InvalidRequest, NotFound, PayloadTooLarge, error_body, to_json_bytes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_ERRORS: dict[int, type[IChatError]] = {400: InvalidRequest, 404: NotFound, 413: PayloadTooLarge}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer (orjson), for every handler of gateway and worker."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error_response(err: IChatError) -> web.Response:
    response = web.Response(
        body=to_json_bytes(err), status=err.status, content_type="application/json", headers=err.headers()
    )
    if isinstance(err, PayloadTooLarge):
        # Don't drain the rest of a huge upload just to keep the connection alive.
        response.force_close()
    return response


def error_middleware(component: str, log: logging.Logger) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware for one component ("gateway", "worker"), named in 413 and 500 messages."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except IChatError as err:
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            cls = _HTTP_ERRORS.get(exc.status)
            if cls is PayloadTooLarge:
                return error_response(PayloadTooLarge(f"Request body is larger than the {component}'s limit."))
            if cls is NotFound:
                return error_response(NotFound(f"No route for {request.method} {request.path}."))
            if cls is not None:
                return error_response(cls(exc.reason))
            body = orjson.dumps(error_body(exc.reason, "invalid_request_error", exc.status))
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
            return web.Response(body=body, status=exc.status, content_type="application/json", headers=headers)
        except (RequestPayloadError, HttpProcessingError) as exc:
            # a body aiohttp could not read (broken chunking, an undecodable Content-Encoding):
            # the client's fault, translated here once like every other foreign error
            reason = " ".join(str(getattr(exc, "message", None) or exc).split())[:200]
            response = error_response(InvalidRequest(f"request body could not be read: {reason}"))
            response.force_close()
            return response
        except ConnectionResetError:
            raise  # the client went away: nobody to answer
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(IChatError(f"Internal error in the {component}; see its log."))

    return middleware


class MalformedRequestLogFilter(logging.Filter):
    """One line instead of a traceback for a request aiohttp's server could not parse.

    A peer that speaks HTTP/2 or TLS to the plain HTTP/1.1 port, or sends junk, already got its
    400 (or a closed connection) from aiohttp; its parser error is the peer's fault, not a
    server bug, and a traceback per probe buries the log (sglang-router opens every worker
    connection with an HTTP/2 preface). Installed on the ``aiohttp.server`` logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = str(exc.message).strip().splitlines()[0] if str(exc.message).strip() else ""
            said = record.getMessage()
            record.msg = "%s: malformed HTTP request answered with %s (%s)"
            record.args = (said, exc.code, first[:200])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install_log_filters() -> None:
    """The gateway's and the worker's log hygiene (called once, from their ``main``)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestLogFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestLogFilter())
