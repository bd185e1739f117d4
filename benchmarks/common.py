"""What the benchmark scripts share: corpora of random words from the bundled sample text, shard sets made once."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

WORDS = (Path(__file__).resolve().parents[1] / "moeshard_cli" / "data" / "sample.txt").read_text().split()


def word_corpus(path: Path, lines: int, min_chars: int, max_chars: int, seed: int) -> None:
    """`lines` lines of random words, each cut to a length drawn from [min_chars, max_chars]; written
    under a temporary name, so an interrupted script never leaves a short corpus behind."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(lines):
            target, text = (min_chars if min_chars == max_chars else rng.randint(min_chars, max_chars)), ""
            while len(text) < target:
                text += rng.choice(WORDS) + " "
            f.write(text[:target].strip() + "\n")
    tmp.rename(path)


def shard_set(out: Path, model: str, workers: int) -> Path:
    """`out/<model>-w<workers>`, sharded by `moeshard shard` unless a complete set is already there."""
    shards = out / f"{model}-w{workers}"
    if not (shards / "moeshard.json").exists():
        subprocess.run([sys.executable, "-m", "moeshard_cli", "shard", model, "--gpus", str(workers), "--out", str(shards)],
                       check=True, stdout=subprocess.DEVNULL)
    return shards
