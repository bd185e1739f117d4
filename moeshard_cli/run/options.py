"""Every option of `moeshard run`, declared once (declare.py): the command line, the options the
library takes, the job the workers get and the resume fingerprint all come from this class.

`output=True` marks the options that change the output's bytes. torch-free: the command line
and its --help import this module.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional, get_args, get_type_hints

from moeshard_cli.choices import Attention, Device, Dtype, ExpertBackend, InputFormat, Pooling, Router, complete_model
from moeshard_cli.declare import option
from moeshard_cli.errors import UserError
from moeshard_cli.ui import Display
from moeshard_cli.run.formats import output_format, output_help, suffix_fix

STDIN = Path("-")


@dataclass
class RunOptions:
    input: Path = option("--input", "-i", help="The corpus, by suffix: .txt (one document per line), .jsonl, .csv, .tsv or .parquet, "
                         "optionally compressed (.gz, .zst); - reads standard input (text, or --input-format).")
    shards: Optional[Path] = option("--shards", default=None, help="Shard set directory (default: the one under ./moeshard-shards "
                                    "or ./moeshard-demo, the newest of several).")
    # --model and its companions pick the shard set (shard/cache.py): the set's manifest is in the fingerprint already
    model: Optional[str] = option("--model", "-m", default=None, autocompletion=complete_model,
                                  help="Hub id, checkpoint directory or built-in name instead of --shards: cut for --gpus workers on first use "
                                       "into the shard cache ($MOESHARD_CACHE, default ~/.cache/moeshard/shards), reused afterwards.")
    gpus: Optional[int] = option("--gpus", "-n", default=None,
                                 help="Workers (one per GPU, or CPU processes). With --model: the cut's (default: the GPUs, else 2); "
                                      "else it picks or checks the shard set.")
    dtype: Optional[Dtype] = option("--dtype", default=None, help="With --model: the cut's data type (default: float32).")
    revision: Optional[str] = option("--revision", default=None, help="With --model: hub revision (branch, tag or commit).")
    output: Optional[Path] = option("--output", "-o", default=None, help=output_help())
    input_format: Optional[InputFormat] = option("--input-format", default=None, output=True,
                                                 help="Read --input as this format whatever its suffix (default: by suffix; txt for stdin).")
    text_field: str = option("--field", "--column", default="text", output=True,
                             help="The field (.jsonl) or column (.csv, .tsv, .parquet) that holds the text.")
    id_field: Optional[str] = option("--id-field", "--id-column", default=None, output=True,
                                     help="The field or column of each record's id, written with .parquet and .jsonl outputs "
                                          "(default: `id` when the input has one, else the record number from 0).")
    batch_size: int = option("--batch-size", default=32, output=True, help="Lines per batch per worker.")
    max_length: int = option("--max-length", default=512, output=True, help="Truncate lines to this many tokens.")
    window: int = option("--window", default=8192, output=True,
                         help="Lines read ahead and sorted by length together (rounded up to whole steps).")
    pooling: Optional[Pooling] = option("--pooling", default=None, output=True,
                                        help="mean or last: one embedding per line (default: mean for encoders, last for decoders); "
                                             "none: every token's hidden state plus offsets.")
    score: bool = option("--score", default=False, output=True,
                         help="Decoder families: each line's log-likelihood (line, tokens, logprob, mean_nll) instead of embeddings.")
    normalize: bool = option("--normalize", default=False, output=True, help="L2-normalize every output row.")
    device: Device = option("--device", default="auto", output=True, help="cpu, or cuda (one GPU per rank, NCCL); auto: cuda when there are GPUs enough.")
    expert_backend: ExpertBackend = option("--expert-backend", default="auto", output=True,
                                           help="How each rank computes its expert slices; megablocks needs CUDA and bfloat16.")
    attention: Attention = option("--attention", default="eager", output=True,
                                  help="eager: transformers' own; fused: torch's scaled_dot_product_attention with T5's position bias "
                                       "(for GPUs; float32 may differ from transformers by ~1e-4..1e-3).")
    router: Router = option("--router", default="model", output=True, help="model: the checkpoint's router; skewed: the paper's benchmark router.")
    skew: float = option("--skew", default=0.0, output=True, help="Skewed router: extra probability mass of each hot expert.")
    hot_experts: float = option("--hot-experts", default=0.1, output=True, help="Skewed router: fraction of experts that are hot.")
    seed: int = option("--seed", default=0, output=True, help="Skewed router: seed of the token-to-expert draws.")
    timeout: float = option("--timeout", default=300.0, help="Seconds a collective may wait before the run fails.")
    verify: bool = option("--verify/--no-verify", default=True, help="Check the rank files' sha256 (cached per file until it changes).")
    resume: bool = option("--resume", default=False, help="Continue an interrupted run of the same command where it stopped.")
    restart: bool = option("--restart", default=False, help="Discard an interrupted run of this output and start over.")
    force: bool = option("--force", default=False, help="Replace a finished --output (without it, a finished output is refused).")
    verify_partial: bool = option("--verify-partial", default=False,
                                  help="With --resume: check every row already written against its checksum (by default the file's size, header and last steps).")
    json_path: Optional[Path] = option("--json", default=None, help="Also write the figures of the results table as JSON (- for standard output).")
    nnodes: int = option("--nnodes", default=1, help="Number of machines taking part.")
    node_rank: int = option("--node-rank", default=0, help="This machine's index; node 0 hosts the rendezvous and writes the output.")
    rdzv_endpoint: Optional[str] = option("--rdzv-endpoint", default=None, help="HOST:PORT of node 0's rendezvous (multi-node).")
    # set by the caller, not on the command line
    debug: bool = False
    progress: Display = field(default_factory=Display)  # bar, log lines or nothing (ui.py)
    argv: list[str] = field(default_factory=lambda: sys.argv[1:])

    def validate(self) -> None:
        """Every option, before any work; raises the one-line UserError that names the flag.
        (The command line has checked the choices already; a library caller may pass anything.)"""
        from moeshard_cli.options import at_least, check_router_flags, endpoint
        from moeshard_cli.run import outputs

        check_choices(self)
        if self.score and self.pooling is not None:
            raise UserError(f"--score and --pooling {self.pooling} exclude each other", "--score writes one score per line: drop --pooling")
        at_least("--batch-size", self.batch_size, 1, "32")
        at_least("--max-length", self.max_length, 2, "512 (room for one token and the end-of-sequence token)")
        at_least("--window", self.window, 1, "8192")
        at_least("--timeout", self.timeout, 1, "300")
        check_router_flags(self.router, [self.skew], self.hot_experts)
        at_least("--nnodes", self.nnodes, 1, "2")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1}", "number the nodes 0 to --nnodes - 1, with 0 on the node at --rdzv-endpoint")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT", "give every node the address of node 0, e.g. --rdzv-endpoint node0:29400")
        if self.rdzv_endpoint:
            from moeshard_cli.launch import resolve_host

            resolve_host(endpoint(self.rdzv_endpoint)[0])
        if self.resume and self.restart:
            raise UserError("--resume and --restart exclude each other", "pass --resume to continue the unfinished run, --restart to discard it")
        if self.reads_stdin:
            if self.resume:
                raise UserError("--resume cannot continue a run that read standard input (it is gone)",
                                "save the input to a file and run with --input FILE, which can be resumed")
            if self.output is None:
                raise UserError("--input - needs --output", "name the output file, e.g. --output corpus.safetensors")
            if self.nnodes > 1:
                raise UserError("--input - cannot feed several nodes", "give every node the input as a file")
        if self.node_rank == 0:  # the node that writes: its files are checked before any work
            json_file = None if self.json_path == STDIN else self.json_path
            outputs.guard_user_files({"--output": self.output_path, "--json": json_file}, self.input, self.shards_dir)
        try:
            fmt = output_format(self.output_path, self.mode)
        except ValueError as exc:
            raise UserError(f"--output {exc}", suffix_fix(self.mode)) from None
        # extras last, once every value is known to be right
        if fmt.name == "parquet" and self.node_rank == 0 and importlib.util.find_spec("pyarrow") is None:
            raise UserError(f"--output {self.output_path} is a parquet file and pyarrow is not installed", "pip install 'moeshard[parquet]'")

    @property
    def reads_stdin(self) -> bool:
        return self.input == STDIN

    @property
    def shards_dir(self) -> Path:
        from moeshard_cli.shard.manifest import default_shard_set

        return self.shards or default_shard_set()

    @property
    def mode(self) -> str:
        """What each line becomes: "score", or its pooling (the family's default until `for_family`)."""
        return "score" if self.score else self.pooling or "mean"

    def for_family(self, family) -> None:
        """Settle what depends on the shard set's family: the default pooling, and whether it can score."""
        if self.score and not family.decoder:
            raise UserError(f"--score needs a decoder family with an LM head; the shard set holds {family.name}, an encoder",
                            "shard a decoder MoE (Qwen3-MoE, OLMoE, Mixtral), or drop --score to write embeddings")
        if self.attention == "fused" and getattr(family, "no_sdpa", None):
            raise UserError(f"--attention fused: {family.no_sdpa}", "use --attention eager (the default)")
        if self.pooling is None and not self.score:
            self.pooling = "last" if family.decoder else "mean"

    @property
    def output_path(self) -> Path:
        if self.output is not None:
            return self.output
        return self.input.with_name(self.input.name + (".moeshard-scores.csv" if self.score else ".moeshard.safetensors"))

    @property
    def router_spec(self):
        from moeshard_cli.moe.routing import RouterSpec

        return RouterSpec(self.router, self.skew, self.hot_experts, self.seed)


def check_choices(opts) -> None:
    """A `Literal` option holds one of its values (a library caller gets the command line's message)."""
    hints = get_type_hints(type(opts))
    for f in fields(opts):
        choices = _literal_values(hints[f.name])
        value = getattr(opts, f.name)
        if choices and value is not None and value not in choices:
            raise UserError(f"{f.metadata['flags'][0]} {value} is unknown", f"use one of {', '.join(choices)}")


def _literal_values(hint) -> tuple:
    args = get_args(hint)
    if getattr(hint, "__origin__", None) is Literal:
        return args
    return next((get_args(a) for a in args if getattr(a, "__origin__", None) is Literal), ())
