"""Corpora for the benchmark scripts: lines of random words from the bundled sample text."""

from __future__ import annotations

import random
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
