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
from moeshard_cli.bench.options import BenchOptions
from moeshard_cli.errors import Interrupted, UserError

app = typer.Typer(
    name="moeshard",
    help="Fast, dropless Mixture-of-Experts inference by expert sharding (MoEShard): Switch, Qwen2/3-MoE, OLMoE, Mixtral, DeepSeek-V2/V3, PhiMoE, Granite-MoE, GPT-OSS.",
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
STATE = {"debug": False, "verbosity": 0}  # verbosity: -1 with --quiet, 1 with --verbose


def display():
    """Progress as this invocation shows it: a bar on a terminal, plain lines in a log, none with -q."""
    from moeshard_cli.ui import Display

    return Display.choose(console, STATE["verbosity"])


def _version(value: bool):
    if value:
        console.print(f"moeshard {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, only errors and the results (bench's table, the files written)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail: bench's estimate in parts and each cell's result as it finishes."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    if quiet and verbose:
        raise UserError("--quiet and --verbose exclude each other", "pass one of them")
    STATE["debug"], STATE["verbosity"] = debug, verbose - quiet
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

    with byte_progress(console, "sharding", display()) as progress:
        result = do_shard(ShardOptions(source, gpus, out, dtype, revision, force), progress)
    if STATE["verbosity"] < 0:
        console.print(f"wrote {result.out}", highlight=False)
    else:
        print_shard_summary(console, result)


@app.command()
@command_options(RunOptions)  # every flag of `run` is declared once, in run/options.py
def run(**flags):
    """Encode a corpus with one worker per rank of a shard set: embeddings, or per-line scores (--score)."""
    from moeshard_cli.run.report import print_run_summary
    from moeshard_cli.run.command import run as do_run
    from moeshard_cli.shard.cache import settle_shards
    from moeshard_cli.ui import Display, byte_progress

    json_to_stdout = str(flags["json_path"]) == "-"  # --json -: standard output holds only the JSON, no progress or tables
    opts = RunOptions(**flags, debug=STATE["debug"], progress=Display("off") if json_to_stdout else display())
    with byte_progress(console, "sharding", opts.progress) as progress:  # seen only when --model cuts a set on first use
        settle_shards(opts, progress, on_cut=_print_cut, note=lambda line: err_console.print(f"note: {escape(line)}"))
    summary = do_run(opts)
    out = err_console if json_to_stdout else console
    if STATE["verbosity"] < 0:
        out.print(f"wrote {summary.output}", highlight=False)
    else:
        print_run_summary(out, summary)
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
@command_options(BenchOptions)  # every flag of `bench` is declared once, in bench/options.py
def bench(**flags):
    """Compare MoEShard with DeepSpeed-MoE, expert parallelism and transformers (its experts, its tensor-parallel plan), as in the paper."""
    opts = BenchOptions(**flags)
    opts.check_values()  # before torch's import: a wrong value is refused at once
    from moeshard_cli.bench.command import bench as do_bench, check_machine, default_workers, estimate
    from moeshard_cli.bench.report import plot as write_plot, print_tables, write_json
    from moeshard_cli.launch import pick_device
    from moeshard_cli.ui import human_seconds

    check_machine(opts)
    show = display()
    est = estimate(opts, opts.gpus or default_workers(pick_device(opts.device, opts.gpus or 1)))
    if show.mode != "off":
        parts = f" ({', '.join(f'{name} {human_seconds(s)}' for name, s in est.parts.items())}; the machine {est.slowdown:.1f}x slower than idle)" if show.verbose else ""
        console.print(f"estimated time: about {human_seconds(est.total_s)}{parts}", highlight=False)
    result = do_bench(opts, show, STATE["debug"], est)
    print_tables(console, result, opts.per_layer)
    if opts.json_path:  # first: a plot that fails must not lose the samples
        write_json(opts.json_path, result)
        console.print(f"wrote {opts.json_path}")
    if opts.plot_path:
        try:
            write_plot(opts.plot_path, result)
        except Exception as exc:
            kept = f"the samples are in {opts.json_path}" if opts.json_path else "the tables above hold the results; --json keeps every sample"
            raise UserError(f"cannot draw --plot {opts.plot_path} ({type(exc).__name__}: {str(exc).strip()[:120]})", kept) from exc
        console.print(f"wrote {opts.plot_path}")


@app.command()
def demo(
    gpus: int = typer.Option(2, "--gpus", "--workers", "-n", help="Number of ranks (worker processes on CPU)."),
    out: Path = typer.Option(Path("moeshard-demo"), "--out", help="Directory for the demo's shard set and output."),
):
    """Shard the built-in tiny-switch, encode a sample corpus across workers, check against transformers."""
    from moeshard_cli.demo import run_demo

    run_demo(console, gpus, out, debug=STATE["debug"], display=display())


def script() -> None:
    """The `moeshard` command (console script, `python -m moeshard_cli`): a process of its own, so its CPU workers can fork."""
    from moeshard_cli.launch import fork_cpu_workers

    fork_cpu_workers()
    main()


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
