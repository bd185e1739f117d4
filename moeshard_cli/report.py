"""Rich output: progress bars and summary tables. No computation lives here."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def byte_progress(console: Console, label: str):
    """Yields `start(total) -> advance(n)`: a byte progress bar that appears once the total is known."""
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        def start(total: int):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield start


def print_shard_summary(console: Console, result) -> None:
    cfg = result.source.config
    table = Table(title=f"shard set {result.out}", title_justify="left")
    for col in ("rank", "file", "size", "d_ff slice", "width"):
        table.add_column(col, justify="right" if col not in ("file",) else "left")
    for f, (lo, hi) in zip(result.files, result.bounds):
        table.add_row(str(f["rank"]), f["name"], human_bytes(f["bytes"]), f"[{lo}, {hi})", str(hi - lo))
    console.print(table)
    rate = result.bytes_written / max(result.seconds, 1e-9)
    console.print(
        f"source [bold]{result.source.label}[/] ({result.source.kind}), {len(result.sparse_layers)} MoE layers x "
        f"{cfg.num_experts} experts per layer, d_model {cfg.d_model}, d_ff {cfg.d_ff}, dtype {result.dtype}\n"
        f"wrote {human_bytes(result.bytes_written)} in {result.seconds:.1f} s ({human_bytes(rate)}/s) to [bold]{result.out}[/]"
    )


def print_run_summary(console: Console, summary) -> None:
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
