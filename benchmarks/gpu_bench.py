"""The measurements of benchmarks/gpu_check.sh, on one device (CUDA, or CPU with tiny sizes for a dry run).

Usage (from the project root, with the project on PYTHONPATH or installed):
       python benchmarks/gpu_bench.py throughput --work DIR [--device cuda] [--model switch-base-8] [--lines 2048]
           [--batch-size 128] [--dtypes bfloat16,float32] [--repeats 3]
       python benchmarks/gpu_bench.py moe-layer --work DIR [--device cuda] [--experts 128] [--ranks 4]
           [--seqs 1,10,100,450] [--skews 0,0.6] [--backends grouped_mm] [--tag NAME]
       python benchmarks/gpu_bench.py report --work DIR --command "..." [--peak-tflops 989] --out gpu-results.md

throughput: per dtype, at world size 1: the encoder of `moeshard run`'s worker (run/worker.py) against
  transformers' dropless encoder, in this process, on the same device and the same batches (the run's
  windows and run/schedule.py's plan): pad, encode, mean-pool on the device, rows to the host; after a
  two-batch warm-up, median of --repeats passes. Also `moeshard run --json` itself on the same corpus:
  its encode loop's tokens/s (first batch cold; feed, gather and writer included) and the command's time.
moe-layer: one MoE layer's experts, `ranks` GPUs simulated on one device: a MoEShard rank (a 1/ranks
  slice of every expert on every rank's tokens) against the busiest expert-parallel rank (E/ranks whole
  experts on the tokens routed to them), the paper's skewed router; median of CUDA-event timings.
report: the markdown results file from the JSON the steps wrote and gpu_check.sh's step log.
Every step writes its JSON as rows finish, so a step cut by its timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import word_corpus
from moeshard_cli.dtypes import DTYPES
from moeshard_cli.files import write_json_atomic

MOESHARD = [sys.executable, "-m", "moeshard_cli"]


# ---------------------------------------------------------------- throughput


def moeshard(*args) -> None:
    proc = subprocess.run([*MOESHARD, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"moeshard {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def encoder_flops(config, lengths: list[int]) -> float:
    """Matmul FLOPs of the real tokens (padding excluded): projections, attention, one FFN (dense or one expert), routers."""
    inner = config.num_heads * config.d_kv
    per_token = config.num_layers * (2 * 4 * config.d_model * inner + 2 * 2 * config.d_model * config.d_ff)
    per_token += config.num_sparse_encoder_layers * 2 * config.d_model * config.num_experts
    attention = config.num_layers * 2 * 2 * inner * sum(n * n for n in lengths)
    return float(per_token * sum(lengths) + attention)


def run_loop(shards: Path, corpus: Path, args, dtype: str) -> dict:
    """`moeshard run` on one rank; its --json figures."""
    output, figures = args.work / f"run-{dtype}.safetensors", args.work / f"run-{dtype}.json"
    output.unlink(missing_ok=True)
    moeshard("run", "--shards", shards, "--input", corpus, "--output", output, "--json", figures, "--device", args.device,
             "--batch-size", args.batch_size, "--window", args.window, "--no-verify")
    return json.loads(figures.read_text())


def planned_batches(shards: Path, corpus: Path, args) -> list[list[list[int]]]:
    """The token ids of every step of `moeshard run` at world size 1, in its order."""
    from transformers import AutoTokenizer

    from moeshard_cli.run.inputs import input_spec, read_windows, tokenize
    from moeshard_cli.run.schedule import plan_window, round_window

    tokenizer = AutoTokenizer.from_pretrained(str(shards))
    batches = []
    for window in read_windows(input_spec(corpus), round_window(args.window, args.batch_size, 1)):
        ids, _ = tokenize(window.texts, tokenizer, args.max_length)
        batches += [[ids[i] for i in step[0]] for step in plan_window([len(r) for r in ids], args.batch_size, 1)]
    return batches


def transformers_encoder(shards: Path, device: torch.device):
    """forward(ids_BS, mask_BS) -> hidden_BSD of transformers' dropless model, in the shard set's dtype."""
    from moeshard_cli.reference import reference_model
    from moeshard_cli.shard.manifest import read_shard_set

    shard_set = read_shard_set(shards)
    model = reference_model(shard_set).to(device)
    return lambda ids_BS, mask_BS: shard_set.family.hidden_states(model, ids_BS, mask_BS)


def moeshard_encoder(shards: Path, device: torch.device, attention: str = "eager"):
    """forward(ids_BS, mask_BS) -> hidden_BSD of the run worker's model (model.sharded_model) at world size 1."""
    from moeshard_cli.model import sharded_model
    from moeshard_cli.moe.exchange import Collectives
    from moeshard_cli.moe.layer import token_ids_for
    from moeshard_cli.moe.routing import RouterSpec
    from moeshard_cli.moe.timing import SectionTimer
    from moeshard_cli.shard.manifest import read_shard_set

    timer = SectionTimer(device, enabled=False)  # nothing reads the section times here
    sharded = sharded_model(read_shard_set(shards), 0, device, "auto", RouterSpec(), Collectives(timer=timer), timer, attention)

    def forward(ids_BS, mask_BS):
        sharded.ctx.set_batch(mask_BS, token_ids_for(list(range(ids_BS.shape[0])), ids_BS.shape[1]).to(device))
        return sharded.hidden_states(ids_BS, mask_BS)

    return forward


def pooled_rows(forward, rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """One batch as the run worker does it: pad, encode, mean-pool on the device; [lines, d_model] fp32 on the device."""
    from torch.nn.utils.rnn import pad_sequence

    lengths_B = torch.tensor([len(r) for r in rows])
    ids_BS = pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=pad_id)
    mask_BS = (torch.arange(ids_BS.shape[1])[None, :] < lengths_B[:, None]).long().to(device, non_blocking=True)
    hidden_BSD = forward(ids_BS.to(device, non_blocking=True), mask_BS).float()
    weights_BS1 = mask_BS[:, :, None].float()
    return (hidden_BSD * weights_BS1).sum(1) / weights_BS1.sum(1)


@torch.inference_mode()
def encode_seconds(forward, batches: list[list[list[int]]], pad_id: int, device: torch.device) -> float:
    """Seconds for `forward` over `batches`, each batch's rows copied to the host."""
    synchronize(device)
    start = time.perf_counter()
    for rows in batches:
        pooled_rows(forward, rows, pad_id, device).cpu()
    synchronize(device)
    return time.perf_counter() - start


def throughput(args) -> None:
    from moeshard_cli.shard.manifest import read_shard_set

    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    corpus = args.work / "corpus.txt"
    word_corpus(corpus, args.lines, args.line_bytes // 2, 3 * args.line_bytes // 2, seed=0)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}, "rows": []}
    for dtype in args.dtypes:
        shards = args.work / f"{args.model}-w1-{dtype}"
        if not (shards / "moeshard.json").exists():
            moeshard("shard", args.model, "--gpus", 1, "--dtype", dtype, "--out", shards, "--force")
        figures = run_loop(shards, corpus, args, dtype)
        batches = planned_batches(shards, corpus, args)
        lengths = [len(r) for rows in batches for r in rows]
        assert sum(lengths) == figures["tokens"], "the replayed batches must hold the run's tokens"
        shard_set = read_shard_set(shards)
        pad_id = shard_set.family.pad_id(shard_set.config)
        seconds, first = {}, {}
        arms = (("moeshard", moeshard_encoder), ("moeshard_fused", lambda s, d: moeshard_encoder(s, d, "fused")),
                ("transformers", transformers_encoder))
        for name, build in arms:
            forward = build(shards, device)
            with torch.inference_mode():  # the first batch's rows: both encoders must agree on them
                first[name] = pooled_rows(forward, batches[0], pad_id, device).cpu()
            encode_seconds(forward, batches[:2], pad_id, device)  # warm-up: kernels load on first use
            seconds[name] = [encode_seconds(forward, batches, pad_id, device) for _ in range(args.repeats)]
            del forward
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["rows"].append({"dtype": dtype, "model": args.model, "lines": figures["lines"], "tokens": figures["tokens"],
                               "batches": len(batches), "padding_fraction": figures["padding_fraction"], "flops": encoder_flops(config, lengths),
                               "moeshard_s": seconds["moeshard"], "moeshard_fused_s": seconds["moeshard_fused"],
                               "transformers_s": seconds["transformers"],
                               "first_batch_max_abs_diff": (first["moeshard"] - first["transformers"]).abs().max().item(),
                               "fused_first_batch_max_abs_diff": (first["moeshard_fused"] - first["transformers"]).abs().max().item(),
                               "run_loop_s": figures["loop_s"], "run_wall_s": figures["wall_s"], "run_backend": figures["backend"]})
        write_json_atomic(args.work / "throughput.json", result)
        tokens = figures["tokens"]
        print(f"throughput {dtype}: moeshard {tokens / statistics.median(seconds['moeshard']):,.0f} tok/s "
              f"(fused attention {tokens / statistics.median(seconds['moeshard_fused']):,.0f}), transformers "
              f"{tokens / statistics.median(seconds['transformers']):,.0f} tok/s, moeshard run's loop {tokens / figures['loop_s']:,.0f} tok/s",
              flush=True)


# ---------------------------------------------------------------- one MoE layer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def grouped(w_in_EDF: torch.Tensor, w_out_EFD: torch.Tensor, backend: str):
    """GroupedExperts on these weights, their F padded to the 16-byte step grouped_mm needs."""
    from moeshard_cli.moe.experts import GroupedExperts, padded_width

    E, D, F_ = w_in_EDF.shape
    Fp = padded_width(F_, w_in_EDF.dtype)
    w_in_pad_EDF, w_out_pad_EFD = w_in_EDF.new_zeros(E, D, Fp), w_out_EFD.new_zeros(E, Fp, D)
    w_in_pad_EDF[:, :, :F_], w_out_pad_EFD[:, :F_, :] = w_in_EDF, w_out_EFD
    return GroupedExperts(w_in_pad_EDF, w_out_pad_EFD, torch.nn.ReLU(), backend)


@torch.inference_mode()
def moe_layer(args) -> None:
    from moeshard_cli.moe.experts import resolve_backend
    from moeshard_cli.moe.routing import skewed_probabilities
    from moeshard_cli.shard.plan import slice_bounds

    args.work.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    E, D, G = args.experts, args.d_model, args.ranks
    gen = torch.Generator(device=device).manual_seed(0)
    w_in_EDF = torch.randn(E, D, args.d_ff, device=device, dtype=dtype, generator=gen) * D**-0.5
    w_out_EFD = torch.randn(E, args.d_ff, D, device=device, dtype=dtype, generator=gen) * args.d_ff**-0.5
    lo, hi = slice_bounds(args.d_ff, G)[0]  # rank 0's slice; the others differ by at most one column
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}, "rows": []}
    out = args.work / f"moe_layer{'-' + args.tag if args.tag else ''}.json"
    for backend in args.backends:
        try:
            resolve_backend(backend, device, D, dtype)
        except Exception as exc:  # a backend this machine cannot run is reported, not measured
            result["rows"].append({"backend": backend, "skipped": str(exc)})
            write_json_atomic(out, result)
            continue
        shard = grouped(w_in_EDF[:, :, lo:hi], w_out_EFD[:, lo:hi, :], backend)
        for seqs in args.seqs:
            for skew in args.skews:
                tokens = G * seqs * args.seq_len  # a MoEShard rank computes every rank's tokens
                draws = torch.Generator().manual_seed(seqs * 1000 + int(skew * 100))
                expert_N = torch.multinomial(skewed_probabilities(E, skew, args.hot_experts), tokens, replacement=True, generator=draws)
                counts_E = torch.bincount(expert_N, minlength=E)
                x_ND = torch.randn(tokens, D, device=device, dtype=dtype, generator=gen)
                moeshard_ms = median_ms(lambda: shard(x_ND, counts_E), device)
                per_rank_GE = counts_E.view(G, E // G)  # expert parallelism: rank r holds experts [r*E/G, (r+1)*E/G)
                busiest = int(per_rank_GE.sum(1).argmax())
                mine = slice(busiest * E // G, (busiest + 1) * E // G)
                ep = grouped(w_in_EDF[mine], w_out_EFD[mine], backend)
                ep_ms = median_ms(lambda: ep(x_ND[: int(per_rank_GE[busiest].sum())], per_rank_GE[busiest]), device)
                result["rows"].append({"backend": backend, "seqs_per_gpu": seqs, "skew": skew, "tokens_all_ranks": tokens,
                                       "moeshard_rank_ms": moeshard_ms, "moeshard_flops": 2 * 2 * tokens * D * (hi - lo),
                                       "ep_busiest_ms": ep_ms, "ep_busiest_share": int(per_rank_GE[busiest].sum()) / tokens})
                write_json_atomic(out, result)
                print(f"moe layer {backend} seqs {seqs} skew {skew}: MoEShard rank {moeshard_ms:.3f} ms, ep busiest {ep_ms:.3f} ms", flush=True)


# ---------------------------------------------------------------- report


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def machine_lines() -> list[str]:
    from moeshard_cli.bench.command import machine

    info = machine()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        card = f"{info['gpu']} (compute capability {major}.{minor}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible)"
    else:
        card = "no CUDA device: a dry run on CPU with tiny sizes, not numbers for the docs"
    try:
        import grouped_gemm  # noqa: F401

        gg = "importable"
    except Exception:
        gg = "not importable"
    return [f"- card: {card}", f"- CPU: {info['cpu']}, {info['cores']} cores",
            f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, grouped_gemm {gg}"]


def steps_table(work: Path) -> list[str]:
    path = work / "steps.tsv"
    if not path.is_file():
        return []
    lines = ["| step | exit code | seconds |", "|---|---|---|"]
    for row in path.read_text().splitlines():
        name, code, seconds = row.split("\t")
        note = " (timed out)" if code in ("124", "137") else ""
        lines.append(f"| {name} | {code}{note} | {seconds} |")
    return lines


SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b.* in [\d.]+s")


def tests_section(work: Path) -> list[str]:
    lines = []
    for name in ("pytest", "pytest-megablocks"):
        log = work / f"{name}.log"
        if not log.is_file():
            continue
        text = log.read_text().splitlines()
        summary = next((line.strip("= ") for line in reversed(text) if SUMMARY.search(line)), "no summary line (see the log)")
        lines += [f"`{name}`: {summary}", ""]
        lines += [f"- {line.split('gpu figure |', 1)[1].strip()}" for line in text if "gpu figure |" in line]
        lines += [f"- {line.strip()}" for line in text if line.startswith(("SKIPPED", "FAILED", "ERROR"))]
        lines.append("")
    return lines


def throughput_section(data: dict | None, peak: float) -> list[str]:
    if not data or not data["rows"]:
        return ["not measured (see the step's exit code and log)."]
    cfg = data["config"]
    lines = [f"{cfg['model']}, {cfg['lines']:,} lines of about {cfg['line_bytes']} bytes (ByT5: a token a byte), batch {cfg['batch_size']}, "
             f"window {cfg['window']}, world size 1. Encoders: median of {cfg['repeats']} passes over the same batches after a warm-up. "
             f"TFLOP/s: matmul FLOPs of the real tokens over the pass's time; % of the bf16 peak ({peak:g} TFLOP/s) for every dtype. "
             "max abs diff: largest difference between an encoder's first-batch rows and transformers'. `--attention fused`: "
             "the same encoder with T5's attention through scaled_dot_product_attention. "
             "`moeshard run`: its encode loop (first batch cold) and the whole command.", "",
             "| dtype | tokens | padding | moeshard tok/s | fused attention tok/s | transformers tok/s | moeshard / transformers "
             "| fused / transformers | moeshard TFLOP/s (% peak) | transformers TFLOP/s (% peak) | max abs diff (fused) "
             "| `moeshard run` loop tok/s | `moeshard run` command s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ours, fused, theirs = (statistics.median(r[k]) for k in ("moeshard_s", "moeshard_fused_s", "transformers_s"))
        tf_ours, tf_theirs = r["flops"] / min(ours, fused) / 1e12, r["flops"] / theirs / 1e12
        lines.append(f"| {r['dtype']} | {r['tokens']:,} | {r['padding_fraction']:.1%} | {r['tokens'] / ours:,.0f} | {r['tokens'] / fused:,.0f} | "
                     f"{r['tokens'] / theirs:,.0f} | {theirs / ours:.2f}x | {theirs / fused:.2f}x | {tf_ours:.3g} ({tf_ours / peak:.2%}) | "
                     f"{tf_theirs:.3g} ({tf_theirs / peak:.2%}) | {r['first_batch_max_abs_diff']:.1e} ({r['fused_first_batch_max_abs_diff']:.1e}) | "
                     f"{r['tokens'] / r['run_loop_s']:,.0f} | {r['run_wall_s']:.1f} |")
    return lines


def moe_layer_section(data: dict | None, peak: float) -> list[str]:
    if not data or not data["rows"]:
        return ["not measured (see the step's exit code and log)."]
    cfg = data["config"]
    lines = [f"E={cfg['experts']}, d_model {cfg['d_model']}, d_ff {cfg['d_ff']} over {cfg['ranks']} simulated ranks, {cfg['dtype']}, "
             f"{cfg['seq_len']} tokens a sequence, hot experts {cfg['hot_experts']}; median of 20 timings. `ep` is the busiest "
             f"expert-parallel rank, holding {cfg['experts'] // cfg['ranks']} whole experts.", "",
             "| backend | sequences per GPU | skew | MoEShard rank ms | TFLOP/s (% bf16 peak) | ep busiest ms | ep busiest share | ep / MoEShard |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped: {r['skipped']} | | | | | | |")
            continue
        tflops = r["moeshard_flops"] / r["moeshard_rank_ms"] / 1e9
        lines.append(f"| {r['backend']} | {r['seqs_per_gpu']} | {r['skew']:g} | {r['moeshard_rank_ms']:.3f} | {tflops:.3g} ({tflops / peak:.2%}) | "
                     f"{r['ep_busiest_ms']:.3f} | {r['ep_busiest_share']:.2f} | {r['ep_busiest_ms'] / r['moeshard_rank_ms']:.2f} |")
    return lines


def report(args) -> None:
    work = args.work
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## GPU ({now})", "", *machine_lines(), f"- command: `{args.command}`", "", "### Steps", "", *steps_table(work), "",
             "### Tests (`python -m pytest -m gpu tests/test_gpu.py`)", "", *tests_section(work),
             "### Encoder throughput: `moeshard run` against transformers, same device and batches", "",
             *throughput_section(read_json(work / "throughput.json"), args.peak_tflops), "",
             "### One MoE layer's experts: a MoEShard rank against the busiest expert-parallel rank", "",
             *moe_layer_section(read_json(work / "moe_layer.json"), args.peak_tflops), ""]
    megablocks = read_json(work / "moe_layer-megablocks.json")
    if megablocks:
        lines += ["With megablocks' grouped GEMM (grouped_gemm, built during this check):", "", *moe_layer_section(megablocks, args.peak_tflops), ""]
    build = work / "grouped_gemm-build.txt"
    if build.is_file():
        lines += [f"grouped_gemm build: {build.read_text().strip()}", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


# ---------------------------------------------------------------- command line


def comma_list(kind):
    return lambda text: [kind(t) for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("throughput", help="moeshard run against transformers' encoder")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="switch-base-8")
    p.add_argument("--lines", type=int, default=2048)
    p.add_argument("--line-bytes", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtypes", type=comma_list(str), default=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=throughput)
    p = sub.add_parser("moe-layer", help="one MoE layer's experts, ranks simulated on one device")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-ff", type=int, default=3072)
    p.add_argument("--seq-len", type=int, default=120)
    p.add_argument("--seqs", type=comma_list(int), default=[1, 10, 100, 450])
    p.add_argument("--skews", type=comma_list(float), default=[0.0, 0.6])
    p.add_argument("--hot-experts", type=float, default=0.1)
    p.add_argument("--backends", type=comma_list(str), default=["grouped_mm"])
    p.add_argument("--tag", default="", help="suffix of the JSON file's name")
    p.set_defaults(func=moe_layer)
    p = sub.add_parser("report", help="the markdown results file")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
