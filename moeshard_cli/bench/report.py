"""Bench results for people (rich tables, a PNG like the paper's Figure 3) and machines (JSON)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console
from rich import box
from rich.table import Table

from moeshard_cli.files import write_atomic, write_json_atomic
from moeshard_cli.ui import quantile


def median(cell: dict) -> float | None:
    return statistics.median(cell["samples"]) if cell.get("samples") else None


def speedups(cells: list[dict]) -> dict[tuple, dict[str, float]]:
    """(experts, batch, skew) -> {baseline: median(baseline) / median(moeshard)}."""
    groups: dict[tuple, dict[str, dict]] = {}
    for c in cells:
        groups.setdefault((c["experts"], c["batch_size"], c["skew"]), {})[c["system"]] = c
    out = {}
    for key, by_system in groups.items():
        ms = median(by_system.get("moeshard", {}))
        out[key] = {s: median(c) / ms for s, c in by_system.items() if s != "moeshard" and ms and median(c)}
    return out


def print_tables(console: Console, result: dict, per_layer: bool) -> None:
    cells = result["cells"]
    ups = speedups(cells)
    cfg = result["config"]
    title = f"TTFT, {cfg['workers']} workers on {cfg['device']}, seq {cfg['seq_len']}, hot experts {cfg['hot_experts']}"
    table = Table(title=title, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="B: sequences per worker; ms: TTFT (one encoder forward), median and p10-p90 over n; speedup: the "
                          "system's median over moeshard's; drop: tokens DeepSpeed dropped; imb: busiest worker's share of "
                          "expert tokens x workers; |Δ|: largest output difference to moeshard")
    for col in ("E", "B", "skew", "system", "ms", "p10-p90", "n", "speedup", "drop", "imb", "|Δ|"):
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
    for c in cells:
        key = (c["experts"], c["batch_size"], c["skew"])
        head = [str(c["experts"]), str(c["batch_size"]), f"{c['skew']:g}", c["system"]]
        if c.get("skipped"):
            table.add_row(*head, f"[yellow]skipped: {c['skipped']}[/]", "", "", "", "", "", "")
            continue
        s = c["samples"]
        up = ups[key].get(c["system"])
        diff = c.get("max_abs_diff_vs_moeshard")
        table.add_row(*head, f"{median(c) * 1e3:,.0f}", f"{quantile(s, 0.1) * 1e3:,.0f}-{quantile(s, 0.9) * 1e3:,.0f}", str(len(s)),
                      f"{up:.2f}x" if up else "-", f"{c['dropped_pct']:.1f}%", f"{c['imbalance']:.2f}",
                      f"{diff:.0e}" if diff is not None and c["system"] != "moeshard" else "-")
    console.print(table)
    if per_layer:
        layers = Table(title="MoE layer latency (median per layer, ms)", title_justify="left")
        first = next((c for c in cells if c.get("per_layer")), None)
        names = list(first["per_layer"]) if first else []
        for col in ("E", "batch", "skew", "system", *[f"layer {n}" for n in names]):
            layers.add_column(col, justify="left" if col == "system" else "right")
        for c in cells:
            if c.get("per_layer"):
                layers.add_row(str(c["experts"]), str(c["batch_size"]), f"{c['skew']:g}", c["system"],
                               *[f"{statistics.median(v) * 1e3:,.1f}" if v else "-" for v in c["per_layer"].values()])
        console.print(layers)


def write_json(path: Path, result: dict) -> None:
    write_json_atomic(path, json.loads(json.dumps(result, default=str)))


def plot(path: Path, result: dict) -> None:
    """Speedup of moeshard over each baseline against experts and against batch size (Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = speedups(result["cells"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, axis, label in ((axes[0], 0, "experts"), (axes[1], 1, "batch size (sequences per worker)")):
        plotted = 0
        series: dict[tuple, list] = {}
        for (E, B, skew), by_base in ups.items():
            for base, up in by_base.items():
                other = B if axis == 0 else E
                series.setdefault((base, skew, other), []).append(((E, B)[axis], up))
        for (base, skew, other), pts in sorted(series.items()):
            if len(pts) < 2:  # a single point is not a curve along this axis
                continue
            pts.sort()
            fixed = f"batch {other}" if axis == 0 else f"E={other}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vs {base}, skew {skew:g}, {fixed}")
            plotted += 1
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("TTFT speedup of moeshard")
        if axis == 0:
            ax.set_xscale("log", base=2)
        if plotted:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "sweep has a single point on this axis", ha="center", transform=ax.transAxes)
    fig.suptitle(f"moeshard bench: {result['config']['workers']} workers on {result['config']['device']}")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
