"""`moeshard bench`: bad input fails fast in one line; a tiny sweep's JSON is complete and its
systems agree with each other where they should (dropless) and not where they drop."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from conftest import run_cli

BAD = [
    (["--skew", "-0.1"], "--skew -0.1 is negative"),
    (["--hot-experts", "0"], "--hot-experts 0.0 is outside (0, 1]"),
    (["--hot-experts", "1.5"], "--hot-experts 1.5 is outside (0, 1]"),
    (["--experts", ""], "--experts is empty"),
    (["--experts", "8,x"], "is not a list of numbers"),
    (["--gpus", "99"], "99 CPU workers on"),
    (["--systems", "moeshard,megatron"], "unknown system megatron"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(args, message):
    code, out, err = run_cli(["bench", *args], timeout=60)
    assert code != 0
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_unwritable_plot_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    start = time.perf_counter()
    code, out, err = run_cli(["bench", "--plot", blocker / "fig.png"], timeout=60)
    assert code != 0
    assert "cannot write --plot" in err and "is not a directory" in err and "Traceback" not in err
    assert "estimated time" not in out  # nothing started
    assert time.perf_counter() - start < 20


EVENTS: list[str] = []


def _imported(name: str) -> str:
    EVENTS.append(f"imported {name}")
    return name


class HeavyJob:
    """Unpickling it stands for importing transformers and the bench worker (seconds)."""

    def __reduce__(self):
        return _imported, ("the bench worker",)


def _entry(job):
    EVENTS.append(f"ran {job}")
    return 7


def test_workers_are_tied_to_the_launcher_before_their_heavy_imports(monkeypatch):
    """Bench workers set their parent-death signal only after importing transformers and the bench:
    a SIGKILLed launcher left them running for ~16 s. Now every worker unpickles its job after it."""
    import pickle
    import signal

    from moeshard_cli import launch

    EVENTS.clear()
    monkeypatch.setattr(launch, "die_with_parent", lambda: EVENTS.append("tied to the launcher"))
    for key, value in {"LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0", "RANK": "5"}.items():
        monkeypatch.setenv(key, value)
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert launch.as_node_rank(pickle.dumps((_entry, HeavyJob())), 0) == 7
    finally:
        signal.signal(signal.SIGINT, previous)
    assert EVENTS == ["tied to the launcher", "imported the bench worker", "ran the bench worker"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Piped (as in CI, nohup or Slurm): plain progress lines, here every forward (the interval is 0), and -v's line per cell."""
    out = tmp_path_factory.mktemp("bench")
    args = ["-v", "bench", "--model", "tiny-switch", "--batch-sizes", "2,3", "--seq-len", "16", "--iters", "3", "--warmup", "1",
            "--skew", "0,0.6", "--systems", "moeshard,ep,deepspeed,deepspeed-dropless,hf", "--capacity-factor", "1",
            "--per-layer", "--json", out / "bench.json", "--plot", out / "fig.png"]
    code, stdout, stderr = run_cli(args, env={"MOESHARD_PROGRESS_SECONDS": "0"}, timeout=240)
    assert code == 0, stderr
    return json.loads((out / "bench.json").read_text()), stdout, out


def test_json_layout(tiny_sweep):
    from moeshard_cli import __version__

    result, stdout, _ = tiny_sweep
    assert {"moeshard", "config", "machine", "started", "seconds", "estimate", "phases", "cells"} <= set(result)
    assert result["moeshard"] == __version__
    for key in ("torch", "transformers", "deepspeed", "cpu", "cores"):
        assert key in result["machine"]
    config = result["config"]
    assert config["workers"] == 2 and config["skews"] == [0.0, 0.6] and config["batch_sizes"] == [2, 3]
    assert config["model"] == "tiny-switch" and "experts" not in config  # --model made the expert counts moot
    assert result["estimate"]["slowdown"] >= 1 and set(result["estimate"]["parts"]) == {"start-up", "model set-up", "forwards"}
    assert 0 < result["phases"]["start_s"] < result["seconds"] and set(result["phases"]["model_setup_s"]) == {"tiny-switch"}
    cells = result["cells"]
    assert len(cells) == 2 * 2 * 5  # batch sizes x skews x systems
    for c in cells:
        assert c["skipped"] is None
        # milliseconds, as the tables: a forward of the tiny model takes more than 0.1 ms and less than 60 s
        assert len(c["samples_ms"]) == 3 and all(0.1 < s < 60_000 for s in c["samples_ms"])
        assert set(c["per_layer_ms"]) == {"1", "3"} and all(len(v) == 3 for v in c["per_layer_ms"].values())
        assert max(max(v) for v in c["per_layer_ms"].values()) < max(c["samples_ms"])  # a layer is part of the forward
        assert {"experts", "batch_size", "seq_len", "skew", "system", "dropped_pct", "imbalance", "max_abs_diff_vs_moeshard"} <= set(c)
    assert "TTFT" in stdout and "MoE layer latency" in stdout


def test_a_piped_bench_prints_progress_lines_and_verbose_cells(tiny_sweep):
    """Not a terminal: a plain line (cells done, the current one, elapsed, ETA) instead of a bar; -v adds each
    finished cell's median and the estimate's parts."""
    stdout = tiny_sweep[1]
    lines = [line for line in stdout.splitlines() if line.startswith("bench: ")]
    assert lines and all(" cells (" in line and "elapsed 0:" in line for line in lines)
    assert any(", ETA 0:" in line for line in lines)
    assert any(line.startswith("bench: 20/20 cells (100%)") for line in lines)
    assert "estimated time: about " in stdout and "(start-up " in stdout and "forwards " in stdout
    assert len([line for line in stdout.splitlines() if line.startswith("tiny-switch B=") and line.endswith(" median of 3")]) == 20


def test_dropless_systems_agree_and_dropping_differs(tiny_sweep):
    cells = tiny_sweep[0]["cells"]
    for c in cells:
        if c["system"] in ("ep", "deepspeed-dropless", "hf"):
            assert c["max_abs_diff_vs_moeshard"] <= 1e-4, c
            assert c["dropped_pct"] == 0.0
    skewed_ds = [c for c in cells if c["system"] == "deepspeed" and c["skew"] == 0.6]
    assert all(c["dropped_pct"] > 0 for c in skewed_ds)  # capacity factor 1 under skew must drop
    assert all(c["max_abs_diff_vs_moeshard"] > 1e-3 for c in skewed_ds)


def test_imbalance_reflects_skew(tiny_sweep):
    cells = tiny_sweep[0]["cells"]
    moeshard = [c["imbalance"] for c in cells if c["system"] == "moeshard"]
    assert moeshard == [1.0] * len(moeshard)  # perfect balance by construction
    ep = {c["skew"]: c["imbalance"] for c in cells if c["system"] == "ep" and c["batch_size"] == 3}
    assert ep[0.6] > ep[0.0] >= 1.0  # the hot experts all live on worker 0


def test_plot_is_a_png(tiny_sweep):
    data = (tiny_sweep[2] / "fig.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 200


def test_a_cells_dropped_tokens_do_not_depend_on_the_cells_before_it(tiny_sweep, tmp_path):
    """The sweep's last cell (batch 3, skew 0.6) ran after three others on the same DeepSpeed layers;
    alone, it must report the same dropped share (the counters are reset per cell)."""
    args = ["-q", "bench", "--model", "tiny-switch", "--batch-sizes", "3", "--seq-len", "16", "--iters", "3", "--warmup", "1",
            "--skew", "0.6", "--systems", "moeshard,deepspeed", "--capacity-factor", "1", "--json", tmp_path / "alone.json"]
    code, stdout, stderr = run_cli(args, env={"MOESHARD_PROGRESS_SECONDS": "0"}, timeout=240)
    assert code == 0, stderr
    # -q: the results only, no estimate and no progress lines even at a zero interval
    assert "estimated time" not in stdout and "bench: " not in stdout and "TTFT" in stdout and "wrote " in stdout
    alone = {c["system"]: c for c in json.loads((tmp_path / "alone.json").read_text())["cells"]}
    swept = {c["system"]: c for c in tiny_sweep[0]["cells"] if c["batch_size"] == 3 and c["skew"] == 0.6}
    earlier = [c["dropped_pct"] for c in tiny_sweep[0]["cells"] if c["system"] == "deepspeed" and (c["batch_size"], c["skew"]) != (3, 0.6)]
    assert alone["deepspeed"]["dropped_pct"] > 0 and any(pct != alone["deepspeed"]["dropped_pct"] for pct in earlier)
    assert swept["deepspeed"]["dropped_pct"] == alone["deepspeed"]["dropped_pct"]


def hand_made_result(configs: list[tuple[int, int, float]], systems=("moeshard", "deepspeed", "ep")) -> dict:
    """A bench result without a bench: each system is a fixed factor slower than moeshard."""
    factor = {"moeshard": 1.0, "deepspeed": 8.0, "ep": 1.2}
    cells = [{"experts": E, "model": f"switch-base-{E}", "batch_size": B, "seq_len": 16, "skew": skew, "workers": 2,
              "system": s, "samples_ms": [10 * B * factor[s] * (1 + i / 10) for i in range(5)], "per_layer_ms": None,
              "skipped": None, "imbalance": 1.0, "max_abs_diff_vs_moeshard": 0.0, "dropped_pct": 0.0}
             for E, B, skew in configs for s in systems]
    cells[-1] |= {"samples_ms": [], "skipped": "over the time budget"}  # skipped cells are left out
    return {"config": {"model": None, "workers": 2, "device": "cpu", "seq_len": 16, "hot_experts": 0.1, "capacity_factor": None},
            "machine": {"cpu": "test CPU", "cores": 2}, "started": "", "seconds": 0.0, "cells": cells}


PLOT_CASES = {
    "batch sweep": [(128, B, 0.6) for B in (1, 2, 4, 8)],
    "experts and skew": [(E, 8, skew) for E in (8, 32) for skew in (0.0, 0.6)],
    "single configuration": [(8, 8, 0.6)],
}


@pytest.mark.parametrize("case", PLOT_CASES)
def test_plot_draws_every_panel(case, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from moeshard_cli.bench.report import figure, plot

    result = hand_made_result(PLOT_CASES[case])
    plot(tmp_path / "fig.png", result)
    data = (tmp_path / "fig.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24])[0] > 500
    fig = figure(result)
    try:
        assert fig.axes and all(ax.containers for ax in fig.axes)  # every panel has bars or error-bar lines
        assert len(fig.axes) == {"batch sweep": 2, "experts and skew": 4, "single configuration": 1}[case]
        if case == "experts and skew":  # one line per value of the other axis, told apart by a legend
            assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["skew 0", "skew 0.6"]
        if case == "single configuration":
            assert any("moeshard 8.00x faster" in t.get_text() for t in fig.axes[0].texts)
    finally:
        plt.close(fig)


def test_plot_ticks_the_swept_batch_sizes():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from moeshard_cli.bench.report import figure

    fig = figure(hand_made_result([(128, B, 0.6) for B in (1, 2, 4, 8)]))
    try:
        for ax in fig.axes:
            assert ax.get_xlabel().startswith("batch size")
            assert list(ax.get_xticks()) == [1, 2, 4, 8]
            assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    finally:
        plt.close(fig)


@pytest.fixture(scope="module")
def decoder_sweep(tmp_path_factory):
    """A tiny Mixtral saved by transformers (F = 40: each of 2 ranks' slices is 16-byte aligned, as tp needs)."""
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=None, eos_token_id=1)
    return bench_saved(config, tmp_path_factory.mktemp("bench-decoder"), "0,0.6", "moeshard,ep,hf,tp,deepspeed,deepspeed-dropless")


def bench_saved(config, out: Path, skews: str, systems: str) -> list[dict]:
    """A random model of `config` saved by transformers, benchmarked on 2 workers (3 short forwards a cell): the cells."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(str(out / "model"))
    args = ["bench", "--model", out / "model", "--batch-sizes", "2", "--seq-len", "16", "--iters", "3", "--warmup", "1",
            "--skew", skews, "--systems", systems, "--json", out / "bench.json"]
    code, _, stderr = run_cli(args, timeout=300)
    assert code == 0, stderr
    return json.loads((out / "bench.json").read_text())["cells"]


def test_decoder_systems_agree_with_moeshard(decoder_sweep):
    """ep, transformers' own experts (hf), transformers' tensor-parallel plan (tp) and dropless DeepSpeed (its top-2
    gate, gated experts) give moeshard's output; DeepSpeed at the paper's capacity factor drops nothing at E=4."""
    by = {(c["system"], c["skew"]): c for c in decoder_sweep}
    for system in ("ep", "hf", "tp", "deepspeed-dropless", "deepspeed"):
        for skew in (0.0, 0.6):
            cell = by[system, skew]
            assert cell["skipped"] is None, cell
            assert cell["max_abs_diff_vs_moeshard"] <= 1e-4 and cell["dropped_pct"] == 0.0, cell
            assert len(cell["samples_ms"]) == 3
    assert by["ep", 0.6]["imbalance"] > by["ep", 0.0]["imbalance"]  # hot experts pile onto one worker
    assert by["tp", 0.6]["imbalance"] == by["moeshard", 0.6]["imbalance"] == 1.0


def test_tp_on_a_shared_expert_family_agrees_with_moeshard(tmp_path):
    """transformers' tensor-parallel plan on Qwen2-MoE (a shared expert behind a sigmoid gate; widths 40 and 48,
    16-byte slices at 2 ranks) gives MoEShard's output."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                            eos_token_id=1)
    (tp,) = [c for c in bench_saved(config, tmp_path, "0.6", "moeshard,tp") if c["system"] == "tp"]
    assert tp["skipped"] is None and tp["max_abs_diff_vs_moeshard"] is not None and tp["max_abs_diff_vs_moeshard"] <= 1e-4, tp


def test_tp_refuses_slices_it_cannot_run(tmp_path):
    """tiny-qwen3-moe's experts are 38 wide: 19-column slices are not 16-byte rows, so its cells say why, and
    Switch has no tensor-parallel plan; both are decided before anything is loaded."""
    import torch

    from moeshard_cli.bench.systems import Skip
    from moeshard_cli.bench.worker import _tensor_parallel
    from moeshard_cli.shard.sources import resolve

    qwen = _tensor_parallel(resolve("tiny-qwen3-moe"), tmp_path, 0, 2, torch.device("cpu"))
    assert isinstance(qwen, Skip) and "16 bytes" in qwen.reason and "F=38" in qwen.reason
    switch = _tensor_parallel(resolve("tiny-switch"), tmp_path, 0, 2, torch.device("cpu"))
    assert isinstance(switch, Skip) and "Switch" in switch.reason


def test_the_progress_is_paced_by_each_cells_estimate():
    """The ETA's units are the estimate's seconds per cell (cells differ a hundredfold): the worker must find
    every cell's and every model's set-up estimate under the keys the command made them, none falling back."""
    from moeshard_cli.bench.command import START_S, estimate, slowdown
    from moeshard_cli.bench.options import BenchOptions
    from moeshard_cli.bench.worker import BenchJob, _Progress
    from moeshard_cli.ui import Display

    opts = BenchOptions(model="tiny-switch", skew="0,0.6", batch_sizes="2,64", systems="moeshard,ep")
    est = estimate(opts, 2, slower=3.0)
    assert est.slowdown == 3.0 and est.parts["start-up"] == 3 * START_S  # DeepSpeed's start-up is not in it
    progress = _Progress(BenchJob(opts, "run-id", "cpu", Display("off"), est.cells))
    assert progress.weight == est.cells and len(est.cells) == 1 + 2 * 2 * 2
    assert progress.tracker.total == pytest.approx(est.parts["model set-up"] + est.parts["forwards"])
    assert est.cells["tiny-switch", 64, 0.0, "moeshard"] > est.cells["tiny-switch", 2, 0.0, "moeshard"]
    assert 1.0 <= slowdown(0.01) < 1000
