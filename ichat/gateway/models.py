"""``GET /v1/models`` and ``GET /v1/models/{name}``: the models the routing table can serve now.

A model is listed while at least one of its endpoints is routable; its card names the
backends serving it, the number of routable replicas and what they serve (kinds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from ichat.errors import ModelNotFound
from ichat.routing.table import RoutingTable


class ModelList:
    def __init__(self, table: RoutingTable, unknown_model_message: Callable[[str], str]) -> None:
        self.table = table
        self.unknown_model_message = unknown_model_message
        self.started = int(time.time())

    async def list_models(self, request: web.Request) -> web.Response:
        cards = [self.card(name) for name in self.table.models()]
        body = {"object": "list", "data": [card for card in cards if card is not None]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        card = self.card(name) if self.table.has_model(name) else None
        if card is None:
            raise ModelNotFound(self.unknown_model_message(name), param="model")
        return web.Response(body=orjson.dumps(card), content_type="application/json")

    def card(self, name: str) -> dict[str, Any] | None:
        routable = [ep for ep in self.table.endpoints(name) if ep.routable]
        if not routable:
            return None
        return {
            "id": name,
            "object": "model",
            "created": self.started,
            "owned_by": "ichat",
            "backends": sorted({ep.backend for ep in routable}),
            "replicas": len(routable),
            # what its workers serve (routes, plus input kinds); [] when none reports it
            "kinds": sorted({k for ep in routable for k in ep.kinds}),
        }
