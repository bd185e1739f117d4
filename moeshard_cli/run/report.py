"""The summary `moeshard run` prints."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_run_summary(console: Console, summary) -> None:
    if summary.already_complete:
        return  # run() said so on stderr; stdout stays empty
    fig = summary.figures()
    if not fig:
        console.print(f"this node's workers finished; rank 0 (on another node) wrote {summary.output}")
        return
    table = Table(title=f"moeshard run: {fig['world_size']} workers on {fig['device']} ({fig['backend']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    ttft, spread = fig["ttft_s"], fig["token_spread"]
    rows = [
        ("lines", f"{fig['lines']:,}" + (f" ({fig['truncated_lines']:,} truncated)" if fig["truncated_lines"] else "")),
        ("tokens", f"{fig['tokens']:,}"),
    ]
    if fig["resumed_at_line"]:
        rows.append(("resumed at line", f"{fig['resumed_at_line']:,} (encoded {fig['lines_encoded']:,} lines now)"))
    rows += [
        ("wall time (command / encode loop)", f"{fig['wall_s']:.2f} s / {fig['loop_s']:.2f} s"),
        ("tokens/s (command / encode loop)", f"{fig['tokens_per_s']:,.0f} / {fig['loop_tokens_per_s']:,.0f}"),
        ("batches per worker", str(fig["batches"])),
        ("TTFT per batch mean / p50 / p90", f"{ttft['mean'] * 1e3:.1f} / {ttft['p50'] * 1e3:.1f} / {ttft['p90'] * 1e3:.1f} ms"),
        ("token spread per step mean / max", f"{spread['mean']:.3f} / {spread['max']:.3f}"),
        ("padding", f"{fig['padding_fraction']:.1%}"),
        ("expert compute per worker", f"{fig['compute_s'] * 1e3:,.1f} ms"),
        ("communication per worker", f"{fig['comm_s'] * 1e3:,.1f} ms"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    layers = Table(title="expert load per MoE layer (tokens per expert over the run)", title_justify="left")
    for col in ("layer", "max", "mean", "max/mean", "tokens per worker"):
        layers.add_column(col, justify="right")
    for l in fig["layers"]:
        ratio = l["max_tokens_per_expert"] / l["mean_tokens_per_expert"] if l["mean_tokens_per_expert"] else 0.0
        layers.add_row(str(l["layer"]), str(l["max_tokens_per_expert"]), f"{l['mean_tokens_per_expert']:.1f}", f"{ratio:.2f}",
                       ", ".join(str(t) for t in l["tokens_per_worker"]))
    console.print(layers)
    console.print(f"wrote [bold]{summary.output}[/]")
