"""The upstream client's errors: every failure of an upstream call is one of these.

    IChatError (ichat.errors)
    └── UpstreamFailure       .kind names the ``ichat_gateway_upstream_errors_total`` label
        ├── ConnectFailed     "connect": no TCP connection (refused, unreachable, timed out)
        ├── ReadTimeout       "timeout": no answer within ``read_timeout``, or past ``total``
        └── ConnectionBroken  "reset":   closed or reset before or while answering
            └── ProtocolError           an answer that is not HTTP/1.x as we can frame it

Foreign exceptions (``OSError``, ``asyncio.TimeoutError``, aiohttp's) are translated into these
once, where they are caught, with ``raise ... from exc``. The proxy turns them into a client-facing
502 or 504 that names the model, never the upstream's address.
"""

from __future__ import annotations

from ichat.errors import IChatError


class UpstreamFailure(IChatError):
    kind = "reset"
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class ConnectFailed(UpstreamFailure):
    kind = "connect"


class ReadTimeout(UpstreamFailure):
    kind = "timeout"
    status = 504
    code = "upstream_timeout"


class ConnectionBroken(UpstreamFailure):
    kind = "reset"

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        #: whether any byte of the answer had arrived
        self.answered = answered


class ProtocolError(ConnectionBroken):
    pass
