"""Options declared once: a dataclass field carries its flags, help and whether it changes the output.

    @dataclass
    class RunOptions:
        batch_size: int = option("--batch-size", default=32, help="Lines per batch per worker.", output=True)

`command_options(RunOptions)` turns the fields that have flags into typer options, so the
command line, the options object the library takes, the worker's job (which carries that
object) and the resume fingerprint (`output_options`) cannot disagree. A `Literal[...]` type
becomes click's Choice: a wrong value fails at once, listing the choices, and shell completion
offers them. Fields without flags (set by the caller, e.g. `debug`) are not on the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import MISSING, field, fields
from typing import Any, Callable, get_type_hints


def option(*flags: str, default: Any = MISSING, help: str, output: bool = False, **typer_kwargs) -> Any:
    """A dataclass field that is a command-line option. `output=True`: its value changes the
    output's bytes, so it is part of the resume fingerprint and of the output's metadata."""
    meta = {"flags": flags, "help": help, "output": output, "typer": typer_kwargs}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def command_options(cls) -> Callable[[Callable], Callable]:
    """Decorate a typer command `def cmd(**values)`: its parameters become the flagged fields of `cls`,
    in declaration order (`cmd` receives them by field name)."""
    import typer

    hints = get_type_hints(cls)
    params = []
    for f in fields(cls):
        if "flags" not in f.metadata:
            continue
        meta = f.metadata
        default = ... if f.default is MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                        default=typer.Option(default, *meta["flags"], help=meta["help"], **meta["typer"])))

    def decorate(command: Callable) -> Callable:
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def output_options(opts) -> dict:
    """{name: value} of every option marked `output=True`: what a resumed run must repeat exactly."""
    return {f.name: _plain(getattr(opts, f.name)) for f in fields(opts) if f.metadata.get("output")}


def _plain(value: Any) -> Any:
    """JSON's types: paths as strings, dataclasses as dicts."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
