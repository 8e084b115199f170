"""Pure routing: which endpoint of a model's pool serves a request.

Nothing here does I/O or touches asyncio: the table and the policies take values (including
``now`` and a random source) and return values, so they are tested without sockets.

Holds: ``table`` (endpoints, live state, circuit breakers), ``policy`` (the contract and the
``ichat.routing`` entry points), ``round_robin``, ``least_inflight``, ``cache_aware`` + ``prompt``
(prefix index), ``session`` (session affinity).
May import: ``ichat.config`` (the policies' settings classes) and ``ichat.errors``; never the
gateway, the worker or anything that does I/O.
"""

from ichat.routing.policy import Policy, RequestInfo, available_policies, load_policy
from ichat.routing.table import Endpoint, RoutingTable

__all__ = ["Endpoint", "Policy", "RequestInfo", "RoutingTable", "available_policies", "load_policy"]
