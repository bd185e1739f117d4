"""`moeshard bench`'s options, each stated once: the fields of `BenchOptions` carry their flag
(name, help, choices), cli.py makes the command's signature from them, and the workers get the
object itself. Nothing here imports torch: a wrong value is refused before the seconds it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from moeshard_cli.errors import UserError
from moeshard_cli.files import check_writable
from moeshard_cli.options import at_least, check_router_flags, flag_option, positive

SYSTEMS = ("moeshard", "deepspeed", "deepspeed-dropless", "ep", "hf", "tp")
PAPER = dict(experts="8,16,32,64,128,256", batch_sizes="10,50,100,250,450", seq_len=120, gpus=4)
LIST_EXAMPLES = {"--skew": "0,0.6", "--experts": "8,32,128", "--batch-sizes": "8,32", "--systems": "moeshard,deepspeed,ep"}


def uses_deepspeed(systems: list[str]) -> bool:
    return any(s.startswith("deepspeed") for s in systems)


def complete_systems(incomplete: str) -> list[str]:
    """Shell completion of a comma list: the names not yet given, after what is typed so far."""
    *given, last = incomplete.split(",")
    head = "".join(f"{g}," for g in given)
    return [head + s for s in SYSTEMS if s.startswith(last) and s not in given]


def parse_list(text: str, kind, flag: str) -> list:
    example = f"give a comma-separated list, e.g. {flag} {LIST_EXAMPLES[flag]}"
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag} is empty", example)
    try:
        return [kind(t) for t in items]
    except ValueError as exc:
        raise UserError(f"{flag} {text!r} is not a list of numbers", example) from exc


@dataclass
class BenchOptions:
    """Comma lists stay text here (as typed); `skews`, `experts`, ... are the parsed values."""

    skew: Annotated[str, typer.Option("--skew", help="Router skew, or a comma list to compare (e.g. 0,0.6); 0 is uniform.")] = "0.6"
    hot_experts: Annotated[float, typer.Option("--hot-experts", help="Fraction of experts that get the extra probability.")] = 0.1
    experts: Annotated[str, typer.Option("--experts", help="Comma list of expert counts (built-in switch-base-E models; ignored with --model).")] = "8,32,128"
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma list of sequences per worker.")] = "8"
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 120
    gpus: Annotated[Optional[int], typer.Option("--gpus", help="Workers (default: GPUs on CUDA, 2 on CPU).")] = None
    iters: Annotated[int, typer.Option("--iters", help="Timed forwards per system and configuration (slow systems get fewer, at least 3).")] = 10
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed forwards first.")] = 2
    systems: Annotated[str, typer.Option(
        "--systems", autocompletion=complete_systems,
        help=f"Comma list from {', '.join(SYSTEMS)} (hf: transformers' experts, full copies; tp: transformers' tensor-parallel plan, decoder families).",
    )] = "moeshard,deepspeed,ep"
    capacity_factor: Annotated[Optional[float], typer.Option("--capacity-factor", help="DeepSpeed's capacity factor (default: min(E, 50), as the paper).")] = None
    model: Annotated[Optional[str], typer.Option("--model", help="Benchmark this checkpoint, shard set or built-in (e.g. tiny-qwen3-moe, qwen3-moe-mid, olmoe-mid, mixtral-mid, deepseek-v3-mid) instead of switch-base-E.")] = None
    per_layer: Annotated[bool, flag_option("--per-layer", help="Also time each MoE layer (paper section 4.2).")] = False
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every raw sample (in ms), the configuration and the machine as JSON.")] = None
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: latency per system (median, p10-p90) and speedup, along each swept axis.")] = None
    paper: Annotated[bool, flag_option("--paper", help="The paper's sweep for a 4-GPU node: experts 8-256, batch 10-450, seq 120, 4 workers.")] = False
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device", help="Where the workers run.")] = "auto"
    seed: Annotated[int, typer.Option("--seed", help="Seed of inputs and router draws.")] = 0
    max_cell_seconds: Annotated[float, typer.Option("--max-cell-seconds", help="Time budget per system and configuration before repeats are cut (min 3).")] = 12.0
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a collective may wait before the bench fails.")] = 900.0

    def __post_init__(self) -> None:
        if self.paper:
            self.experts, self.batch_sizes, self.seq_len, self.gpus = PAPER["experts"], PAPER["batch_sizes"], PAPER["seq_len"], PAPER["gpus"]

    @property
    def skews(self) -> list[float]:
        return parse_list(self.skew, float, "--skew")

    @property
    def expert_counts(self) -> list[int]:
        return parse_list(self.experts, int, "--experts")

    @property
    def batches(self) -> list[int]:
        return parse_list(self.batch_sizes, int, "--batch-sizes")

    @property
    def system_names(self) -> list[str]:
        return parse_list(self.systems, str, "--systems")

    @property
    def models(self) -> list[str]:
        """One model per expert count (the built-in switch-base-E), or --model."""
        return [self.model] if self.model else [f"switch-base-{e}" for e in self.expert_counts]

    def check_values(self) -> None:
        """Every value on its own, without torch: the one-line UserError that names the flag.
        Whether this machine and install can run them is `bench.command.check_machine`'s, after."""
        unknown = [s for s in self.system_names if s not in SYSTEMS]
        if unknown:
            raise UserError(f"--systems names unknown system {unknown[0]}", f"choose from {', '.join(SYSTEMS)}")
        for name, path in (("--plot", self.plot_path), ("--json", self.json_path)):
            if path:
                check_writable(path, name)
        if not self.model and any(e < 1 for e in self.expert_counts):
            raise UserError("--experts must be positive", "e.g. --experts 8,32,128")
        if any(b < 1 for b in self.batches) or self.seq_len < 1:
            raise UserError("--batch-sizes and --seq-len must be positive", "e.g. --batch-sizes 8 --seq-len 120")
        if self.iters < 1 or self.warmup < 1:
            raise UserError("--iters and --warmup must be at least 1", "e.g. --iters 10 --warmup 2")
        if self.gpus is not None:
            at_least("--gpus", self.gpus, 1, "2")
        if self.capacity_factor is not None:
            positive("--capacity-factor", self.capacity_factor, "50")
        positive("--max-cell-seconds", self.max_cell_seconds, "12")
        at_least("--timeout", self.timeout, 1, "900")
        check_router_flags("skewed", self.skews, self.hot_experts)

    def config(self) -> dict:
        """What the JSON records of the sweep: the parsed values, and only the axes that applied
        (the expert counts pick built-in models; --model replaces them)."""
        out = dict(model=self.model, skews=self.skews, hot_experts=self.hot_experts, batch_sizes=self.batches, seq_len=self.seq_len,
                   systems=self.system_names, iters=self.iters, warmup=self.warmup, capacity_factor=self.capacity_factor,
                   per_layer=self.per_layer, seed=self.seed, max_cell_seconds=self.max_cell_seconds, timeout=self.timeout)
        if not self.model:
            out["experts"] = self.expert_counts
        return out
