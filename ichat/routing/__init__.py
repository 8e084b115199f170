"""Pure routing: which endpoint of a model's pool serves a request.

Nothing here does I/O or touches asyncio: the table and the policies take values (including
``now`` and a random source) and return values, so they are tested without sockets.
"""

from ichat.routing.policy import Policy, RequestInfo, available_policies, load_policy
from ichat.routing.table import Endpoint, RoutingTable

__all__ = ["Endpoint", "Policy", "RequestInfo", "RoutingTable", "available_policies", "load_policy"]
