"""The decoder families end to end: `moeshard run` on Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE,
DeepSeek-V3, DeepSeek-V2, PhiMoE and the Granite-MoE families (plain, Shared, SWA, Hybrid) shard sets
against transformers' own causal LM in one process (`reference.reference_model`, every expert
whole, transformers' eager experts).

The built-ins' experts are 38 wide, so 3 and 4 workers hold uneven slices (13/13/12, 10/10/9/9).
Every `moeshard run` costs seconds of process start-up, so one module fixture runs them all on
one small corpus through the library's `run` on one worker pool per world size (test_run.pool_runs),
and one run goes through the `moeshard` command itself; the matrix gives every family each
of `--pooling last` (the default), `--pooling mean` and `--score`, and every world size 1-4
each of them too: 12 runs, plus one with the skewed router and one on a deliberately
mis-sliced shard set (the negative control: the same comparison must then fail). The families of
issue 15 share the matrix diagonally, to keep process start-ups few: each gets last, mean and
score once, on one even and one uneven world size at least. Their layout elements (shared experts and gates,
routers, Granite's logits scaling) are checked at every world size 1-4, with negative controls,
in process (test_family_blocks.py).

A checkpoint written by transformers (`save_pretrained`, several files: Mixtral's
`block_sparse_moe.experts.{e}.w1/w2/w3` names, Granite's fused `input_linear`/`output_linear`),
or straight from a transformers 5 state dict (fused `experts.gate_up_proj`), must shard into rank
files that reassemble, bit for bit, to the parameters `from_pretrained` loads. Refusals (--score
on an encoder, --score with --pooling, --score into .safetensors) go through the CLI in this process.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import invoke, run_cli, write_lines
from moeshard_cli.families import builtin_family
from moeshard_cli.model import read_rank_file
from moeshard_cli.shard.plan import slice_bounds
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.reference import reassemble_state, reference_model, reference_outputs
from moeshard_cli.shard.manifest import MANIFEST, read_shard_set
from test_run import error_line, pool_runs, read_output

pytestmark = pytest.mark.slow

TOL = 1e-4
MAX_LENGTH = 40
BATCH = 2
D_MODEL, EXPERT_WIDTH = 64, 38
SKEW = RouterSpec("skewed", skew=0.6)
MODELS = ("tiny-qwen3-moe", "tiny-olmoe", "tiny-mixtral", "tiny-qwen2-moe", "tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-phimoe",
          "tiny-granite-moe", "tiny-granite-moe-shared", "tiny-granite-moe-swa", "tiny-granite-moe-hybrid",
          "tiny-glm4-moe", "tiny-ernie4-5-moe", "tiny-hunyuan-v1-moe", "tiny-minimax", "tiny-cohere2-moe", "tiny-dots1",
          "tiny-exaone-moe", "tiny-solar-open", "tiny-flex-olmo", "tiny-minimax-m2", "tiny-mellum", "tiny-afmoe", "tiny-kolibri1",
          "tiny-laguna", "tiny-mimo-v2-flash", "tiny-hy-v3")
# A dozen lines: an empty one (the tokenizer's end-of-sequence token makes it one token long,
# so it has no score), one of a single character, lengths that differ inside a batch of 2 (right padding), two
# longer than MAX_LENGTH (one cut inside a multi-byte character), non-ASCII.
CORPUS = [
    "Hello world.",
    "",
    "x",
    "non-ASCII: h\u00e9llo w\u00f6rld, na\u00efve caf\u00e9 \u2713",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "A line that is much longer than the forty tokens this run keeps, so it is cut.",
    "short",
    "emoji \U0001f642\U0001f680 and more",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03ba\u03b1\u03b9 \u0440\u0443\u0441\u0441\u043a\u0438\u0439, longer than forty bytes",
    "tabs\tand  spaces  ",
    "12345",
    "the last line",
]
# (model, world, mode): each model gets last, mean and score; each world size gets each of them.
MATRIX = [
    ("tiny-qwen3-moe", 1, "last"), ("tiny-qwen3-moe", 2, "mean"), ("tiny-qwen3-moe", 3, "score"), ("tiny-qwen3-moe", 4, "last"),
    ("tiny-olmoe", 1, "score"), ("tiny-olmoe", 2, "last"), ("tiny-olmoe", 3, "mean"), ("tiny-olmoe", 4, "score"),
    ("tiny-mixtral", 1, "mean"), ("tiny-mixtral", 2, "score"), ("tiny-mixtral", 3, "last"), ("tiny-mixtral", 4, "mean"),
    # issue 15's families, diagonally (the shared experts are 45 and 76 wide: uneven at 2 and 3 too)
    ("tiny-qwen2-moe", 1, "last"), ("tiny-qwen2-moe", 2, "mean"), ("tiny-qwen2-moe", 3, "score"),
    ("tiny-deepseek-v3", 2, "score"), ("tiny-deepseek-v3", 3, "last"), ("tiny-deepseek-v3", 4, "mean"),
    ("tiny-deepseek-v2", 2, "last"), ("tiny-deepseek-v2", 3, "mean"), ("tiny-deepseek-v2", 4, "score"),
    ("tiny-phimoe", 1, "score"), ("tiny-phimoe", 3, "mean"), ("tiny-phimoe", 4, "last"),
    # Granite: --score divides by logits_scaling; the shared MLP is 45 wide; SWA's sliding window is 8 tokens
    ("tiny-granite-moe", 1, "mean"), ("tiny-granite-moe", 2, "score"), ("tiny-granite-moe", 3, "last"),
    ("tiny-granite-moe-shared", 2, "last"), ("tiny-granite-moe-shared", 3, "mean"), ("tiny-granite-moe-shared", 4, "score"),
    ("tiny-granite-moe-swa", 2, "mean"), ("tiny-granite-moe-swa", 3, "score"), ("tiny-granite-moe-swa", 4, "last"),
    ("tiny-granite-moe-hybrid", 1, "last"), ("tiny-granite-moe-hybrid", 2, "score"), ("tiny-granite-moe-hybrid", 3, "mean"),
    # served from transformers' module tree alone (families/generic.py): one run each
    ("tiny-glm4-moe", 3, "score"), ("tiny-ernie4-5-moe", 2, "last"), ("tiny-hunyuan-v1-moe", 3, "mean"), ("tiny-minimax", 2, "score"),
    ("tiny-cohere2-moe", 3, "last"), ("tiny-dots1", 4, "mean"), ("tiny-exaone-moe", 3, "score"), ("tiny-solar-open", 4, "last"),
    ("tiny-flex-olmo", 3, "mean"), ("tiny-minimax-m2", 4, "score"), ("tiny-mellum", 1, "last"), ("tiny-afmoe", 2, "score"),
    ("tiny-kolibri1", 3, "last"), ("tiny-laguna", 4, "mean"), ("tiny-mimo-v2-flash", 3, "score"), ("tiny-hy-v3", 2, "last"),
]
SKEWED = ("tiny-qwen3-moe", 3, "last")  # a renormalising family, uneven slices; the oracle gets the same draw
MISSLICED = ("tiny-olmoe", 2, "last")  # its correct twin is in MATRIX


def run_name(model: str, world: int, mode: str, tag: str = "") -> str:
    return f"{model}-w{world}-{mode}{tag}"


# ---------------------------------------------------------------- a wrong slicing, for the negative control


def mis_slice(src: Path, dst: Path) -> Path:
    """A copy of shard set `src` whose gate and up slices are cut the way a plain slicing of the fused
    [gate; up] tensor [2F, D] would cut them: rank r takes fused rows [2 lo, 2 hi) and splits them in
    half (at 2 workers rank 0 gets both halves of gate, rank 1 both halves of up). Shapes, down
    slices and every other tensor are unchanged; the new bytes go in place and the manifest's
    checksums follow, so the run accepts the set."""
    shutil.copytree(src, dst)
    shards = read_shard_set(dst)
    family, full = shards.family, reassemble_state(shards)
    manifest = json.loads((dst / MANIFEST).read_text())
    changed = 0
    for rank, (lo, hi) in enumerate(shards.slices):
        path = shards.rank_file(rank)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        with open(path, "r+b") as f:
            for key, info in header.items():
                parsed = family.parse_expert_key(key)
                if key == "__metadata__" or parsed is None or parsed[2] == "down_proj":
                    continue
                layer, expert, matrix = parsed
                fused = torch.cat([full[family.expert_key(layer, expert, "gate_proj")], full[family.expert_key(layer, expert, "up_proj")]])
                gate, up = fused[2 * lo:2 * hi].chunk(2)
                piece = (gate if matrix == "gate_proj" else up).contiguous()
                start, end = info["data_offsets"]
                assert info["dtype"] == "F32" and list(piece.shape) == info["shape"] and end - start == piece.numel() * 4
                f.seek(8 + header_len + start)
                f.write(piece.numpy().tobytes())
                changed += 1
        manifest["files"][rank]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dst / MANIFEST).write_text(json.dumps(manifest))
    assert changed > 0
    return dst


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def shard_sets(place) -> dict[tuple[str, int], Path]:
    """The shard sets the runs and checks of this module use, one per (model, world)."""
    sets = {}
    for model, world in sorted({(m, w) for m, w, _ in MATRIX}):
        out = place / "sets" / f"{model}-w{world}"
        code, _, err = invoke(["shard", model, "--gpus", world, "--out", out])
        assert code == 0, err
        sets[model, world] = out
    return sets


@pytest.fixture(scope="module")
def corpus(place) -> Path:
    return write_lines(place / "corpus.txt", CORPUS)


@pytest.fixture(scope="module")
def runs(place, shard_sets, corpus) -> dict:
    """Every run of this module, on one worker pool per world size (test_run.pool_runs: the library's
    `moeshard run`, its workers started once per size); the CLI's own path is test_run's matrix and
    the CLI runs below."""
    out = place / "out"
    out.mkdir()
    missliced = mis_slice(shard_sets[MISSLICED[:2]], place / "sets" / "missliced")
    cases = [(m, w, mode, "", shard_sets[m, w], {}) for m, w, mode in MATRIX]
    cases.append((*SKEWED, "-skewed", shard_sets[SKEWED[:2]], {"router": "skewed", "skew": SKEW.skew}))
    cases.append((*MISSLICED, "-missliced", missliced, {}))
    plan = {}
    for model, world, mode, tag, shards, extra in cases:
        name = run_name(model, world, mode, tag)
        output = out / f"{name}.{'csv' if mode == 'score' else 'safetensors'}"
        # "last" is the decoders' default: asked for by name only on 4 workers
        if mode == "score":
            extra = {**extra, "score": True}
        elif mode == "mean" or (mode == "last" and world == 4):
            extra = {**extra, "pooling": mode}
        plan[name] = dict(shards=shards, input=corpus, output=output, batch_size=BATCH, max_length=MAX_LENGTH, **extra)
    return pool_runs(plan)


def test_the_moeshard_command_on_a_decoder_family(place, shard_sets, corpus, reference):
    """The same comparison through the `moeshard` command itself (its workers forked after it imported their
    modules), on a family with a shared MLP, Mamba-2 layers, logits scaling and uneven slices."""
    model, world = "tiny-granite-moe-hybrid", 3
    output = place / "cli-score.csv"
    code, _, err = run_cli(["run", "--shards", shard_sets[model, world], "--input", corpus, "--output", output, "--score",
                            "--batch-size", BATCH, "--max-length", MAX_LENGTH])
    assert code == 0, err
    got = torch.tensor(pd.read_csv(output)["logprob"].to_numpy())
    want = reference(model, world, "score")[:, 1].double()
    assert ((got - want).abs() <= TOL * want.abs() + 1e-6).all()


@pytest.fixture(scope="module")
def token_ids(shard_sets) -> list[list[int]]:
    """The ids every run encodes (all built-ins share the byte-level tokenizer)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(shard_sets["tiny-olmoe", 2]))(CORPUS, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    assert min(map(len, ids)) == 1 and max(map(len, ids)) == MAX_LENGTH  # one-token lines and cut ones
    return ids


@pytest.fixture(scope="module")
def reference(shard_sets, token_ids):
    """transformers' causal LM of a shard set, one line at a time: reference(model, world, mode, spec) -> [lines, ...]."""
    cache: dict = {}

    def get(model: str, world: int, mode: str, spec: RouterSpec = RouterSpec()) -> torch.Tensor:
        key = (model, world, mode, spec)
        if key not in cache:
            shards = read_shard_set(shard_sets[model, world])
            # a fresh oracle per call: a forced router stays on the model it was put on
            cache[key] = torch.stack(reference_outputs(shards.family, reference_model(shards), token_ids, spec, mode))
        return cache[key]

    return get


def succeeded(result) -> None:
    assert result.code == 0, f"exit {result.code}\nstdout:\n{result.out}\nstderr:\n{result.err}"


def embeddings(result, pooling: str) -> torch.Tensor:
    succeeded(result)
    tensors, meta = read_output(result.output)
    assert set(tensors) == {"embeddings"} and meta["pooling"] == pooling
    got = tensors["embeddings"]
    assert got.dtype == torch.float32 and got.shape == (len(CORPUS), D_MODEL)
    return got


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- exact against transformers


EMBEDDING_RUNS = [c for c in MATRIX if c[2] != "score"]
SCORE_RUNS = [c for c in MATRIX if c[2] == "score"]


@pytest.mark.parametrize("model, world, pooling", EMBEDDING_RUNS, ids=[run_name(*c) for c in EMBEDDING_RUNS])
def test_embeddings_match_transformers(runs, reference, model, world, pooling):
    (result,) = runs[run_name(model, world, pooling)]
    got = embeddings(result, pooling)
    error = max_error(got, reference(model, world, pooling))
    assert error <= TOL, f"max abs error {error:.2e}"
    # the two poolings are told apart: this comparison fails for the other one
    other = "mean" if pooling == "last" else "last"
    assert max_error(got, reference(model, world, other)) > 100 * TOL


def test_last_is_the_decoders_default_pooling(runs):
    defaults = [c for c in MATRIX if c[2] == "last" and c[1] != 4]
    assert defaults  # run without --pooling
    for case in defaults:
        (result,) = runs[run_name(*case)]
        succeeded(result)
        assert read_output(result.output)[1]["pooling"] == "last"


@pytest.mark.parametrize("model, world, mode", SCORE_RUNS, ids=[run_name(*c) for c in SCORE_RUNS])
def test_scores_match_transformers(runs, reference, token_ids, model, world, mode):
    (result,) = runs[run_name(model, world, mode)]
    succeeded(result)
    frame = pd.read_csv(result.output)
    assert list(frame.columns) == ["line", "tokens", "logprob", "mean_nll"]
    assert frame["line"].tolist() == list(range(len(CORPUS)))
    assert frame["tokens"].tolist() == [len(row) for row in token_ids]
    expected = reference(model, world, "score")  # [lines, 3]: tokens, logprob, mean_nll
    assert frame["tokens"].tolist() == expected[:, 0].long().tolist()
    got_lp, want_lp = torch.tensor(frame["logprob"].to_numpy()), expected[:, 1].double()
    assert ((got_lp - want_lp).abs() <= TOL * want_lp.abs() + 1e-6).all(), (got_lp, want_lp)
    one_token = [len(row) == 1 for row in token_ids]
    assert one_token == [line == "" for line in CORPUS]  # the empty line is its end-of-sequence token alone
    for i, single in enumerate(one_token):
        nll = frame["mean_nll"][i]
        if single:
            assert math.isnan(nll) and frame["logprob"][i] == 0.0
        else:
            want = expected[i, 2].item()
            assert abs(nll - want) <= TOL * abs(want), (i, nll, want)
            assert abs(nll + frame["logprob"][i] / (len(token_ids[i]) - 1)) <= 1e-6 * abs(nll)
            assert nll > 0


def test_skewed_router_matches_transformers_given_the_same_draw(runs, reference):
    model, world, pooling = SKEWED
    (result,) = runs[run_name(model, world, pooling, "-skewed")]
    got = embeddings(result, pooling)
    assert read_output(result.output)[1]["router"] == "skewed"
    error = max_error(got, reference(model, world, pooling, SKEW))
    assert error <= TOL, f"max abs error {error:.2e}"
    # the skewed assignment really differs from the checkpoint's router: this test can fail
    assert max_error(got, reference(model, world, pooling)) > 100 * TOL


def test_a_wrong_slicing_fails_the_comparison(runs, reference):
    """The negative control: the same run and comparison as test_embeddings_match_transformers,
    on rank files whose gate/up rows are cut from the fused tensor wrongly, is far off."""
    model, world, pooling = MISSLICED
    (good,) = runs[run_name(model, world, pooling)]
    (bad,) = runs[run_name(model, world, pooling, "-missliced")]
    expected = reference(model, world, pooling)
    assert max_error(embeddings(good, pooling), expected) <= TOL
    error = max_error(embeddings(bad, pooling), expected)
    assert error > 1e-2, f"a wrongly sliced shard set is within {error:.2e} of transformers"


# ---------------------------------------------------------------- a checkpoint written by transformers


# What the MoE block of a save_pretrained checkpoint holds on disk (keys under model.layers.{l}.{disk_block}.):
# experts one by one in transformers' names (the default), in the hub's (Mixtral, PhiMoE), or fused (Granite's
# hub names; Granite-MoE-SWA's, which transformers does not rename, are its in-memory ones).
PER_EXPERT_ON_DISK = {"gate.weight", *(f"experts.0.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj"))}
DEEPSEEK_ON_DISK = PER_EXPERT_ON_DISK | {"gate.e_score_correction_bias", "shared_experts.gate_proj.weight",
                                        "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"}
DISK_BLOCKS = {
    "tiny-mixtral": {"gate.weight", "experts.0.w1.weight", "experts.0.w2.weight", "experts.0.w3.weight"},
    "tiny-phimoe": {"gate.weight", "experts.0.w1.weight", "experts.0.w2.weight", "experts.0.w3.weight"},  # router: gate on disk
    "tiny-qwen2-moe": PER_EXPERT_ON_DISK | {"shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                                            "shared_expert.down_proj.weight", "shared_expert_gate.weight"},
    "tiny-deepseek-v3": DEEPSEEK_ON_DISK,
    "tiny-deepseek-v2": PER_EXPERT_ON_DISK | {"shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                                              "shared_experts.down_proj.weight"},
    "tiny-granite-moe": {"router.layer.weight", "input_linear.weight", "output_linear.weight"},
    "tiny-granite-moe-shared": {"router.layer.weight", "input_linear.weight", "output_linear.weight"},
    "tiny-granite-moe-swa": {"router.weight", "experts.gate_up_proj", "experts.down_proj"},
    "tiny-granite-moe-hybrid": {"router.layer.weight", "input_linear.weight", "output_linear.weight"},
    # served without a family file: shared experts stay transformers' own, replicated
    "tiny-glm4-moe": DEEPSEEK_ON_DISK,
    "tiny-ernie4-5-moe": PER_EXPERT_ON_DISK | {"moe_statics.e_score_correction_bias", "shared_experts.gate_proj.weight",
                                               "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"},
    "tiny-hunyuan-v1-moe": PER_EXPERT_ON_DISK - {"gate.weight"} | {"gate.wg.weight", "shared_mlp.gate_proj.weight",
                                                                   "shared_mlp.up_proj.weight", "shared_mlp.down_proj.weight"},
    "tiny-minimax": {"gate.weight", "experts.0.w1.weight", "experts.0.w2.weight", "experts.0.w3.weight"},
    "tiny-minimax-m2": {"gate.weight", "e_score_correction_bias", "experts.0.w1.weight", "experts.0.w2.weight", "experts.0.w3.weight"},
    "tiny-dots1": DEEPSEEK_ON_DISK,
    "tiny-solar-open": DEEPSEEK_ON_DISK,
    "tiny-exaone-moe": DEEPSEEK_ON_DISK - {"gate.e_score_correction_bias"} | {"e_score_correction_bias"},
}
DISK_BLOCK_NAMES = {"tiny-minimax": "block_sparse_moe", "tiny-minimax-m2": "block_sparse_moe"}  # where the checkpoint's block name is not the in-memory one


@pytest.mark.parametrize("name", MODELS)
def test_transformers_checkpoint_reassembles_bit_for_bit(tmp_path, name):
    from transformers import AutoModelForCausalLM

    from moeshard_cli.shard.sources import byte_tokenizer

    family = builtin_family(name)
    config = family.builtin_config(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # norms included: every value distinct
            param.normal_(0.0, 0.5)
    source = tmp_path / "ckpt"
    model.save_pretrained(str(source), max_shard_size="100KB")
    byte_tokenizer().save_pretrained(str(source))
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3
    first = f"model.layers.{family.moe_layer_indices(config)[0]}."
    on_disk = f"{first}{DISK_BLOCK_NAMES.get(name, family.disk_block)}."
    block = {k.removeprefix(on_disk) for k in weight_map if k.startswith(on_disk)}
    first_expert = {k for k in block if not re.match(r"experts\.[1-7]\.", k)}
    if name in DISK_BLOCKS or not getattr(family, "generic", False):
        assert first_expert == DISK_BLOCKS.get(name, PER_EXPERT_ON_DISK)
    else:  # a generic type's router, biases and shared experts are whatever transformers names them
        assert PER_EXPERT_ON_DISK - {"gate.weight"} <= first_expert
    if family.shared:  # the shared expert's matrices, in transformers' names on disk
        (_, down), = family.disk_shared_fused or (("", "down_proj.weight"),)
        assert f"{first}{family.shared}.{down}" in weight_map

    code, _, err = invoke(["shard", source, "--gpus", 3, "--out", tmp_path / "set"])
    assert code == 0, err
    shards = read_shard_set(tmp_path / "set")
    assert shards.slices == [(0, 13), (13, 26), (26, 38)]
    got = family.fuse(reassemble_state(shards))
    want = AutoModelForCausalLM.from_pretrained(str(source)).state_dict()
    assert set(got) == set(want)
    fused = [k for k in want if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 2 * len(family.moe_layer_indices(config)) and len(fused) >= 4
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), f"{key} does not reassemble to transformers' parameter"
    assert want[fused[0]].shape == (8, 2 * EXPERT_WIDTH, D_MODEL)  # [E, 2F, D], gate half first
    if family.shared:  # the shared expert is cut by its own width: 45 (15 each), 76 (26/25/25)
        width = config.moe_intermediate_size * config.n_shared_experts if hasattr(config, "n_shared_experts") else \
            getattr(config, "shared_expert_intermediate_size", None) or config.shared_intermediate_size
        key = family.expert_key(family.moe_layer_indices(config)[0], -1, "down_proj")
        parts = [read_rank_file(shards, rank, torch.device("cpu"))[key].shape[1] for rank in range(3)]
        assert parts == [hi - lo for lo, hi in slice_bounds(width, 3)] and sum(parts) == width

    # the comparison catches a wrong slicing: rank files joined out of order, or gate and up swapped
    state = reassemble_state(shards)
    for key in list(state):
        parsed = family.parse_expert_key(key)
        if parsed and parsed[2] == "gate_proj":
            state[key] = state[key].roll(13, dims=0)  # rank 0's rows last
    wrong = family.fuse(state)
    gate_up = next(k for k in fused if k.endswith("gate_up_proj"))
    assert not torch.equal(wrong[gate_up], want[gate_up])
    swapped = {**got, gate_up: torch.cat([got[gate_up][:, EXPERT_WIDTH:], got[gate_up][:, :EXPERT_WIDTH]], dim=1)}
    assert not torch.equal(swapped[gate_up], want[gate_up])


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-granite-moe-shared"])
def test_checkpoint_in_transformers_memory_layout_shards(tmp_path, name):
    """A checkpoint written straight from a transformers 5 state dict (experts fused as `experts.gate_up_proj`
    [E, 2F, D] / `experts.down_proj`, the router under its in-memory name) shards one expert at a time into the
    same rank files, which reassemble bit for bit."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moeshard_cli.shard.sources import byte_tokenizer

    family = builtin_family(name)
    config = family.builtin_config(name)
    torch.manual_seed(0)
    want = AutoModelForCausalLM.from_config(config).eval().state_dict()
    source = tmp_path / "ckpt"
    source.mkdir()
    config.save_pretrained(str(source))
    byte_tokenizer().save_pretrained(str(source))
    save_file({k: v.contiguous() for k, v in want.items()}, str(source / "model.safetensors"))
    assert any(k.endswith(".experts.gate_up_proj") for k in want)

    code, _, err = invoke(["shard", source, "--gpus", 3, "--out", tmp_path / "set"])
    assert code == 0, err
    got = family.fuse(reassemble_state(read_shard_set(tmp_path / "set")))
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- refused before any worker starts


@pytest.fixture(scope="module")
def switch_set(place) -> Path:
    out = place / "sets" / "tiny-switch-w1"
    code, _, err = invoke(["shard", "tiny-switch", "--gpus", 1, "--out", out])
    assert code == 0, err
    return out


@pytest.mark.parametrize("case", ["score-on-switch", "score-with-pooling", "score-into-safetensors"])
def test_score_refusals_are_one_line(tmp_path, shard_sets, switch_set, corpus, case):
    output = tmp_path / ("o.safetensors" if case == "score-into-safetensors" else "o.csv")
    shards = switch_set if case == "score-on-switch" else shard_sets["tiny-olmoe", 1]
    extra = ["--pooling", "mean"] if case == "score-with-pooling" else []
    code, _, err = invoke(["run", "--shards", shards, "--input", corpus, "--output", output, "--score", *extra])
    line = error_line(err)
    assert code == 2
    needles = {
        "score-on-switch": ["--score needs a decoder family", "switch_transformers", "drop --score"],
        "score-with-pooling": ["--score and --pooling mean exclude each other", "drop --pooling"],
        "score-into-safetensors": ["--output", str(output), "is a .safetensors file, which cannot hold scores", ".jsonl or .csv for scores"],
    }[case]
    assert all(n in line for n in needles), line
    assert list(tmp_path.iterdir()) == []
