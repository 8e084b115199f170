"""``ichat``'s command line: parse, run one command, print its answer or one error line.

Exit status: 0 on success, 1 when the gateway refused or could not be reached (one line on
stderr, never a traceback), 2 for a command line that does not parse, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson

from ichat.cli import views
from ichat.cli.chat import converse, stream_answer
from ichat.cli.client import DEFAULT_GATEWAY, CliError, GatewayClient
from ichat.cli.logs import LogFollower

SERVERS = ("gateway", "worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichat",
        description="iChat: run the gateway or a worker, and operate a running gateway.",
        epilog="`ichat gateway --help` and `ichat worker --help` list the servers' own flags.",
    )
    parser.add_argument(
        "--gateway", "-g", default=os.environ.get("ICHAT_GATEWAY") or DEFAULT_GATEWAY,
        help=f"gateway URL (default: $ICHAT_GATEWAY or {DEFAULT_GATEWAY})",
    )
    parser.add_argument(
        "--admin-key", default=os.environ.get("ICHAT_ADMIN_KEY"),
        help="admin key for /v1/admin and /v1/logs (default: $ICHAT_ADMIN_KEY)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("ICHAT_API_KEY"),
        help="client key for `ichat chat` (default: $ICHAT_API_KEY, else the admin key)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("gateway", help="run the gateway (python -m ichat.gateway)", add_help=False)
    sub.add_parser("worker", help="run a worker (python -m ichat.worker)", add_help=False)

    for name, text in (("status", "the cluster at a glance"), ("workers", "every worker"), ("models", "replicas per model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="the admin API's JSON, for scripts")

    p = sub.add_parser("logs", help="worker logs (one worker, or all interleaved)")
    p.add_argument("worker", nargs="?", help="worker id (default: all workers)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines; survives dropped connections")
    p.add_argument("--tail", type=_non_negative, default=100, help="lines of backlog first (default: 100)")
    p.add_argument(
        "--source", choices=("worker", "console"), default="worker",
        help="worker: what the worker process and its engine printed, mirrored over SSE; "
        "console: the stdout/stderr the gateway captured from a worker it started",
    )

    p = sub.add_parser(
        "launch", help="start a managed worker on the gateway's machine",
        description="Start a managed worker. Flags after the known ones are engine flags in vLLM's "
        "names, e.g. --max-model-len 2048 --enforce-eager.",
    )
    p.add_argument("--model-name", required=True, help="the name clients use")
    p.add_argument("--model-path", required=True, help="model directory on the gateway's machine")
    p.add_argument("--port", type=int, required=True, help="the worker's port")
    p.add_argument("--backend", default=None, help="engine plugin (default: the gateway's default, vllm)")
    p.add_argument("--gpu-ids", default=None, help="comma-separated GPU indices (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--host", default=None, help="the worker's bind address (default: 127.0.0.1)")
    p.add_argument("--heartbeat-interval", type=float, default=None, help="seconds between heartbeats")
    p.add_argument("--json", action="store_true", help="print the admin API's answer as JSON")

    p = sub.add_parser("stop", help="stop and remove a managed worker (deregister a hand-started one)")
    p.add_argument("worker", help="worker id (see `ichat workers`)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reload", help="re-read the gateway's config file and reconcile now")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("chat", help="stream an answer; without PROMPT, a conversation on stdin")
    p.add_argument("model")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _dump(data: Any) -> str:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


async def _status(client: GatewayClient, args: argparse.Namespace) -> int:
    status = await client.request("GET", "/v1/admin/cluster/status", what="status")
    workers = (await client.request("GET", "/v1/admin/workers", what="status"))["data"]
    if args.json:
        print(_dump({"status": status, "workers": workers}))
    else:
        print(views.status_text(status, workers, client.base_url))
    return 0


async def _workers(client: GatewayClient, args: argparse.Namespace) -> int:
    workers = (await client.request("GET", "/v1/admin/workers", what="workers"))["data"]
    print(_dump(workers) if args.json else views.workers_table(workers))
    return 0


async def _models(client: GatewayClient, args: argparse.Namespace) -> int:
    status = await client.request("GET", "/v1/admin/cluster/status", what="models")
    workers = (await client.request("GET", "/v1/admin/workers", what="models"))["data"]
    if args.json:
        print(_dump(status.get("models") or {}))
    else:
        print(views.models_table(status, workers))
    return 0


async def _logs(client: GatewayClient, args: argparse.Namespace) -> int:
    follower = LogFollower(client, args.worker, tail=args.tail, follow=args.follow, source=args.source)
    return await follower.run()


async def _launch(client: GatewayClient, args: argparse.Namespace) -> int:
    try:
        spec: dict[str, Any] = views.engine_flags(args.engine_argv)
    except ValueError as exc:
        raise CliError(f"launch: {exc}", exit_code=2) from exc
    spec.update(model_name=args.model_name, model_path=args.model_path, port=args.port)
    for key in ("backend", "host", "heartbeat_interval"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.gpu_ids:
        try:
            spec["gpu_ids"] = [int(x) for x in args.gpu_ids.split(",") if x.strip()]
        except ValueError as exc:
            raise CliError(f"launch: --gpu-ids takes comma-separated integers, got {args.gpu_ids!r}", exit_code=2) from exc
    answer = await client.request("POST", "/v1/admin/workers/launch", json=spec, what="launch")
    if args.json:
        print(_dump(answer))
    else:
        print(f"launched {answer['worker_id']}; follow its start with `ichat logs {answer['worker_id']} -f`")
    return 0


async def _stop(client: GatewayClient, args: argparse.Namespace) -> int:
    answer = await client.request("DELETE", "/v1/admin/workers/" + quote(args.worker, safe=""), what="stop")
    print(_dump(answer) if args.json else f"{answer['worker_id']}: {answer.get('message', 'removed')}")
    return 0


async def _reload(client: GatewayClient, args: argparse.Namespace) -> int:
    answer = await client.request("POST", "/v1/admin/config/reload", what="reload")
    if args.json:
        print(_dump(answer))
    else:
        parts = [f"{key}: {', '.join(answer.get(key) or []) or '-'}" for key in ("started", "stopped", "restarted")]
        print(f"config {answer.get('status', 'applied')}; " + "; ".join(parts) + f"; routes: {answer.get('routes', 0)}")
    return 0


async def _chat(client: GatewayClient, args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}
    if args.prompt is None:
        return await converse(client, args.model, sys.stdout, options, args.system)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    await stream_answer(client, args.model, messages, sys.stdout, options)
    return 0


COMMANDS: dict[str, Callable[[GatewayClient, argparse.Namespace], Awaitable[int]]] = {
    "status": _status, "workers": _workers, "models": _models, "logs": _logs,
    "launch": _launch, "stop": _stop, "reload": _reload, "chat": _chat,
}  # fmt: skip


async def _run(args: argparse.Namespace) -> int:
    if not args.gateway.startswith(("http://", "https://")):
        raise CliError(f"the gateway address must be a URL like http://host:4000, got {args.gateway!r}; set --gateway or ICHAT_GATEWAY", 2)
    async with GatewayClient(args.gateway, admin_key=args.admin_key, api_key=args.api_key) as client:
        try:
            return await COMMANDS[args.command](client, args)
        except (KeyError, TypeError, AttributeError) as exc:
            # a 200 answer without the fields iChat's admin API sends
            raise CliError(f"{args.command}: unexpected answer from {client.base_url} (missing {exc}); is it an iChat gateway?") from exc


def _server(name: str, argv: list[str]) -> int:
    if name == "gateway":
        from ichat.gateway.__main__ import main as gateway_main

        return gateway_main(argv)
    from ichat.worker.__main__ import main as worker_main

    return worker_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The servers keep their own parsers (the worker passes unknown flags to its engine).
    for i, word in enumerate(argv):
        if word in SERVERS and all(w.startswith("-") for w in argv[:i]):
            return _server(word, argv[i + 1 :])
        if not word.startswith("-"):
            break
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in SERVERS:  # after global flags: `ichat -g URL worker ...`
        return _server(args.command, argv[argv.index(args.command) + 1 :])
    if args.command == "launch":
        args.engine_argv = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return asyncio.run(_run(args))
    except CliError as err:
        print(f"ichat: {err.message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`ichat logs | head`): not an error; keep Python from
        # complaining again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
