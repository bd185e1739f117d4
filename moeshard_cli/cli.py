"""The `moeshard` command line: shard, run, bench, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moeshard_cli import __version__
from moeshard_cli.builtin import DEFAULT_MODEL
from moeshard_cli.errors import UserError

app = typer.Typer(
    name="moeshard",
    help="Fast, dropless Mixture-of-Experts encoder inference by expert sharding (MoEShard).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
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


@app.command()
def shard(
    source: str = typer.Argument(DEFAULT_MODEL, help="Hub id (google/switch-base-128), local checkpoint directory, or built-in name (tiny-switch, switch-base-8..256)."),
    gpus: int = typer.Option(..., "--gpus", "-n", help="Number of ranks (GPUs or CPU workers) to slice the experts for."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory [default: ./moeshard-shards/<model>-w<gpus>]."),
    dtype: str = typer.Option("float32", "--dtype", help="Data type of the rank files: float32, bfloat16 or float16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) for hub ids."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing shard set in --out."),
):
    """Slice a checkpoint into per-rank safetensors files (a slice of every expert each)."""
    from moeshard_cli.report import print_shard_summary, byte_progress
    from moeshard_cli.shard import shard as do_shard

    with byte_progress(console, "sharding") as progress:
        result = do_shard(source, gpus, out, dtype, revision, force, progress)
    print_shard_summary(console, result)


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc.line()}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here too
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if STATE["debug"]:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {first}: rerun with --debug for the traceback and report it", highlight=False, soft_wrap=True)
        sys.exit(1)
