"""Pure: admin API answers -> rows -> an aligned text table. No I/O, no clock."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

WORKER_COLUMNS = ("WORKER", "STATE", "MODEL", "BACKEND", "ADDRESS", "GPUS", "LOAD", "HEARTBEAT", "RESTARTS")
MODEL_COLUMNS = ("MODEL", "REPLICAS", "ROUTABLE", "WORKERS")


def table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart; the header is the first line."""
    rows = [list(columns), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _gpus(view: Mapping[str, Any]) -> str:
    """The GPUs a worker reports (NVML inventory), else the ids the gateway gave it, else '-'."""
    gpus = view.get("gpus") or []
    if gpus:
        return ",".join(str(g.get("index", "?")) if isinstance(g, Mapping) else str(g) for g in gpus)
    ids = view.get("gpu_ids") or []
    return ",".join(map(str, ids)) if ids else "-"


def _load(view: Mapping[str, Any]) -> str:
    load = view.get("load") or {}
    if not isinstance(load, Mapping) or not load:
        return "-"
    running, waiting = load.get("running"), load.get("waiting")
    if running is None and waiting is None:
        return "-"
    return f"{int(running or 0)} run / {int(waiting or 0)} wait"


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def worker_state(view: Mapping[str, Any]) -> str:
    """The registry's word, with the supervisor's when it says more (e.g. backing_off)."""
    state = str(view.get("state") or "-")
    managed = view.get("managed_state")
    if managed and managed not in (state, "ready"):
        return f"{state} ({managed})"
    return state


def worker_rows(views: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            str(v.get("worker_id")),
            worker_state(v),
            str(v.get("model_name") or "-"),
            str(v.get("backend") or "-"),
            str(v.get("address") or "-"),
            _gpus(v),
            _load(v),
            _age(v.get("heartbeat_age_s")),
            str(v.get("restarts") or 0),
        ]
        for v in views
    ]


def workers_table(views: Iterable[Mapping[str, Any]]) -> str:
    rows = worker_rows(views)
    return table(WORKER_COLUMNS, rows) if rows else "no workers"


def model_rows(status: Mapping[str, Any], views: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    by_model: dict[str, list[str]] = {}
    for v in views:
        by_model.setdefault(str(v.get("model_name")), []).append(str(v.get("worker_id")))
    rows = []
    for name, counts in sorted((status.get("models") or {}).items()):
        workers = by_model.get(name) or []
        rows.append([name, str(counts.get("replicas", 0)), str(counts.get("routable", 0)), ",".join(workers) or "(static route)"])
    return rows


def models_table(status: Mapping[str, Any], views: Iterable[Mapping[str, Any]]) -> str:
    rows = model_rows(status, views)
    return table(MODEL_COLUMNS, rows) if rows else "no models"


def status_text(status: Mapping[str, Any], views: Sequence[Mapping[str, Any]], gateway_url: str) -> str:
    gateway = status.get("gateway") or {}
    workers = status.get("workers") or {}
    by_state = workers.get("by_state") or {}
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) or "none"
    lines = [
        f"gateway  {gateway_url}  up {_duration(gateway.get('uptime_s'))}, {gateway.get('reloads', 0)} reload(s)",
        f"workers  {workers.get('total', 0)}: {states}",
    ]
    gpus = status.get("gpu_ids_in_use") or {}
    if gpus:
        lines.append("gpus     " + "; ".join(f"{w}: {','.join(map(str, ids))}" for w, ids in sorted(gpus.items())))
    lines += [
        "",
        models_table(status, views),
        "",
        workers_table(views),
    ]
    return "\n".join(lines)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "?"
    seconds = int(float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def engine_flags(argv: Sequence[str]) -> dict[str, Any]:
    """vLLM-style flags from the command line -> a launch spec's engine flags (snake_case keys).

    ``--max-model-len 2048`` -> ``max_model_len: "2048"``; a flag followed by another flag (or
    nothing) is a switch (``True``); ``--x=v`` works; a repeated flag becomes a list. Raises
    ValueError for a word that is not a flag."""
    flags: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("--") or word == "--":
            raise ValueError(f"expected an engine flag (--name [value]), got {word!r}")
        name, eq, value = word[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            parsed: Any = value
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            parsed = argv[i + 1]
            i += 2
        else:
            parsed = True
            i += 1
        if key in flags:
            previous = flags[key]
            flags[key] = [*previous, parsed] if isinstance(previous, list) else [previous, parsed]
        else:
            flags[key] = parsed
    return flags
