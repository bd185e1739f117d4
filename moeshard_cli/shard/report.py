"""The summary `moeshard shard` prints."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moeshard_cli.ui import human_bytes


def print_shard_summary(console: Console, result) -> None:
    dims = result.source.dims
    table = Table(title=f"shard set {result.out}", title_justify="left")
    for col in ("rank", "file", "size", "d_ff slice", "width"):
        table.add_column(col, justify="right" if col not in ("file",) else "left")
    for f, (lo, hi) in zip(result.files, result.bounds):
        table.add_row(str(f["rank"]), f["name"], human_bytes(f["bytes"]), f"[{lo}, {hi})", str(hi - lo))
    console.print(table)
    rate = result.bytes_written / max(result.seconds, 1e-9)
    console.print(
        f"source [bold]{result.source.label}[/] ({result.source.kind}, {result.source.family.name}), {len(result.sparse_layers)} MoE layers x "
        f"{dims.num_experts} experts per layer (top-{dims.top_k}), d_model {dims.d_model}, d_ff {dims.d_ff}, dtype {result.dtype}"
        f"{', dequantized from ' + result.source.extra['dequantized_from'] if 'dequantized_from' in result.source.extra else ''}\n"
        f"wrote {human_bytes(result.bytes_written)} in {result.seconds:.1f} s ({human_bytes(rate)}/s) to [bold]{result.out}[/]"
    )
