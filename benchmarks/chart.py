"""Draw `make bench`'s results (gateway_overhead.py --json) as one PNG for README.

    python benchmarks/chart.py RESULTS.json OUT.png

Four panels, one per cell, a bar per target (direct, sglang-router, ichat): what a gateway adds
at concurrency 1 (p50 and p99, over the direct path), requests/s and streamed responses/s at
concurrency 32, and the stream's time to first chunk at concurrency 1. matplotlib is needed for
this only; `make bench` installs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#9aa0ab", "sglang-router": "#d9822b", "ichat": "#2f5bd3"}


def value(results: dict, target: str, cell: str, key: str) -> float | None:
    return results.get(target, {}).get(cell, {}).get(key)


def added(results: dict, target: str, cell: str, key: str) -> float | None:
    v, base = value(results, target, cell, key), value(results, "direct", cell, key)
    return None if v is None or base is None else v - base


def bars(ax, labels: list[str], values: list[float | None], title: str, unit: str) -> None:
    shown = [(label, v) for label, v in zip(labels, values) if v is not None]
    ax.bar([l for l, _ in shown], [v for _, v in shown], color=[COLORS.get(l, "#555") for l, _ in shown])
    for i, (_, v) in enumerate(shown):
        ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)


def draw(results: dict, out: Path) -> None:
    gateways = [t for t in ("sglang-router", "ichat") if t in results]
    every = [t for t in ("direct", "sglang-router", "ichat") if t in results]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), dpi=90)
    bars(axes[0], [f"{t}\np50" for t in gateways] + [f"{t}\np99" for t in gateways],
         [added(results, t, "json_c1", "p50_ms") for t in gateways] + [added(results, t, "json_c1", "p99_ms") for t in gateways],
         "added latency, c=1 (lower is better)", "ms")  # fmt: skip
    for patch, label in zip(axes[0].patches, gateways * 2):
        patch.set_color(COLORS[label])
    bars(axes[1], every, [value(results, t, "json_c32", "rps") for t in every], "requests/s, c=32", "req/s")
    bars(axes[2], every, [value(results, t, "stream_c32", "rps") for t in every], "streamed responses/s, c=32 (64 chunks)", "streams/s")
    bars(axes[3], gateways, [added(results, t, "stream_c1", "ttfc_p50_ms") for t in gateways], "added time to first chunk, c=1", "ms")
    fig.suptitle("Gateway overhead: the same fake upstream direct, through sglang-router, through iChat", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    draw(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    print(f"chart: {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
