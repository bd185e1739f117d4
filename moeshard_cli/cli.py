"""The `moeshard` command line: shard, run, bench, demo."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from moeshard_cli import __version__
from moeshard_cli.choices import BUILTIN_MODELS, Dtype, complete_model
from moeshard_cli.declare import command_options
from moeshard_cli.run.options import RunOptions
from moeshard_cli.shard.builtin import DEFAULT_MODEL
from moeshard_cli.errors import Interrupted, UserError

app = typer.Typer(
    name="moeshard",
    help="Fast, dropless Mixture-of-Experts inference by expert sharding (MoEShard): Switch, Qwen3-MoE, OLMoE, Mixtral.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: no boxes in pipes and docs, no `<bool>` after a flag
    context_settings={"max_content_width": 120},  # as wide as the terminal, up to 120 columns (click stops at 80)
)
PIPED_WIDTH = 240


def make_console(stderr: bool = False) -> Console:
    """Tables keep their columns when the output is piped (CI logs, `| tee`): rich would cut them to 80."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=PIPED_WIDTH)
    return console


console = make_console()
err_console = make_console(stderr=True)
STATE = {"debug": False}


def _version(value: bool):
    if value:
        console.print(f"moeshard {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    STATE["debug"] = debug
    if not debug:  # torch's C++ side logs connection retries and stack traces straight to stderr
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")


@app.command()
def shard(
    source: str = typer.Argument(DEFAULT_MODEL, autocompletion=complete_model, help=f"Hub id (google/switch-base-128, Qwen/Qwen3-30B-A3B), local checkpoint directory, shard set, or built-in name ({', '.join(BUILTIN_MODELS)})."),
    gpus: int = typer.Option(..., "--gpus", "-n", help="Number of ranks (GPUs or CPU workers) to slice the experts for."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: ./moeshard-shards/<model>-w<gpus>)."),
    dtype: Dtype = typer.Option("float32", "--dtype", help="Data type of the rank files."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) for hub ids."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing shard set in --out."),
):
    """Slice a checkpoint into per-rank safetensors files (a slice of every expert each)."""
    from moeshard_cli.shard.report import print_shard_summary
    from moeshard_cli.ui import byte_progress
    from moeshard_cli.shard.command import ShardOptions, shard as do_shard

    with byte_progress(console, "sharding") as progress:
        result = do_shard(ShardOptions(source, gpus, out, dtype, revision, force), progress)
    print_shard_summary(console, result)


@app.command()
@command_options(RunOptions)  # every flag of `run` is declared once, in run/options.py
def run(**flags):
    """Encode a corpus with one worker per rank of a shard set: embeddings, or per-line scores (--score)."""
    from moeshard_cli.run.report import print_run_summary
    from moeshard_cli.run.command import run as do_run
    from moeshard_cli.shard.cache import settle_shards
    from moeshard_cli.ui import byte_progress

    opts = RunOptions(**flags, debug=STATE["debug"], show_progress=console.is_terminal)
    with byte_progress(console, "sharding") as progress:  # seen only when --model cuts a set on first use
        settle_shards(opts, progress, on_cut=_print_cut, note=lambda line: err_console.print(f"note: {escape(line)}"))
    summary = do_run(opts)
    print_run_summary(err_console if str(opts.json_path) == "-" else console, summary)  # --json -: stdout holds only the JSON
    if opts.json_path and summary.result is not None:  # only the node that hosts rank 0 has the figures
        write_json_or_stdout(opts.json_path, summary.figures())


def write_json_or_stdout(path: Path, obj) -> None:
    """--json FILE, written atomically; --json - prints it on standard output."""
    if str(path) == "-":
        import json

        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()
        return
    from moeshard_cli.files import write_json_atomic

    write_json_atomic(path, obj)


def _print_cut(result) -> None:
    err_console.print(f"cut {escape(result.source.label)} for {result.world} workers ({result.dtype}) into {escape(str(result.out))} "
                  f"in {result.seconds:.1f} s: first use, later runs reuse it")


@app.command()
def bench(
    skew: str = typer.Option("0.6", "--skew", help="Router skew, or a comma list to compare (e.g. 0,0.6); 0 is uniform."),
    hot_experts: float = typer.Option(0.1, "--hot-experts", help="Fraction of experts that get the extra probability."),
    experts: str = typer.Option("8,32,128", "--experts", help="Comma list of expert counts (built-in switch-base-E models; ignored with --model)."),
    batch_sizes: str = typer.Option("8", "--batch-sizes", help="Comma list of sequences per worker."),
    seq_len: int = typer.Option(120, "--seq-len", help="Tokens per sequence."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Workers (default: GPUs on CUDA, 2 on CPU)."),
    iters: int = typer.Option(10, "--iters", help="Timed forwards per system and configuration (slow systems get fewer, at least 3)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed forwards first."),
    systems: str = typer.Option("moeshard,deepspeed,ep", "--systems", help="Comma list from moeshard, deepspeed, deepspeed-dropless, ep, hf (transformers' experts, full copies), tp (transformers' tensor-parallel plan, decoder families)."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", help="DeepSpeed's capacity factor (default: min(E, 50), as the paper)."),
    model: Optional[str] = typer.Option(None, "--model", help="Benchmark this checkpoint, shard set or built-in (e.g. tiny-qwen3-moe, qwen3-moe-mid, olmoe-mid, mixtral-mid, deepseek-v3-mid) instead of switch-base-E."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also time each MoE layer (paper section 4.2)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every raw sample, the configuration and the machine as JSON."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: latency per system (median, p10-p90) and speedup, along each swept axis."),
    paper: bool = typer.Option(False, "--paper", help="The paper's sweep for a 4-GPU node: experts 8-256, batch 10-450, seq 120, 4 workers."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of inputs and router draws."),
    max_cell_seconds: float = typer.Option(12.0, "--max-cell-seconds", help="Time budget per system and configuration before repeats are cut (min 3)."),
    timeout: float = typer.Option(900.0, "--timeout", help="Seconds a collective may wait before the bench fails."),
):
    """Compare MoEShard with DeepSpeed-MoE, expert parallelism and transformers (its experts, its tensor-parallel plan), as in the paper."""
    from moeshard_cli.bench.report import plot as write_plot, print_tables, write_json
    from moeshard_cli.bench.command import BenchOptions, bench as do_bench, estimate_seconds, parse_list

    opts = BenchOptions(
        skews=parse_list(skew, float, "--skew"), hot_experts=hot_experts, experts=parse_list(experts, int, "--experts"),
        batch_sizes=parse_list(batch_sizes, int, "--batch-sizes"), seq_len=seq_len, gpus=gpus, iters=iters, warmup=warmup,
        systems=parse_list(systems, str, "--systems"), capacity_factor=capacity_factor, model=model, per_layer=per_layer,
        device=device, seed=seed, max_cell_seconds=max_cell_seconds, timeout=timeout, json_path=json_path, plot_path=plot_path,
        debug=STATE["debug"], show_progress=console.is_terminal,
    )
    if paper:
        opts.use_paper_sweep()
    opts.validate()
    console.print(f"estimated time: about {estimate_seconds(opts, opts.gpus or 2) / 60:.1f} min (a FLOP-count guess)")
    result = do_bench(opts)
    print_tables(console, result, per_layer)
    if json_path:  # first: a plot that fails must not lose the samples
        write_json(json_path, result)
        console.print(f"wrote {json_path}")
    if plot_path:
        try:
            write_plot(plot_path, result)
        except Exception as exc:
            kept = f"the samples are in {json_path}" if json_path else "the tables above hold the results; --json keeps every sample"
            raise UserError(f"cannot draw --plot {plot_path} ({type(exc).__name__}: {str(exc).strip()[:120]})", kept) from exc
        console.print(f"wrote {plot_path}")


@app.command()
def demo(
    gpus: int = typer.Option(2, "--gpus", "--workers", "-n", help="Number of ranks (worker processes on CPU)."),
    out: Path = typer.Option(Path("moeshard-demo"), "--out", help="Directory for the demo's shard set and output."),
):
    """Shard the built-in tiny-switch, encode a sample corpus across workers, check against transformers."""
    from moeshard_cli.demo import run_demo

    run_demo(console, gpus, out, debug=STATE["debug"])


def main() -> None:
    # Ctrl-C and SIGTERM raise Interrupted: cleanup runs, the exit code is 130 or 143, the line says which
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = app(standalone_mode=False, prog_name="moeshard")
    except UserError as exc:
        if STATE["debug"]:
            raise
        _fail(exc.line(), 2)
    except Interrupted as exc:
        _fail(exc.line(), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # click usage errors come through here too
        if isinstance(exc, _click_exceptions().ClickException):
            exc.show()
            sys.exit(exc.exit_code)  # 2 for usage errors, as click and torchrun do
        if isinstance(exc, typer.Abort):  # EOF at a prompt; typer.Exit never gets here without standalone mode
            _fail("interrupted", 130)
        if STATE["debug"]:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"{type(exc).__name__}: {first}: rerun with --debug for the traceback and report it", 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # without standalone mode click returns the exit code of Ctrl-C (130) and typer.Exit
    if isinstance(code, int) and code:
        if code == 130:
            _fail("interrupted", 130)
        sys.exit(code)


def _click_exceptions():
    """The click that typer runs on: recent typer vendors its own copy, whose classes differ from click's."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _terminated(signum, frame):
    raise Interrupted(signum)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)
