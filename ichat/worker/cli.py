"""The worker's own flags (the seed's table); every other flag belongs to the engine.

iChat flags are consumed here; the rest is handed unchanged to the engine plugin, which parses
it with the engine's own parser (for vLLM: ``make_arg_parser``), so any engine flag works and a
wrong one fails with the engine's own message.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid

import attrs


@attrs.frozen
class WorkerOptions:
    backend: str
    gateway_address: str | None
    served_model_name: list[str] | None
    heartbeat_interval: float
    log_streaming: bool
    host: str
    port: int
    worker_id: str
    advertise_host: str | None
    worker_token: str | None
    log_lines: int
    drain_timeout: float
    #: send the gateway what the engine's prefix cache holds (precise cache_aware routing)
    report_prefix_cache: bool = False

    @property
    def dial_host(self) -> str:
        """The host the gateway should dial: --advertise-host, else the bind host if specific."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", ""):
            return socket.gethostname()
        return self.host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ichat.worker",
        description="Serve one model through an in-process engine with OpenAI routes. "
        "Flags not listed here go to the engine (e.g. vLLM's --model, --tensor-parallel-size).",
        allow_abbrev=False,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the engine's flags")
    parser.add_argument("--backend", "-be", default="vllm", help="inference engine plugin (default: vllm)")
    parser.add_argument("--gateway-address", "-ga", default=None, help="gateway URL to register with, e.g. http://gw:4000")
    parser.add_argument(
        "--served-model-name", "--model-name", "-n", nargs="+", default=None,
        help="model name(s) clients use; the first is registered with the gateway (default: the model path)",
    )
    parser.add_argument("--heartbeat-interval", "--hi", type=float, default=30.0, help="seconds between heartbeats (default: 30)")
    parser.add_argument(
        "--log-streaming", "--ls", action=argparse.BooleanOptionalAction, default=True,
        help="serve this worker's logs at /logs/stream for the gateway (default: on; --no-log-streaming turns it off)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="bind port (default: 8001)")
    parser.add_argument("--worker-id", default=None, help="stable id for this worker (default: generated per process)")
    parser.add_argument("--advertise-host", default=None, help="host the gateway should dial, when it differs from --host")
    parser.add_argument(
        "--worker-token", default=os.environ.get("ICHAT_WORKER_TOKEN"),
        help="cluster token sent with heartbeats (default: $ICHAT_WORKER_TOKEN)",
    )
    parser.add_argument("--log-lines", type=int, default=10_000, help="log lines kept for /logs/stream (default: 10000)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM")
    parser.add_argument(
        "--report-prefix-cache", action=argparse.BooleanOptionalAction, default=False,
        help="report what the engine's prefix cache holds to the gateway, from the engine's KV-cache events, "
        "for the gateway's precise cache_aware routing (default: off; vLLM backend)",
    )
    return parser


def parse_worker_args(argv: list[str]) -> tuple[WorkerOptions, list[str], bool]:
    """Return (iChat options, engine argv, help requested)."""
    parser = build_parser()
    ns, engine_argv = parser.parse_known_args(argv)
    if ns.heartbeat_interval <= 0:
        parser.error("--heartbeat-interval must be > 0")
    options = WorkerOptions(
        backend=ns.backend,
        gateway_address=ns.gateway_address.rstrip("/") if ns.gateway_address else None,
        served_model_name=ns.served_model_name,
        heartbeat_interval=ns.heartbeat_interval,
        log_streaming=ns.log_streaming,
        host=ns.host,
        port=ns.port,
        worker_id=ns.worker_id or f"worker-{uuid.uuid4().hex[:12]}",
        advertise_host=ns.advertise_host,
        worker_token=ns.worker_token,
        log_lines=ns.log_lines,
        drain_timeout=ns.drain_timeout,
        report_prefix_cache=ns.report_prefix_cache,
    )
    return options, engine_argv, ns.help
