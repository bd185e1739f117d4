"""`moeshard bench`'s time estimate against the real time of the command, on this machine.

Usage: python benchmarks/bench_estimate.py [--out bench-estimate] [--only NAME ...]
Runs each sweep below as a user would (`python -m moeshard_cli bench ...`), times the command from
the moment it prints its estimate to its exit (what the estimate promises), reads the estimate and its JSON (the phases: start-up, model
set-up, the forwards; the slowdown it measured), and prints a markdown table for docs/benchmarks.md with the load average
before and after each run: on a machine shared with other work both the estimate (which measures a
matmul rate when it starts) and the real time move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SWEEPS = {
    "experts": ["--experts", "8", "--gpus", "2", "--iters", "3", "--systems", "moeshard,ep"],
    "skew": ["--model", "tiny-switch", "--skew", "0,0.3,0.6", "--systems", "moeshard,ep,hf", "--seq-len", "64"],
    "batch": ["--experts", "8", "--batch-sizes", "2,4,8", "--systems", "moeshard,ep", "--iters", "3"],
}
UNITS = {"ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}


def parse_estimate(stdout: str) -> float:
    """Seconds of "estimated time: about 1 min 5 s" (or "35.9 s", "850 ms")."""
    line = next(line for line in stdout.splitlines() if line.startswith("estimated time: about "))
    text = line.removeprefix("estimated time: about ").split(" (")[0]
    return sum(float(n.replace(",", "")) * UNITS[u] for n, u in re.findall(r"([\d.,]+) (ms|s|min|h)\b", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-estimate"))
    parser.add_argument("--only", nargs="*", choices=list(SWEEPS), default=list(SWEEPS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| sweep | command | estimate | real | real / estimate | slowdown | start-up est. / real | load before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only:
        json_path = args.out / f"{name}.json"
        command = ["moeshard", "bench", *SWEEPS[name]]
        load = os.getloadavg()[0]
        proc = subprocess.Popen([sys.executable, "-m", "moeshard_cli", *command[1:], "--json", str(json_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
        stdout, t0 = "", None
        for line in proc.stdout:
            stdout += line
            if t0 is None and line.startswith("estimated time: "):
                t0 = time.perf_counter()
        stderr = proc.stderr.read()
        if proc.wait() or t0 is None:
            sys.exit(f"{' '.join(command)} failed: {stderr.strip()}")
        real = time.perf_counter() - t0
        est = parse_estimate(stdout)
        result = json.loads(json_path.read_text())
        guess = result["estimate"]
        print(f"| {name} | `{' '.join(command)}` | {est:.1f} s | {real:.1f} s | {real / est:.2f} | {guess['slowdown']:.1f}x | "
              f"{guess['parts']['start-up']:.0f} / {result['phases']['start_s']:.0f} s | {load:.1f} / {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
