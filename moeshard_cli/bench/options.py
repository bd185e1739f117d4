"""`moeshard bench`'s options, each stated once (declare.py): the fields of `BenchOptions` carry
their flag (name, help, choices), cli.py makes the command's signature from them, and the workers
get the object itself. Nothing here imports torch: a wrong value is refused before the seconds it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moeshard_cli.choices import Device
from moeshard_cli.declare import option
from moeshard_cli.errors import UserError
from moeshard_cli.files import check_writable
from moeshard_cli.options import at_least, check_router_flags, positive

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

    skew: str = option("--skew", default="0.6", help="Router skew, or a comma list to compare (e.g. 0,0.6); 0 is uniform.")
    hot_experts: float = option("--hot-experts", default=0.1, help="Fraction of experts that get the extra probability.")
    experts: str = option("--experts", default="8,32,128", help="Comma list of expert counts (built-in switch-base-E models; ignored with --model).")
    batch_sizes: str = option("--batch-sizes", default="8", help="Comma list of sequences per worker.")
    seq_len: int = option("--seq-len", default=120, help="Tokens per sequence.")
    gpus: Optional[int] = option("--gpus", default=None, help="Workers (default: GPUs on CUDA, 2 on CPU).")
    iters: int = option("--iters", default=10, help="Timed forwards per system and configuration (slow systems get fewer, at least 3).")
    warmup: int = option("--warmup", default=2, help="Untimed forwards first.")
    systems: str = option("--systems", default="moeshard,deepspeed,ep", autocompletion=complete_systems,
                          help=f"Comma list from {', '.join(SYSTEMS)} (hf: transformers' experts, full copies; tp: transformers' tensor-parallel plan, decoder families).")
    capacity_factor: Optional[float] = option("--capacity-factor", default=None, help="DeepSpeed's capacity factor (default: min(E, 50), as the paper).")
    model: Optional[str] = option("--model", default=None,
                                  help="Benchmark this checkpoint, shard set or built-in (e.g. tiny-qwen3-moe, qwen3-moe-mid, olmoe-mid, mixtral-mid, deepseek-v3-mid, gpt-oss-mid) instead of switch-base-E.")
    per_layer: bool = option("--per-layer", default=False, help="Also time each MoE layer (paper section 4.2).")
    json_path: Optional[Path] = option("--json", default=None, help="Write every raw sample (in ms), the configuration and the machine as JSON.")
    plot_path: Optional[Path] = option("--plot", default=None, help="Write a PNG: latency per system (median, p10-p90) and speedup, along each swept axis.")
    paper: bool = option("--paper", default=False, help="The paper's sweep for a 4-GPU node: experts 8-256, batch 10-450, seq 120, 4 workers.")
    device: Device = option("--device", default="auto", help="Where the workers run.")
    seed: int = option("--seed", default=0, help="Seed of inputs and router draws.")
    max_cell_seconds: float = option("--max-cell-seconds", default=12.0, help="Time budget per system and configuration before repeats are cut (min 3).")
    timeout: float = option("--timeout", default=900.0, help="Seconds a collective may wait before the bench fails.")

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
