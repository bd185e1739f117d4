"""The slicing plan: pure arithmetic, and each family's key mapping, no I/O."""

from __future__ import annotations

import pytest
import torch

from moeshard_cli.errors import UserError
from moeshard_cli.shard.command import ShardOptions
from moeshard_cli.families import family_of
from moeshard_cli.shard.plan import join_slices, rank_file_name, slice_along, slice_bounds, sliced_dim, sliced_shape

# d_ff, ranks, expected slice widths (wider slices first, widths differ by at most one)
WIDTHS = [
    (3072, 1, [3072]),
    (3072, 2, [1536, 1536]),
    (3072, 3, [1024, 1024, 1024]),
    (3072, 4, [768] * 4),
    (3072, 5, [615, 615, 614, 614, 614]),
    (3072, 7, [439, 439, 439, 439, 439, 439, 438]),
    (3072, 3072, [1] * 3072),
    (130, 3, [44, 43, 43]),
    (130, 4, [33, 33, 32, 32]),
    (130, 129, [2] + [1] * 128),
    (130, 130, [1] * 130),
    (1, 1, [1]),
]


@pytest.mark.parametrize("d_ff, world, widths", WIDTHS, ids=[f"{d}-on-{w}" for d, w, _ in WIDTHS])
def test_slice_widths(d_ff, world, widths):
    bounds = slice_bounds(d_ff, world)
    assert [hi - lo for lo, hi in bounds] == widths
    # contiguous, starting at 0, ending at d_ff: every column belongs to exactly one rank
    assert bounds[0][0] == 0 and bounds[-1][1] == d_ff
    assert all(prev[1] == cur[0] for prev, cur in zip(bounds, bounds[1:]))


def test_slice_bounds_of_the_issue_example():
    assert slice_bounds(3072, 5) == [(0, 615), (615, 1230), (1230, 1844), (1844, 2458), (2458, 3072)]


@pytest.mark.parametrize("d_ff", [1, 2, 3, 64, 130, 768, 3072])
def test_every_world_size_up_to_d_ff_is_balanced(d_ff):
    for world in list(range(1, min(d_ff, 40) + 1)) + [d_ff]:
        widths = [hi - lo for lo, hi in slice_bounds(d_ff, world)]
        assert len(widths) == world and sum(widths) == d_ff
        assert max(widths) - min(widths) <= 1 and min(widths) >= 1


@pytest.mark.parametrize(
    "d_ff, world, message",
    [
        (3072, 0, "--gpus must be at least 1, got 0"),
        (3072, -1, "--gpus must be at least 1, got -1"),
        (3072, -3072, "--gpus must be at least 1"),
        (3072, 3073, "--gpus 3073 is larger than d_ff=3072"),
        (130, 131, "--gpus 131 is larger than d_ff=130"),
    ],
)
def test_slice_bounds_rejects(d_ff, world, message):
    """The pure function says what is wrong with the value; the shard command's options name the flag and the fix."""
    with pytest.raises(ValueError) as plain:
        slice_bounds(d_ff, world)
    assert "--" not in str(plain.value)
    opts = ShardOptions("tiny-switch", world)
    with pytest.raises(UserError) as info:
        opts.validate()
        opts.bounds(d_ff)
    line = info.value.line()
    assert message in line and "\n" not in line and str(plain.value) in line
    assert info.value.fix  # every refusal names a fix


# family, checkpoint key, whether the checkpoint also holds shared.weight, rank-file key (None: not kept), sliced axis
KEYS = [
    ("switch_transformers", "encoder.block.1.layer.1.mlp.experts.expert_7.wi.weight", True, "=", 0),
    ("switch_transformers", "encoder.block.11.layer.1.mlp.experts.expert_127.wo.weight", True, "=", 1),
    ("switch_transformers", "encoder.block.1.layer.1.mlp.router.classifier.weight", True, "=", None),
    ("switch_transformers", "encoder.block.0.layer.1.mlp.wi.weight", True, "=", None),  # dense FF: not an expert
    ("switch_transformers", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True, "=", None),
    ("switch_transformers", "encoder.final_layer_norm.weight", True, "=", None),
    ("switch_transformers", "shared.weight", True, "=", None),
    ("switch_transformers", "encoder.embed_tokens.weight", True, None, None),
    ("switch_transformers", "encoder.embed_tokens.weight", False, "shared.weight", None),
    ("switch_transformers", "decoder.block.1.layer.2.mlp.experts.expert_0.wi.weight", True, None, None),
    ("switch_transformers", "decoder.embed_tokens.weight", True, None, None),
    ("switch_transformers", "lm_head.weight", True, None, None),
    ("qwen3_moe", "model.layers.3.mlp.experts.17.gate_proj.weight", False, "=", 0),
    ("qwen3_moe", "model.layers.3.mlp.experts.17.up_proj.weight", False, "=", 0),
    ("qwen3_moe", "model.layers.3.mlp.experts.17.down_proj.weight", False, "=", 1),
    ("qwen3_moe", "model.layers.3.mlp.gate.weight", False, "=", None),  # the router
    ("qwen3_moe", "model.layers.1.mlp.gate_proj.weight", False, "=", None),  # a dense layer's MLP
    ("qwen3_moe", "lm_head.weight", False, "=", None),
    ("olmoe", "model.layers.0.mlp.experts.63.down_proj.weight", False, "=", 1),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w1.weight", False, "model.layers.0.mlp.experts.7.gate_proj.weight", 0),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w3.weight", False, "model.layers.0.mlp.experts.7.up_proj.weight", 0),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w2.weight", False, "model.layers.0.mlp.experts.7.down_proj.weight", 1),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", False, "model.layers.0.mlp.gate.weight", None),
    ("mixtral", "model.layers.0.self_attn.q_proj.weight", False, "=", None),
]


@pytest.mark.parametrize("family, name, has_shared, rank_key, dim", KEYS, ids=[f"{f}-{k}-{s}" for f, k, s, _, _ in KEYS])
def test_checkpoint_keys_become_rank_file_keys(family, name, has_shared, rank_key, dim):
    fam = family_of(family)
    key = fam.rank_key(name, {name, "shared.weight"} if has_shared else {name})
    assert key == (name if rank_key == "=" else rank_key)
    if key is not None:
        assert sliced_dim(fam, key) == dim


@pytest.mark.parametrize("lo, hi", [(0, 130), (0, 44), (44, 87), (129, 130)])
def test_slices_take_rows_of_inputs_and_columns_of_outputs(lo, hi):
    d_model, d_ff = 8, 130
    wi = torch.arange(d_ff * d_model, dtype=torch.float32).reshape(d_ff, d_model)
    wo = torch.arange(d_model * d_ff, dtype=torch.float32).reshape(d_model, d_ff)
    for family, into, out in (("switch_transformers", "wi", "wo"), ("qwen3_moe", "gate_proj", "down_proj"), ("qwen3_moe", "up_proj", "down_proj")):
        fam = family_of(family)
        assert torch.equal(slice_along(wi, fam.sliced_dim(into), lo, hi), wi[lo:hi])
        assert torch.equal(slice_along(wo, fam.sliced_dim(out), lo, hi), wo[:, lo:hi])
    assert sliced_shape(tuple(wi.shape), 0, lo, hi) == tuple(wi[lo:hi].shape)
    assert sliced_shape(tuple(wo.shape), 1, lo, hi) == tuple(wo[:, lo:hi].shape)


def test_slices_reassemble_the_expert():
    wi, wo = torch.randn(130, 8), torch.randn(8, 130)
    bounds = slice_bounds(130, 3)
    for full, dim in ((wi, 0), (wo, 1)):
        assert torch.equal(join_slices([slice_along(full, dim, lo, hi) for lo, hi in bounds], dim), full)


def test_rank_file_names_sort_in_rank_order():
    names = [rank_file_name(r, 12) for r in range(12)]
    assert names[1] == "rank-00001-of-00012.safetensors"
    assert sorted(names) == names
