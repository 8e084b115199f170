"""The iChat Gateway: one aiohttp app in front of many workers (``python -m ichat.gateway``).

Holds: the process (``__main__``, ``app``, ``connections``); the data plane (``dataplane``,
``proxy``, ``migration``, ``headers``, ``sniff``, ``models``, ``metrics``, the ``upstream``
client package); the control plane (``control``, ``registry``, ``supervisor``, ``statefile``,
``auth``, ``childkeys``, ``admin``, ``views``, ``logs``, ``progress``, ``console`` + ``ui/``).
May import: ``ichat.routing``, ``ichat.config``, ``ichat.protocol``, ``ichat.errors``,
``ichat.httperrors``, ``ichat.backoff``, ``ichat.logs``, and from ``ichat.engines`` only the list
of installed engines; never ``ichat.worker`` (workers are reached over HTTP only).
"""

from ichat.gateway.app import build_app

__all__ = ["build_app"]
