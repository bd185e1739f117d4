"""Validation at the edge: each command's options object checks its values once, here.

Core code raises ValueError in plain words about a value ("-0.1 is negative"); `flag` turns
that into the one-line UserError that names the flag and the fix ("--skew -0.1 is negative:
pass a skew of 0 (uniform) or more"). UserError is raised directly only for problems with
the user's environment (files, devices, network), whose fix may name a flag.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import typer

from moeshard_cli.errors import UserError


def flag_option(*names: str, help: str):
    """An on/off flag, for `Annotated[bool, flag_option(...)] = False`. Its empty metavar keeps help
    from reading `--debug <bool>`, as if the flag took a value."""
    return typer.Option(*names, help=help, metavar="")


@contextmanager
def flag(name: str, fix: str):
    """Inside: a core ValueError about the value of option `name` becomes its one-line UserError."""
    try:
        yield
    except ValueError as exc:
        raise UserError(f"{name} {exc}", fix) from None


def check_router_flags(kind: str, skews: list[float], hot_experts: float) -> None:
    from moeshard_cli.moe.routing import check_hot_experts, check_router, check_skew  # (imports torch: the choices are checked first)

    with flag("--router", "use --router model or --router skewed"):
        check_router(kind)
    for skew in skews:
        with flag("--skew", "pass a skew of 0 (uniform) or more, e.g. --skew 0.6"):
            check_skew(skew)
    with flag("--hot-experts", "pass the fraction of experts that get extra load, e.g. --hot-experts 0.1"):
        check_hot_experts(hot_experts)


def at_least(name: str, value: float, low: float, example: str) -> None:
    """`value >= low`, and a real number: nan and inf are refused."""
    _bounded(name, value, value >= low, f"must be at least {low:g}", example)


def positive(name: str, value: float, example: str) -> None:
    """`value > 0`, and a real number."""
    _bounded(name, value, value > 0, "must be positive", example)


def _bounded(name: str, value: float, within: bool, bound: str, example: str) -> None:
    if not math.isfinite(value):
        raise UserError(f"{name} {value} is not a finite number", f"pass e.g. {name} {example}")
    if not within:
        raise UserError(f"{name} {value:g} {bound}", f"pass e.g. {name} {example}")


def endpoint(value: str) -> tuple[str, int]:
    """HOST:PORT of a rendezvous (IPv6 hosts in brackets)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {value!r} is not HOST:PORT", "give node 0's address and a free port, e.g. --rdzv-endpoint node0:29400")
    return host.strip("[]"), int(port)


def takes_options(cls):
    """Decorator of a command whose flags are the fields of dataclass `cls` (each annotated with its
    typer.Option): typer reads the signature of `cls`, and the command gets one `cls` instance."""
    import functools
    import inspect
    import typing

    def wrap(command):
        @functools.wraps(command)
        def with_options(**flags):
            return command(cls(**flags))

        hints = typing.get_type_hints(cls, include_extras=True)
        params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(cls).parameters.values()]
        with_options.__signature__ = inspect.Signature(params)
        with_options.__annotations__ = {p.name: p.annotation for p in params}
        return with_options

    return wrap
