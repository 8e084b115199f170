"""Fixtures for gateway tests: fake upstreams (in-process aiohttp apps) and a gateway client."""

from __future__ import annotations

import random
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ichat.config import GatewayConfig
from ichat.gateway.app import build_app

from .fakes import FakeClock, FakeUpstream, MakeGateway, MakeUpstream, NoCancellationTestServer


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> MakeUpstream:
    async def make(name: str = "a", behaviour: str = "json", **kwargs: Any) -> FakeUpstream:
        fake = FakeUpstream(name, behaviour, **kwargs)
        server = await aiohttp_server(fake.app())
        fake.api_base = str(server.make_url("/v1"))
        return fake

    return make


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gateway(aiohttp_client: Any, clock: FakeClock, tmp_path: Any) -> MakeGateway:
    """``await gateway(config_dict)`` -> a test client of a gateway built from that config
    (its state directory, unless the config names one, is the test's own tmp_path)."""

    async def make(config: dict[str, Any], *, handler_cancellation: bool = True, seed: int = 0) -> TestClient:
        config = {"state_dir": str(tmp_path / "state"), **config}
        parsed = GatewayConfig.from_dict(config, source="test.yaml", environ={})
        app = build_app(parsed, clock=clock, rng=random.Random(seed))
        if handler_cancellation:
            return await aiohttp_client(app)
        return await aiohttp_client(NoCancellationTestServer(app))

    return make
