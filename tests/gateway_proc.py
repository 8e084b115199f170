"""A real gateway process for end-to-end tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import httpx
from ruamel.yaml import YAML

from tests.procs import Proc, free_port, wait_until


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` whole, as config management does (a temporary file renamed over it): the
    gateway's watcher never sees it half-written (it copes when it does: test_control_ops)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        YAML(typ="safe", pure=True).dump(data, f)
    os.replace(tmp, path)


class GatewayProc(Proc):
    def __init__(
        self, tmp_dir: Path, config: dict[str, Any], *, port: int | None = None, name: str = "gateway",
        host: str = "127.0.0.1", env: dict[str, str] | None = None,
    ) -> None:
        """``host`` is the listen address (``0.0.0.0`` to be reached from a test's network
        namespace); this machine's tests reach it at 127.0.0.1 either way. ``env`` is added to
        the gateway's environment, which its managed workers inherit."""
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_dir / f"{name}.yaml"
        config = dict(config)
        config.setdefault("server_settings", {})
        config["server_settings"] = {**config["server_settings"], "host": host, "port": self.port}
        config.setdefault("state_dir", str(tmp_dir / f"{name}-state"))
        self.config = config
        write_yaml(self.config_path, config)
        argv = [sys.executable, "-m", "ichat.gateway", "--config", str(self.config_path)]
        super().__init__(argv, tmp_dir / f"{name}-{self.port}.log", env)

    def wait_up(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            assert self.alive(), f"gateway exited with {self.popen.returncode}:\n{self.log_text()[-3000:]}"
            return httpx.get(self.base_url + "/health", timeout=2).status_code == 200

        wait_until(up, timeout, what="gateway /health")

    def workers(self) -> dict[str, dict[str, Any]]:
        data = httpx.get(self.base_url + "/v1/admin/workers", timeout=10).json()["data"]
        return {w["worker_id"]: w for w in data}

    def wait_routable(self, model: str, count: int, timeout: float) -> None:
        def enough() -> bool:
            return sum(1 for w in self.workers().values() if w["model_name"] == model and w.get("routable")) >= count

        wait_until(enough, timeout, interval=0.2, what=f"{count} routable worker(s) for {model}")
