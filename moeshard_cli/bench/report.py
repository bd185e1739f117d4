"""Bench results for people (rich tables, a PNG like the paper's Figure 3) and machines (JSON)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.console import Console
from rich import box
from rich.measure import Measurement
from rich.table import Table

from moeshard_cli.files import write_atomic, write_json_atomic
from moeshard_cli.ui import quantile

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def median(cell: dict) -> float | None:
    """The cell's median TTFT in ms."""
    return statistics.median(cell["samples_ms"]) if cell.get("samples_ms") else None


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


def duration(ms: float) -> str:
    """A TTFT as the tables show it: "850 ms", "12.4 ms", "35.9 s"."""
    if ms >= 1000:
        return f"{ms / 1e3:,.1f} s"
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def spread(samples_ms: list[float]) -> str:
    """p10-p90 in the unit of its upper end: "830-870 ms", "1.0-1.2 s"."""
    lo, hi = quantile(samples_ms, 0.1), quantile(samples_ms, 0.9)
    if hi >= 1000:
        return f"{lo / 1e3:,.1f}-{hi / 1e3:,.1f} s"
    digits = 0 if hi >= 100 else 1
    return f"{lo:.{digits}f}-{hi:.{digits}f} ms"


COLUMNS = ("E", "B", "skew", "system", "TTFT", "p10-p90", "n", "speedup", "drop", "imb", "|Δ|")
CAPTION = ("E: experts; B: sequences per worker; TTFT: one forward to the last hidden states, median and p10-p90 over n; "
           "speedup: the system's median over moeshard's; drop: (token, expert) assignments DeepSpeed dropped; imb: busiest "
           "worker's share of expert tokens x workers; |Δ|: largest output difference to moeshard")


def figures(c: dict, up: float | None) -> list[str]:
    """A measured cell's columns after its configuration and system."""
    s, diff = c["samples_ms"], c.get("max_abs_diff_vs_moeshard")
    return [duration(median(c)), spread(s), f"{len(s):,}", f"{up:.2f}x" if up else "-", f"{c['dropped_pct']:.1f}%",
            f"{c['imbalance']:.2f}", f"{diff:.0e}" if diff is not None and c["system"] != "moeshard" else "-"]


def results_table(cells: list[dict], title: str, narrow: bool) -> tuple[Table, list[str]]:
    """Every cell a row, or (narrow) each configuration a heading row over its systems, which
    saves the three configuration columns and a space between columns: 78 characters wide with
    the longest system name. Narrower still, a cell folds onto a second line rather than lose
    digits. Skipped cells point to a note below the table."""
    ups, notes = speedups(cells), []
    table = Table(title=title, title_justify="left", caption=CAPTION, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=narrow, show_edge=not narrow)
    for col in COLUMNS[3:] if narrow else COLUMNS:
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=not narrow, overflow="fold")
    last = None
    for c in cells:
        key = (c["experts"], c["batch_size"], c["skew"])
        where = [f"{c['experts']:,}", f"{c['batch_size']:,}", f"{c['skew']:g}"]
        if narrow and key != last:
            table.add_row(f"[bold]E={where[0]} B={where[1]} skew {where[2]}[/]", end_section=False)
            last = key
        head = [c["system"]] if narrow else [*where, c["system"]]
        if c.get("skipped"):
            notes.append(f"[{len(notes) + 1}] E={where[0]} B={where[1]} skew {where[2]} {c['system']}: {c['skipped']}")
            table.add_row(*head, f"[yellow]skipped [{len(notes)}][/]", *[""] * 6)
        else:
            table.add_row(*head, *figures(c, ups[key].get(c["system"])))
    return table, notes


def print_tables(console: Console, result: dict, per_layer: bool) -> None:
    cells = result["cells"]
    cfg = result["config"]
    title = f"TTFT, {cfg['workers']} workers on {cfg['device']}, seq {cfg['seq_len']:,}, hot experts {cfg['hot_experts']:g}"
    table, notes = results_table(cells, title, narrow=False)
    if Measurement.get(console, console.options.update_width(10_000), table).maximum > console.width:  # its natural width
        table, notes = results_table(cells, title, narrow=True)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, markup=False)
    if per_layer:
        layers = Table(title="MoE layer latency (median per layer)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        first = next((c for c in cells if c.get("per_layer_ms")), None)
        names = list(first["per_layer_ms"]) if first else []
        for col in ("E", "B", "skew", "system", *[f"layer {n}" for n in names]):
            layers.add_column(col, justify="left" if col == "system" else "right")
        for c in cells:
            if c.get("per_layer_ms"):
                layers.add_row(f"{c['experts']:,}", f"{c['batch_size']:,}", f"{c['skew']:g}", c["system"],
                               *[duration(statistics.median(v)) if v else "-" for v in c["per_layer_ms"].values()])
        console.print(layers)


def write_json(path: Path, result: dict) -> None:
    write_json_atomic(path, json.loads(json.dumps(result, default=str)))


# Fixed per system, so every figure colors a system the same way.
SYSTEM_COLORS = {"moeshard": "tab:blue", "deepspeed": "tab:red", "deepspeed-dropless": "tab:orange",
                 "ep": "tab:green", "hf": "tab:purple", "tp": "tab:brown"}
# The sweep axes, in the key order of `speedups`: cell key -> (axis label, how a value reads in a title or legend).
AXES = {"experts": ("experts E", "E={:g}"), "batch_size": ("batch size (sequences per worker)", "B={:g}"),
        "skew": ("skew", "skew {:g}")}
# A system has one color and one marker in every panel (the figure's legend); a line style tells
# apart the combinations of the other swept axes, which differ per panel (each panel's legend).
SYSTEM_MARKERS = {"moeshard": "o", "deepspeed": "s", "deepspeed-dropless": "D", "ep": "^", "hf": "v", "tp": "P"}
STYLES = ["-", "--", ":", "-."]


def measured(cells: list[dict]) -> list[dict]:
    return [c for c in cells if not c.get("skipped") and c.get("samples_ms")]


def swept_axes(cells: list[dict]) -> list[str]:
    """The axes with more than one value among the measured cells."""
    return [a for a in AXES if len({c[a] for c in cells}) > 1]


def systems_of(records: list[dict]) -> list[str]:
    """moeshard first, then the baselines, in a fixed order."""
    present = {r["system"] for r in records}
    return [s for s in SYSTEM_COLORS if s in present] + sorted(present - set(SYSTEM_COLORS))


def color(system: str) -> str:
    return SYSTEM_COLORS.get(system, "tab:gray")


def marker(system: str) -> str:
    return SYSTEM_MARKERS.get(system, "x")


def describe(values: dict) -> str:
    return ", ".join(AXES[a][1].format(v) for a, v in values.items())


def latency_ms(cell: dict) -> tuple[float, float, float]:
    """Median, p10 and p90 of the cell's TTFT in ms."""
    s = cell["samples_ms"]
    return median(cell), quantile(s, 0.1), quantile(s, 0.9)


def speedup_records(cells: list[dict]) -> list[dict]:
    """One record per (configuration, baseline), shaped like a cell: its sweep keys, the baseline as
    `system`, and moeshard's speedup over it as `up`."""
    return [dict(zip(AXES, key), system=base, up=up) for key, by_base in speedups(cells).items() for base, up in by_base.items()]


def line_groups(records: list[dict], axis: str, swept: list[str]) -> tuple[list[str], list[tuple], str]:
    """The other swept axes, their value combinations that get one line each along `axis`, and a
    note for the panel title. Past len(STYLES) combinations the lines stop being tellable apart, so
    the other axes are pinned to their first value instead."""
    others = [a for a in swept if a != axis]
    combos = sorted({tuple(r[a] for a in others) for r in records})
    if len(combos) > len(STYLES):
        return others, combos[:1], f" (at {describe(dict(zip(others, combos[0])))})"
    return others, combos, ""


def draw_lines(ax, records: list[dict], axis: str, swept: list[str], y: Callable[[dict], tuple[float, float, float]]) -> str:
    """One line per system and combination of the other swept axes; `y(record)` is (value, low, high),
    drawn as error bars where low < high. Returns the panel-title note of `line_groups`."""
    from matplotlib.lines import Line2D

    others, combos, note = line_groups(records, axis, swept)
    for system in systems_of(records):
        for ls, combo in zip(STYLES, combos):
            pts = sorted((r[axis], *y(r)) for r in records if r["system"] == system and tuple(r[a] for a in others) == combo)
            if not pts:
                continue
            x, mid, lo, hi = zip(*pts)
            spread = [[m - v for m, v in zip(mid, lo)], [v - m for m, v in zip(mid, hi)]]
            ax.errorbar(x, mid, yerr=spread if any(map(any, spread)) else None, color=color(system), ls=ls,
                        marker=marker(system), ms=5, capsize=3)
    if len(combos) > 1:  # colors are in the figure legend; this one says which line style is which
        ax.legend(handles=[Line2D([], [], color="black", ls=ls, label=describe(dict(zip(others, combo))))
                           for ls, combo in zip(STYLES, combos)], fontsize=8)
    return note


def log_y_if_wide(ax, values: list[float]) -> None:
    """Log scale once the values span more than 10x, ticked 1, 2, 5 per decade in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())


def set_x_ticks(ax, axis: str, values: list) -> None:
    """Ticks at exactly the swept values; experts and batch sizes double, so log2 spaces them evenly."""
    from matplotlib.ticker import NullLocator

    if axis != "skew":
        ax.set_xscale("log", base=2)
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(AXES[axis][0])


def draw_latency(ax, cells: list[dict], axis: str, swept: list[str]) -> None:
    note = draw_lines(ax, cells, axis, swept, latency_ms)
    log_y_if_wide(ax, [median(c) for c in cells])
    ax.set_ylabel("TTFT ms (median, p10-p90)")
    ax.set_title(f"latency per system{note}", fontsize=10)


def draw_speedup(ax, cells: list[dict], axis: str, swept: list[str]) -> None:
    records = speedup_records(cells)
    note = draw_lines(ax, records, axis, swept, lambda r: (r["up"],) * 3)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    log_y_if_wide(ax, [r["up"] for r in records] + [1.0])
    ax.set_ylabel("moeshard speedup (baseline ms / moeshard ms)", fontsize=9)
    ax.set_title(f"speedup of moeshard over each baseline{note}", fontsize=10)


def draw_bars(ax, cells: list[dict]) -> None:
    """A single configuration: one bar per system, its median and moeshard's speedup written above it."""
    by_system = {c["system"]: c for c in cells}
    names = systems_of(cells)
    ms = [latency_ms(by_system[s]) for s in names]
    ax.bar(names, [m for m, _, _ in ms], color=[color(s) for s in names], width=0.6,
           yerr=[[m - lo for m, lo, _ in ms], [hi - m for m, _, hi in ms]], capsize=4)
    ups = {r["system"]: r["up"] for r in speedup_records(cells)}
    for x, (s, (m, _, hi)) in enumerate(zip(names, ms)):
        label = f"{m:,.0f} ms" + (f"\nmoeshard {ups[s]:.2f}x faster" if s in ups else "")
        ax.annotate(label, (x, hi), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=9)
    ax.margins(y=0.2)
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.set_ylabel("TTFT ms (median, p10-p90)")
    ax.set_title("latency per system", fontsize=10)


def titles(result: dict, cells: list[dict], swept: list[str]) -> tuple[str, str, str]:
    """What ran, its settings (every axis not swept included) and on what machine."""
    cfg = result["config"]
    models = sorted({c["model"] for c in cells})
    model = cfg.get("model") or (models[0] if len(models) == 1 else "switch-base-E")
    settings = [f"seq {cfg['seq_len']}", describe({a: cells[0][a] for a in AXES if a not in swept and a != "experts"}),
                f"{cfg['hot_experts'] * 100:g}% hot experts"]
    if any(c["system"] == "deepspeed" for c in cells):  # the dropless variant has no capacity to set
        cf = cfg.get("capacity_factor")
        settings.append(f"DeepSpeed capacity factor {cf:g}" if cf is not None else "DeepSpeed capacity factor min(E, 50)")
    machine = result.get("machine", {})
    cpu = f"{machine['cpu']} ({machine['cores']} cores)" if machine.get("cores") else machine.get("cpu")
    return (f"moeshard bench: {model}, {cfg['workers']} workers on {cfg['device']}", ", ".join(s for s in settings if s),
            " + ".join(h for h in (cpu, machine.get("gpu")) if h))


def figure(result: dict) -> Figure:
    """The Figure-3 style figure: per swept axis, a column with each system's latency above moeshard's
    speedup over each baseline; a single configuration gets bars instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cells = measured(result["cells"])
    if not cells:  # the bench still finished; its table says why each cell was skipped
        fig = plt.figure(figsize=(7, 2.5))
        fig.text(0.5, 0.5, "moeshard bench: nothing to plot, every cell was skipped", ha="center", va="center")
        return fig
    swept = swept_axes(cells)
    rows = 2 if swept and speedup_records(cells) else 1
    cols = max(1, len(swept))
    width = 1.5 + 5.5 * cols if swept else max(7.0, 1.7 * len(cells))  # bars: room for each label
    fig, axes = plt.subplots(rows, cols, figsize=(width, 1.8 + 3.6 * rows), squeeze=False)
    if not swept:
        draw_bars(axes[0][0], cells)
    for col, axis in enumerate(swept):
        draw_latency(axes[0][col], cells, axis, swept)
        if rows == 2:
            draw_speedup(axes[1][col], cells, axis, swept)
        for row in range(rows):
            set_x_ticks(axes[row][col], axis, sorted({c[axis] for c in cells}))
    inch = 1 / fig.get_figheight()  # the title block and the legend are sized in inches
    for y, text, size, shade in zip((0.15, 0.45, 0.72), titles(result, cells, swept), (12, 10, 8), ("black", "black", "dimgray")):
        fig.text(0.5, 1 - y * inch, text, ha="center", va="top", fontsize=size, color=shade)
    if swept:
        fig.legend(handles=[Line2D([], [], color=color(s), marker=marker(s), label=s) for s in systems_of(cells)],
                   loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.4 * inch if swept else 0, 1, 1 - 1.0 * inch))
    return fig


def plot(path: Path, result: dict) -> None:
    """Write `figure(result)` as a PNG (Figure 3 of the paper)."""
    fig = figure(result)
    import matplotlib.pyplot as plt

    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
