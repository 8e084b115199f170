"""One error hierarchy for iChat, translated to OpenAI-shaped bodies at the HTTP edge.

    IChatError                      500 internal_error (the root: every iChat error is one)
    ├── ConfigError                 startup/reload: names the file, the key path and what was expected
    ├── EngineUnavailable           startup only: unknown backend, engine not installed
    ├── InvalidRequest              400 invalid_request_error
    ├── AuthenticationFailed        401 invalid_api_key
    ├── PermissionDenied            403 permission_error (names the setting that would allow it)
    ├── NotFound                    404 not_found
    │   └── ModelNotFound           404 model_not_found
    ├── PayloadTooLarge             413 request_too_large
    ├── UnprocessableEntity         422 unprocessable_entity
    ├── RateLimited                 429 rate_limit_exceeded
    ├── ServiceUnavailable          503 service_unavailable (carries Retry-After)
    ├── UpstreamError               502 upstream_error
    ├── UpstreamTimeout             504 upstream_timeout
    ├── GatewayRefused              worker side: the gateway answered a beat with an error status
    ├── LogStreamBroken             gateway side: a worker's log stream ended or answered an error
    └── InvalidTransition           a bug: the supervisor tried a move its state machine lacks

The data plane's own failures (ichat.gateway.upstream) hang below this root too. Foreign
exceptions (aiohttp, engine, config parser) are translated once, where they are caught, with
``raise ... from exc``; handlers only ever see these (ichat.httperrors turns them into answers).
"""

from __future__ import annotations

from typing import Any

import orjson


class IChatError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(IChatError):
    type = "config_error"
    code = "invalid_config"


class EngineUnavailable(IChatError):
    type = "engine_error"
    code = "engine_unavailable"


class InvalidRequest(IChatError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(IChatError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(IChatError):
    """The caller may not use this route: e.g. a route class with no credential configured is
    served to loopback peers only. ``param`` names the config setting that would open it."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(IChatError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(IChatError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnprocessableEntity(IChatError):
    status = 422
    type = "invalid_request_error"
    code = "unprocessable_entity"


class RateLimited(IChatError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(IChatError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UpstreamError(IChatError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(IChatError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class GatewayRefused(IChatError):
    """The gateway answered a worker's heartbeat or deregistration with an error status."""

    type = "gateway_refused"
    code = "gateway_refused"


class LogStreamBroken(IChatError):
    """A worker's log stream cannot be read (an HTTP error, or it ended)."""

    type = "log_stream_error"
    code = "log_stream_broken"


class InvalidTransition(IChatError):
    """A bug: the supervisor tried a transition its state machine does not have."""

    code = "invalid_transition"


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def to_openai_error(err: IChatError) -> tuple[int, dict[str, Any]]:
    """Return (HTTP status, OpenAI error body) for an iChat error."""
    return err.status, error_body(err.message, err.type, err.code, err.param)


def to_json_bytes(err: IChatError) -> bytes:
    return orjson.dumps(to_openai_error(err)[1])


def sse_error_event(err: IChatError) -> bytes:
    """The final event of a stream that broke after its first byte: an error, then [DONE]."""
    return b"data: " + to_json_bytes(err) + b"\n\ndata: [DONE]\n\n"
