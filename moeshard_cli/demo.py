"""`moeshard demo`: the whole pipeline on the built-in model, checked against transformers."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoTokenizer

from moeshard_cli.launch import pick_device
from moeshard_cli.shard.builtin import DEFAULT_MODEL
from moeshard_cli.shard.manifest import read_shard_set
from moeshard_cli.reference import reference_model, reference_outputs
from moeshard_cli.run.report import print_run_summary
from moeshard_cli.shard.report import print_shard_summary
from moeshard_cli.ui import Display, byte_progress
from moeshard_cli.run.command import RunOptions, run
from moeshard_cli.run.inputs import input_spec, read_windows, tokenize
from moeshard_cli.shard.command import ShardOptions, shard

TOLERANCE = 1e-4


def run_demo(console: Console, gpus: int, out: Path, debug: bool = False, display: Display = Display()) -> float:
    corpus = Path(str(files("moeshard_cli") / "data" / "sample.txt"))
    shards_dir = out / f"{DEFAULT_MODEL}-w{gpus}"
    options = ShardOptions(DEFAULT_MODEL, gpus, shards_dir, force=True)
    options.validate()
    pick_device("auto", gpus)  # before writing anything: can this machine host that many workers?
    console.rule(f"1. moeshard shard {DEFAULT_MODEL} --gpus {gpus} --out {shards_dir} --force")
    with byte_progress(console, "sharding", display) as progress:
        result = shard(options, progress=progress)
    print_shard_summary(console, result)

    output = out / "sample.moeshard.safetensors"
    console.rule(f"2. moeshard run --shards {shards_dir} --input {corpus.name} --batch-size 4")
    summary = run(RunOptions(input=corpus, shards=shards_dir, output=output, batch_size=4, debug=debug, restart=True, force=True,
                             progress=display,
                             argv=["run", "--shards", str(shards_dir), "--input", str(corpus), "--output", str(output), "--batch-size", "4"]))
    print_run_summary(console, summary)

    console.rule("3. check against transformers' SwitchTransformersEncoderModel in one process, dropless")
    shards = read_shard_set(shards_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(shards_dir))
    ids, _ = tokenize([t for w in read_windows(input_spec(corpus), 1 << 20) for t in w.texts], tokenizer, 512)
    expected = torch.stack(reference_outputs(shards.family, reference_model(shards), ids))
    err = (load_file(str(output))["embeddings"] - expected).abs().max().item()
    verdict = "[green]match[/]" if err <= TOLERANCE else "[red]MISMATCH[/]"
    console.print(f"max abs difference over {len(ids)} lines: {err:.2e} (tolerance {TOLERANCE:g}) {verdict}")
    if err > TOLERANCE:
        raise SystemExit(1)
    return err
