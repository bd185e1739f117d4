"""`moeshard run` against transformers in one process, on the same corpus and cores.

Usage: python benchmarks/run_vs_transformers.py [--model switch-base-8|qwen3-moe-mid|...] [--workers 2]
         [--lines 64] [--batch-size 8] [--repeats 3] [--skews model,0,0.6] [--out bench-run]
Prints a markdown table (tokens/s, medians over repeats) for docs/benchmarks.md: for each router
(the model's, skewed 0, skewed 0.6), transformers' own model in one process (all cores; dropless;
decoders with transformers' default grouped_mm experts) and moeshard's encode loop with the same
router. Both sides time the whole corpus, first batch included, and exclude process start-up and
model loading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import WORDS, shard_set


def corpus(path: Path, lines: int, length: int) -> None:
    rng = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(lines):
        text = ""
        while len(text.encode()) < length - 1:
            text += WORDS[int(torch.randint(len(WORDS), (1,), generator=rng))] + " "
        rows.append(text.encode()[: length - 1].decode(errors="ignore").strip())
    path.write_text("\n".join(rows) + "\n")


def moeshard(args, shards: Path, text: Path, *extra: str) -> float:
    out = args.out / "result.json"
    subprocess.run([sys.executable, "-m", "moeshard_cli", "run", "--shards", str(shards), "--input", str(text),
                    "--batch-size", str(args.batch_size), "--json", str(out), "--output", str(args.out / "emb.safetensors"), "--force", *extra],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["loop_tokens_per_s"]  # the encode loop: start-up and loading excluded


def transformers_tokens_per_s(shards: Path, text: Path, batch_size: int, threads: int, router: str) -> float:
    from transformers import AutoTokenizer

    from moeshard_cli.moe.layer import token_ids_for
    from moeshard_cli.moe.routing import RouterSpec
    from moeshard_cli.run.inputs import input_spec, read_windows, tokenize
    from moeshard_cli.run.schedule import plan_window
    from moeshard_cli.shard.manifest import read_shard_set
    from moeshard_cli.reference import force_router, reference_model

    torch.set_num_threads(threads)
    s = read_shard_set(shards)
    model = reference_model(s)
    if s.family.decoder and s.dims.d_ff * 4 % 16 == 0:
        model.set_experts_implementation("grouped_mm")  # transformers' default; the oracle's eager loop is for exactness
    holder: dict = {}
    force_router(s.family, model, RouterSpec() if router == "model" else RouterSpec("skewed", float(router)), holder)
    ids, _ = tokenize([t for w in read_windows(input_spec(text), 1 << 30) for t in w.texts], AutoTokenizer.from_pretrained(str(shards)), 512)
    batches = [step[0] for step in plan_window([len(r) for r in ids], batch_size, 1)]  # run's batching, one worker
    # Like `moeshard run`'s wall time: the whole corpus, first (cold) batch included, loading excluded.
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            width = max(len(ids[i]) for i in batch)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            m = torch.zeros_like(x)
            for r, i in enumerate(batch):
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                m[r, : len(ids[i])] = 1
            holder["ids"] = token_ids_for(batch, width)
            s.family.hidden_states(model, x, m)
            tokens += int(m.sum())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="switch-base-8")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lines", type=int, default=64)
    p.add_argument("--length", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skews", default="model,0,0.6", help="routers to compare: model, or a skew of the skewed router")
    p.add_argument("--out", type=Path, default=Path("bench-run"))
    args = p.parse_args()
    args.out.mkdir(exist_ok=True)
    shards = shard_set(args.out, args.model, args.workers)
    text = args.out / "corpus.txt"
    corpus(text, args.lines, args.length)
    arms = {}
    for router in args.skews.split(","):
        flags = [] if router == "model" else ["--router", "skewed", "--skew", router]
        label = "model router" if router == "model" else f"skewed {router}"
        arms[f"transformers, 1 process, {label}"] = lambda r=router: transformers_tokens_per_s(shards, text, args.batch_size, os.cpu_count() or 1, r)
        arms[f"moeshard, {args.workers} workers, {label}"] = lambda f=flags: moeshard(args, shards, text, *f)
    samples: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.repeats):  # interleaved, so drift hits every arm alike
        for name, fn in arms.items():
            samples[name].append(fn())
    print(f"| system | tokens/s (median of {args.repeats}) | moeshard / transformers |\n|---|---|---|")
    names = list(arms)
    for hf, ours in zip(names[::2], names[1::2]):
        base = statistics.median(samples[hf])
        print(f"| {hf} | {base:,.0f} | |")
        print(f"| {ours} | {statistics.median(samples[ours]):,.0f} | {statistics.median(samples[ours]) / base:.2f}x |")


if __name__ == "__main__":
    main()
