"""The slicing plan: pure arithmetic and key classification, no I/O."""

from __future__ import annotations

import pytest
import torch

from moeshard_cli.errors import UserError
from moeshard_cli.shard.command import ShardOptions
from moeshard_cli.shard.plan import classify, rank_file_name, slice_bounds
from moeshard_cli.switch import join_expert, slice_expert, sliced_shape

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


# source key, has shared.weight, expected (kind, out_name, matrix, layer, expert)
KEYS = [
    ("encoder.block.1.layer.1.mlp.experts.expert_7.wi.weight", True, ("expert", None, "wi", 1, 7)),
    ("encoder.block.11.layer.1.mlp.experts.expert_127.wo.weight", True, ("expert", None, "wo", 11, 127)),
    ("encoder.block.1.layer.1.mlp.router.classifier.weight", True, ("replicate", None, "", -1, -1)),
    ("encoder.block.0.layer.1.mlp.wi.weight", True, ("replicate", None, "", -1, -1)),  # dense FF: not an expert
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True, ("replicate", None, "", -1, -1)),
    ("encoder.final_layer_norm.weight", True, ("replicate", None, "", -1, -1)),
    ("shared.weight", True, ("replicate", None, "", -1, -1)),
    ("encoder.embed_tokens.weight", True, ("drop", "", "", -1, -1)),
    ("encoder.embed_tokens.weight", False, ("replicate", "shared.weight", "", -1, -1)),
    ("decoder.block.1.layer.2.mlp.experts.expert_0.wi.weight", True, ("drop", "", "", -1, -1)),
    ("decoder.embed_tokens.weight", True, ("drop", "", "", -1, -1)),
    ("lm_head.weight", True, ("drop", "", "", -1, -1)),
]


@pytest.mark.parametrize("name, has_shared, expected", KEYS, ids=[f"{k}-{s}" for k, s, _ in KEYS])
def test_classify(name, has_shared, expected):
    kind, out_name, matrix, layer, expert = expected
    role = classify(name, has_shared)
    assert (role.kind, role.matrix, role.layer, role.expert) == (kind, matrix, layer, expert)
    assert role.out_name == (name if out_name is None else out_name)


@pytest.mark.parametrize("lo, hi", [(0, 130), (0, 44), (44, 87), (129, 130)])
def test_slice_expert_takes_rows_of_wi_and_columns_of_wo(lo, hi):
    d_model, d_ff = 8, 130
    wi = torch.arange(d_ff * d_model, dtype=torch.float32).reshape(d_ff, d_model)
    wo = torch.arange(d_model * d_ff, dtype=torch.float32).reshape(d_model, d_ff)
    assert torch.equal(slice_expert("wi", wi, lo, hi), wi[lo:hi])
    assert torch.equal(slice_expert("wo", wo, lo, hi), wo[:, lo:hi])
    assert sliced_shape("wi", tuple(wi.shape), lo, hi) == tuple(slice_expert("wi", wi, lo, hi).shape)
    assert sliced_shape("wo", tuple(wo.shape), lo, hi) == tuple(slice_expert("wo", wo, lo, hi).shape)


def test_slices_reassemble_the_expert():
    wi, wo = torch.randn(130, 8), torch.randn(8, 130)
    bounds = slice_bounds(130, 3)
    assert torch.equal(torch.cat([slice_expert("wi", wi, lo, hi) for lo, hi in bounds], 0), wi)
    assert torch.equal(torch.cat([slice_expert("wo", wo, lo, hi) for lo, hi in bounds], 1), wo)
    for matrix, full in (("wi", wi), ("wo", wo)):
        assert torch.equal(join_expert(matrix, [slice_expert(matrix, full, lo, hi) for lo, hi in bounds]), full)


def test_rank_file_names_sort_in_rank_order():
    names = [rank_file_name(r, 12) for r in range(12)]
    assert names[1] == "rank-00001-of-00012.safetensors"
    assert sorted(names) == names
