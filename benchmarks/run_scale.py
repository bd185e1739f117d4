"""`moeshard run` at corpus scale: wall time, encode-loop time, tokens/s and peak memory per process.

Usage: python benchmarks/run_scale.py [--model tiny-switch] [--workers 2] [--lines 10000,100000,1000000]
         [--length 120] [--batch-size 32] [--out bench-scale] [--repeats 1]
Prints a markdown table for docs/benchmarks.md. Per corpus size: the command's wall time (measured
here, from process start to exit), the encode loop's time and tokens (from --json), end-to-end
tokens/s (all tokens over the wall time) against encode-loop tokens/s, and the peak resident memory
(VmHWM, read from /proc every 0.2 s, so a peak in a process's last 0.2 s can be missed) of the
launcher and of each worker. Corpora are random words, about --length bytes a line, made once.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
from common import shard_set, word_corpus

def peak_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def worker_rank(proc: psutil.Process) -> int | None:
    """Workers write stderr to <log dir>/<run>/attempt_0/<local rank>/stderr.log."""
    try:
        for f in proc.open_files():
            m = re.search(r"/attempt_\d+/(\d+)/stderr\.log$", f.path)
            if m:
                return int(m.group(1))
    except psutil.Error:
        pass
    return None


def measure(args, shards: Path, corpus: Path) -> dict:
    result = args.out / "result.json"
    cmd = [sys.executable, "-m", "moeshard_cli", "run", "--shards", str(shards), "--input", str(corpus), "--restart",
           "--batch-size", str(args.batch_size), "--output", str(args.out / "emb.safetensors"), "--json", str(result)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peaks: dict[str, int] = {}
    ranks: dict[int, int] = {}
    while proc.poll() is None:
        if (rss := peak_rss(proc.pid)) is not None:
            peaks["launcher"] = rss
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.Error:
            children = []
        for child in children:
            if child.pid not in ranks and (rank := worker_rank(child)) is not None:
                ranks[child.pid] = rank
            if child.pid in ranks and (rss := peak_rss(child.pid)) is not None:
                peaks[f"rank {ranks[child.pid]}"] = rss
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"moeshard run failed with exit code {proc.returncode}")
    fig = json.loads(result.read_text())
    return {"lines": fig["lines"], "tokens": fig["tokens_encoded"], "wall_s": wall, "loop_s": fig["loop_s"],
            "e2e_tps": fig["tokens_encoded"] / wall, "loop_tps": fig["loop_tokens_per_s"], "peaks": peaks,
            "spread": fig["token_spread"], "padding": fig["padding_fraction"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-switch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lines", default="10000,100000,1000000")
    p.add_argument("--length", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("bench-scale"))
    args = p.parse_args()
    args.out.mkdir(exist_ok=True)
    shards = shard_set(args.out, args.model, args.workers)
    rows = []
    for n in [int(x) for x in args.lines.split(",")]:
        corpus = args.out / f"corpus-{n}.txt"
        if not corpus.exists():
            word_corpus(corpus, n, args.length, args.length, seed=n)
        rows.append(measure(args, shards, corpus))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    names = ["launcher"] + [f"rank {r}" for r in range(args.workers)]
    print("| lines | tokens | command s | encode loop s | end-to-end tok/s | loop tok/s | end-to-end / loop | token spread mean / max | padding | "
          + " | ".join(f"peak RSS {n}" for n in names) + " |")
    print("|" + "---|" * (9 + len(names)))
    for r in rows:
        print(f"| {r['lines']:,} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['e2e_tps']:,.0f} | {r['loop_tps']:,.0f} | "
              f"{r['e2e_tps'] / r['loop_tps']:.1%} | {r['spread']['mean']:.3f} / {r['spread']['max']:.3f} | {r['padding']:.1%} | "
              + " | ".join(f"{r['peaks'].get(n, 0) / 2**20:,.0f} MiB" for n in names) + " |")


if __name__ == "__main__":
    main()
