"""GPT-OSS: biased experts whose gate and up columns interleave, exact against transformers' own.

In process (cheap): each rank's slices, cut by the shard plan's own functions (`rank_cut`,
`held_by`), run through moeshard's experts module and summed over 1..4 ranks, give
transformers' `GptOssExperts` output; the two wrong layouts (the down bias on every rank; gate
and up taken as halves [gate | up] rather than interleaved) do not. A checkpoint written by
`save_pretrained` (fused [E, ...] expert tensors on disk) shards into per-expert rank slices
that reassemble bit for bit to what `from_pretrained` loads.

End to end (six `moeshard run`s, one module fixture): tiny-gpt-oss (experts 38 wide: 13/13/12
and 10/10/9/9 at 3 and 4 workers; a sliding-window layer) at worlds 1-4 across --score,
--pooling last and mean against transformers' causal LM in one process, and both wrong layouts
written into a world-2 shard set, where the same comparison must fail.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import invoke, write_lines
from moeshard_cli.families import builtin_family
from moeshard_cli.moe.dispatch import ShardedDispatch
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.experts import GroupedExperts
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.reference import reassemble_state, reference_model, reference_outputs
from moeshard_cli.shard.manifest import MANIFEST, read_shard_set
from moeshard_cli.shard.plan import held_by, rank_cut, slice_along, slice_bounds
from test_families import BATCH, CORPUS, MAX_LENGTH, TOL, embeddings, max_error, succeeded
from test_run import error_line, run_groups

MODEL = "tiny-gpt-oss"
FAMILY = builtin_family(MODEL)
CONFIG = FAMILY.builtin_config(MODEL)
E, F, D = CONFIG.num_local_experts, CONFIG.intermediate_size, CONFIG.hidden_size


# ---------------------------------------------------------------- in process: the slicing rule


def random_experts(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """transformers' per-expert tensors, large enough that the clamps (limit 7) bite and the biases count."""
    gen = torch.Generator().manual_seed(seed)
    return [{"gate_up_proj": torch.randn(D, 2 * F, generator=gen) * 0.6, "gate_up_proj_bias": torch.randn(2 * F, generator=gen),
             "down_proj": torch.randn(F, D, generator=gen) / F**0.5, "down_proj_bias": torch.randn(D, generator=gen)} for _ in range(E)]


def routed(T: int = 48, K: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=gen)
    ids_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return x_TD, ids_TK, torch.softmax(torch.randn(T, K, generator=gen), -1)


def rank_slices(experts, world: int, layout: str = "right") -> list[dict[str, list[torch.Tensor]]]:
    """Per rank {matrix: [slice per expert]}, as `shard` cuts them (layout "right"), or wrongly."""
    ranks = []
    for rank, (lo, hi) in enumerate(slice_bounds(F, world)):
        mats: dict[str, list[torch.Tensor]] = {}
        for matrix in experts[0]:
            key = FAMILY.expert_key(0, 0, matrix)
            if not held_by(FAMILY, key, rank) and layout != "bias-everywhere":
                continue
            for w in experts:
                cut = rank_cut(FAMILY, key, lo, hi)
                part = w[matrix] if cut is None else slice_along(w[matrix], *cut)
                if layout == "halves" and matrix.startswith("gate_up"):  # [gate | up] assumed: gate cols [lo, hi), up cols [F+lo, F+hi)
                    gate, up = w[matrix][..., lo:hi], w[matrix][..., F + lo:F + hi]
                    part = torch.stack([gate, up], -1).flatten(-2)
                mats.setdefault(matrix, []).append(part)
        ranks.append(mats)
    return ranks


def sharded_output(experts, world: int, layout: str = "right", backend: str = "grouped_mm") -> torch.Tensor:
    x_TD, ids_TK, weights_TK = routed()
    total = 0
    for mats in rank_slices(experts, world, layout):
        module = FAMILY.grouped_experts(CONFIG, mats, backend)
        total = total + ShardedDispatch(module, Collectives(), SectionTimer(torch.device("cpu")))(x_TD, ids_TK, weights_TK)[0]
    return total


@pytest.fixture(scope="module")
def transformers_output():
    experts = random_experts()
    x_TD, ids_TK, weights_TK = routed()
    with torch.no_grad():
        return experts, FAMILY.transformers_experts(CONFIG, experts)(x_TD, ids_TK, weights_TK)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_slices_sum_to_transformers_experts(transformers_output, world):
    experts, want = transformers_output
    for backend in ("grouped_mm", "loop"):
        got = sharded_output(experts, world, backend=backend)
        assert max_error(got, want) <= TOL, (backend, max_error(got, want))  # outputs ~20: fp32 rounding


@pytest.mark.parametrize("layout", ["bias-everywhere", "halves"])
def test_wrong_layouts_fail_the_comparison(transformers_output, layout):
    experts, want = transformers_output
    assert max_error(sharded_output(experts, 3, layout), want) > 0.1


def test_the_clamps_are_reached():
    """The activation is transformers' own `_apply_gate`: its clamps at +-7 are in play in these weights."""
    experts = random_experts()
    x_TD, *_ = routed()
    h = x_TD @ experts[0]["gate_up_proj"] + experts[0]["gate_up_proj_bias"]
    assert h[:, 0::2].max() > CONFIG.swiglu_limit and h[:, 1::2].abs().max() > CONFIG.swiglu_limit


# ---------------------------------------------------------------- a checkpoint written by transformers


def test_transformers_checkpoint_reassembles_bit_for_bit(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    source = tmp_path / "ckpt"
    model.save_pretrained(str(source))
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        on_disk = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert on_disk["model.layers.0.mlp.experts.gate_up_proj"] == [E, D, 2 * F]  # fused on disk, not per expert
    assert on_disk["model.layers.0.mlp.experts.down_proj_bias"] == [E, D]

    code, _, err = invoke(["shard", source, "--gpus", 3, "--out", tmp_path / "set"])
    assert code == 0, err
    shards = read_shard_set(tmp_path / "set")
    for rank, (lo, hi) in enumerate(shards.slices):
        with safe_open(str(shards.rank_file(rank)), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if ".experts.5." in k and ".layers.1." in k}
        prefix = "model.layers.1.mlp.experts.5"
        assert shapes.pop(f"{prefix}.gate_up_proj") == [D, 2 * (hi - lo)] and shapes.pop(f"{prefix}.down_proj") == [hi - lo, D]
        assert shapes.pop(f"{prefix}.gate_up_proj_bias") == [2 * (hi - lo)]
        assert shapes == ({f"{prefix}.down_proj_bias": [D]} if rank == 0 else {})  # the down bias: rank 0 only
    code, _, err = invoke(["shard", tmp_path / "set", "--gpus", 2, "--out", tmp_path / "again"])  # a shard set re-sharded
    assert code == 0, err
    want = AutoModelForCausalLM.from_pretrained(str(source)).state_dict()
    for shard_set in ("set", "again"):
        got = FAMILY.fuse(reassemble_state(read_shard_set(tmp_path / shard_set)))
        assert set(got) == set(want)
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), f"{shard_set}: {key} does not reassemble to transformers' parameter"


# ---------------------------------------------------------------- end to end against transformers' causal LM

MATRIX = [(1, "score"), (2, "last"), (3, "mean"), (4, "score")]  # every world; last, mean and score
WRONG = ("bias-everywhere", "halves")  # world 2, --pooling last: the twins of (2, "last")


def rewrite_rank_files(src: Path, dst: Path, layout: str) -> Path:
    """A copy of shard set `src` laid out wrongly: the down bias in every rank file, or gate_up's
    slices cut as if it were [gate | up] halves. The manifest's sizes and checksums follow."""
    shutil.copytree(src, dst)
    shards = read_shard_set(dst)
    full = reassemble_state(shards)
    manifest = json.loads((dst / MANIFEST).read_text())
    for rank, (lo, hi) in enumerate(shards.slices):
        path = shards.rank_file(rank)
        with safe_open(str(path), "pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        for key, tensor in full.items():
            parsed = FAMILY.parse_expert_key(key)
            if parsed and layout == "bias-everywhere" and parsed[2] == "down_proj_bias":
                state[key] = tensor
            if parsed and layout == "halves" and parsed[2].startswith("gate_up"):
                state[key] = torch.stack([tensor[..., lo:hi], tensor[..., F + lo:F + hi]], -1).flatten(-2).contiguous()
        save_file(state, str(path), metadata=meta)
        manifest["files"][rank].update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpt_oss")


@pytest.fixture(scope="module")
def shard_sets(place) -> dict[int, Path]:
    sets = {}
    for world in (1, 2, 3, 4):
        code, _, err = invoke(["shard", MODEL, "--gpus", world, "--out", place / f"w{world}"])
        assert code == 0, err
        sets[world] = place / f"w{world}"
    return sets


@pytest.fixture(scope="module")
def runs(place, shard_sets) -> dict:
    corpus = write_lines(place / "corpus.txt", CORPUS)
    plan = [(str(world), mode, shard_sets[world]) for world, mode in MATRIX]
    plan += [(layout, "last", rewrite_rank_files(shard_sets[2], place / layout, layout)) for layout in WRONG]
    groups = {}
    for name, mode, shards in plan:
        output = place / f"{name}-{mode}.{'csv' if mode == 'score' else 'safetensors'}"
        extra = ["--score"] if mode == "score" else ["--pooling", mode]
        args = ["run", "--shards", shards, "--input", corpus, "--output", output, "--batch-size", BATCH, "--max-length", MAX_LENGTH, *extra]
        groups[name] = [{"args": args, "log": place / name, "env": {"TMPDIR": str(place)}, "output": output}]
    return run_groups(groups, parallel=3)


@pytest.fixture(scope="module")
def reference(shard_sets):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(shard_sets[1]))(CORPUS, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    cache = {}

    def get(world: int, mode: str) -> torch.Tensor:
        """Every world's rank files reassemble to the same weights (test_sets_reassemble_alike): one oracle per mode."""
        if mode not in cache:
            cache[mode] = torch.stack(reference_outputs(FAMILY, reference_model(read_shard_set(shard_sets[1])), ids, pooling=mode))
        return cache[mode]

    return get


def test_sets_reassemble_alike(shard_sets):
    whole = reassemble_state(read_shard_set(shard_sets[1]))
    for world in (2, 3, 4):
        state = reassemble_state(read_shard_set(shard_sets[world]))
        assert set(state) == set(whole) and all(torch.equal(state[k], whole[k]) for k in whole), world


@pytest.mark.slow
@pytest.mark.parametrize("world, mode", MATRIX, ids=[f"w{w}-{m}" for w, m in MATRIX])
def test_run_matches_transformers(runs, reference, world, mode):
    (result,) = runs[str(world)]
    want = reference(world, mode)
    if mode != "score":
        got = embeddings(result, mode)
        assert max_error(got, want) <= TOL, f"max abs error {max_error(got, want):.2e}"
        assert max_error(got, reference(world, "last" if mode == "mean" else "mean")) > 100 * TOL
        return
    succeeded(result)
    frame = pd.read_csv(result.output)
    assert frame["tokens"].tolist() == want[:, 0].long().tolist()
    got_lp, want_lp = torch.tensor(frame["logprob"].to_numpy()), want[:, 1].double()
    assert ((got_lp - want_lp).abs() <= TOL * want_lp.abs() + 1e-6).all(), (got_lp, want_lp)
    for nll, expected in zip(frame["mean_nll"], want[:, 2].tolist()):
        assert (math.isnan(nll) and math.isnan(expected)) or abs(nll - expected) <= TOL * abs(expected)


@pytest.mark.slow
@pytest.mark.parametrize("layout", WRONG)
def test_a_wrong_layout_fails_the_same_comparison(runs, reference, layout):
    (result,) = runs[layout]
    error = max_error(embeddings(result, "last"), reference(2, "last"))
    assert error > 1e-2, f"a shard set with {layout} is within {error:.2e} of transformers"


# ---------------------------------------------------------------- the bench's shared experts


def test_bench_shared_experts_hold_the_layout(tmp_path, transformers_output):
    """bench/weights.SharedExperts, filled from the built-in, gives back every expert bit for bit, and
    the moeshard and ep systems built on it (biases included) give transformers' experts' output."""
    from moeshard_cli.bench.systems import SlicedExperts
    from moeshard_cli.bench.weights import SharedExperts
    from moeshard_cli.shard.sources import resolve

    source = resolve(MODEL)
    bounds = slice_bounds(F, 3)
    path = tmp_path / "experts.bin"
    SharedExperts.create(path, SharedExperts.size_for(FAMILY, 2, E, D, bounds, torch.float32))
    shared = SharedExperts(path, FAMILY, [0, 1], E, D, bounds, torch.float32)
    shared.fill(source, 0, 1)
    entries = {t.name: t for t in source.tensors}
    experts = [shared.full_expert(1, e) for e in range(E)]
    for e, expert in enumerate(experts):
        assert set(expert) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
        for matrix, tensor in expert.items():
            assert torch.equal(tensor, entries[FAMILY.expert_key(1, e, matrix)].load()), (e, matrix)
    x_TD, ids_TK, weights_TK = routed()
    with torch.no_grad():
        want = FAMILY.transformers_experts(CONFIG, experts)(x_TD, ids_TK, weights_TK)
    act, timer = FAMILY.act(CONFIG), SectionTimer(torch.device("cpu"))
    ranks = sum(ShardedDispatch(GroupedExperts(shared.w_in_GEDH[1][g], shared.w_out_GEFD[1][g], act, "grouped_mm", *shared.biases(1, g)),
                                Collectives(), timer)(x_TD, ids_TK, weights_TK)[0] for g in range(3))
    whole = ShardedDispatch(SlicedExperts(shared.w_in_GEDH[1], shared.w_out_GEFD[1], act, "loop", lambda g: shared.biases(1, g)),
                            Collectives(), timer)(x_TD, ids_TK, weights_TK)[0]
    assert max_error(ranks, want) <= TOL and max_error(whole, want) <= TOL


def test_fused_attention_is_refused_before_any_worker(tmp_path):
    code, _, err = invoke(["shard", MODEL, "--gpus", 1, "--out", tmp_path / "set"])
    assert code == 0, err
    (tmp_path / "in.txt").write_text("a line\n")
    code, _, err = invoke(["run", "--shards", tmp_path / "set", "--input", tmp_path / "in.txt", "--output", tmp_path / "o.safetensors",
                           "--attention", "fused"])
    line = error_line(err)
    assert code == 2 and "--attention fused" in line and "sinks" in line and "--attention eager" in line, line
    assert not (tmp_path / "o.safetensors").exists()


def test_bench_tp_says_transformers_plan_does_not_cut_these_experts(tmp_path):
    from moeshard_cli.bench.systems import Skip
    from moeshard_cli.bench.worker import _tensor_parallel
    from moeshard_cli.shard.sources import resolve

    skip = _tensor_parallel(resolve(MODEL), tmp_path, 0, 2, torch.device("cpu"))
    assert isinstance(skip, Skip) and "does not cut the experts" in skip.reason and "gpt_oss" in skip.reason
    assert not (tmp_path / "ckpt").exists() and list(tmp_path.iterdir()) == []
