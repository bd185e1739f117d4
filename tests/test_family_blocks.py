"""Each family's MoE block, in this process: the rank slices moeshard computes add up to transformers' block.

For every family and every world size 1-4, one MoE layer of the built-in tiny model is run twice
on the same tokens: as transformers' own block (router, experts, shared expert and its gate),
and as the sum over ranks of `ShardedDispatch.compute` on each rank's slice of every expert (and
of the shared expert), fed by transformers' router. That sum is what the reduce-scatter of a
real run returns, so this checks the slicing rule of every layout element without starting a
process. The built-ins' expert widths (38) and shared widths (38, 45, 76) leave uneven slices.

Negative controls, one per layout element, make the same comparison fail: the whole shared
expert on every rank, the shared expert's sigmoid gate skipped, DeepSeek-V3's
`e_score_correction_bias` added to the routing weights as well as to the choice, a top-2 softmax
in place of PhiMoE's sparsemixer, gate/up cut from the fused [gate; up] rows, and Granite's
logits scored without its `logits_scaling`.
"""

from __future__ import annotations

import pytest
import torch

from moeshard_cli.families import SHARED_EXPERT, builtin_family
from moeshard_cli.model import shared_expert, sharded_experts, split_expert_weights, split_shared_weights
from moeshard_cli.moe.dispatch import ShardedDispatch
from moeshard_cli.moe.experts import GroupedExperts, SharedExpert, stack_experts
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.shard.plan import slice_along, tensor_bounds
from moeshard_cli.shard.sources import resolve

TOL = 1e-4
TOKENS = 48
# family -> its tiny built-in
MODELS = {"qwen2_moe": "tiny-qwen2-moe", "deepseek_v3": "tiny-deepseek-v3", "deepseek_v2": "tiny-deepseek-v2",
          "phimoe": "tiny-phimoe", "qwen3_moe": "tiny-qwen3-moe", "olmoe": "tiny-olmoe", "mixtral": "tiny-mixtral",
          "granitemoe": "tiny-granite-moe", "granitemoeshared": "tiny-granite-moe-shared", "granitemoe_swa": "tiny-granite-moe-swa",
          "granitemoehybrid": "tiny-granite-moe-hybrid"}
# model types served without a family file (families/generic.py): their shared experts stay transformers' own
GENERIC_MODELS = {"glm4_moe": "tiny-glm4-moe", "ernie4_5_moe": "tiny-ernie4-5-moe", "hunyuan_v1_moe": "tiny-hunyuan-v1-moe",
                  "minimax": "tiny-minimax", "cohere2_moe": "tiny-cohere2-moe", "dots1": "tiny-dots1", "exaone_moe": "tiny-exaone-moe",
                  "solar_open": "tiny-solar-open", "flex_olmo": "tiny-flex-olmo", "minimax_m2": "tiny-minimax-m2", "mellum": "tiny-mellum",
                  "afmoe": "tiny-afmoe", "kolibri1": "tiny-kolibri1", "laguna": "tiny-laguna", "mimo_v2_flash": "tiny-mimo-v2-flash",
                  "hy_v3": "tiny-hy-v3"}
SHARED_FAMILIES = ["qwen2_moe", "deepseek_v3", "deepseek_v2", "granitemoeshared", "granitemoe_swa", "granitemoehybrid"]


class Block:
    """One MoE layer of a built-in: transformers' block, its router's choice, and the rank slices."""

    def __init__(self, name: str, **config_changes):
        source = resolve(name)
        self.family, self.config = source.family, source.config
        for key, value in config_changes.items():  # the same weights under another config value
            setattr(self.config, key, value)
        self.state = {e.name: e.load() for e in source.tensors}
        self.model = self.family.oracle(self.config, dict(self.state))
        self.layer = self.family.moe_layer_indices(self.config)[0]
        self.block = self.family.moe_block(self.model, self.layer)
        self.x_TD = torch.randn(TOKENS, self.family.dims(self.config).d_model, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def transformers_output(self) -> torch.Tensor:
        out = self.block(self.x_TD[None])[0]
        if self.family.shared and not self.family.shared.startswith(f"{self.family.block}."):  # Granite's beside the block
            out = out + self.model.model.layers[self.layer].get_submodule(self.family.shared)(self.x_TD)
        return out

    @torch.no_grad()
    def routing(self):
        _, weights_TK, ids_TK = getattr(self.block, self.family.router)(self.x_TD)
        return ids_TK, weights_TK

    def rank_state(self, rank: int, world: int) -> dict[str, torch.Tensor]:
        """What rank `rank` of `world` holds of this layer's experts: the same cut as `moeshard shard`."""
        out = {}
        for key, tensor in self.state.items():
            parsed = self.family.parse_expert_key(key)
            if parsed and parsed[0] == self.layer:
                dim = self.family.sliced_dim(parsed[2])
                out[key] = slice_along(tensor, dim, *tensor_bounds(tensor.shape, dim, world)[rank])
        return out

    @torch.no_grad()
    def sharded_output(self, world: int, routing=None, shared_override=None) -> torch.Tensor:
        """The sum over ranks of each rank's partial output (what the reduce-scatter returns)."""
        ids_TK, weights_TK = routing or self.routing()
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=self.family.dims(self.config).num_experts)
        total = torch.zeros_like(self.x_TD)
        for rank in range(world):
            state = self.rank_state(rank, world)
            shared = split_shared_weights(self.family, state).get(self.layer)
            experts = sharded_experts(self.family, self.config, split_expert_weights(self.family, state)[self.layer], "loop")
            part = shared_expert(self.family, self.config, self.model, self.layer, shared, "loop")
            if shared_override is not None:
                part = shared_override(rank)
            dispatch = ShardedDispatch(experts, None, SectionTimer(torch.device("cpu"), enabled=False), part)
            total += dispatch.compute(self.x_TD, ids_TK, weights_TK, torch.arange(TOKENS), counts_E)
        return total

    def whole_shared(self, gate=True) -> SharedExpert:
        inputs = [self.state[self.family.expert_key(self.layer, SHARED_EXPERT, m)] for m in self.family.expert_inputs]
        output = self.state[self.family.expert_key(self.layer, SHARED_EXPERT, self.family.expert_output)]
        experts = GroupedExperts(*stack_experts([inputs], [output]), self.family.act(self.config), "loop")
        return SharedExpert(experts, self.family.shared_gate_fn(self.model, self.layer) if gate else None)


@pytest.fixture(scope="module")
def blocks():
    cache: dict = {}

    def get(family: str) -> Block:
        if family not in cache:
            cache[family] = Block({**MODELS, **GENERIC_MODELS}[family])
        return cache[family]

    return get


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", list(MODELS))
def test_rank_slices_add_up_to_transformers_block(blocks, family):
    b = blocks(family)
    want = b.transformers_output()
    assert want.abs().max() > 0.1  # the block does something
    assert builtin_family(MODELS[family]).model_type == family
    for world in (1, 2, 3, 4):
        assert error(b.sharded_output(world), want) <= TOL, (family, world)


@pytest.mark.parametrize("family", SHARED_FAMILIES)
def test_shared_expert_whole_on_every_rank_fails(blocks, family):
    """The shared expert's output must be split across the ranks like a routed expert's: added whole
    on each of 2 ranks, it counts twice."""
    b = blocks(family)
    assert b.family.shared
    wrong = b.sharded_output(2, shared_override=lambda rank: b.whole_shared())
    assert error(wrong, b.transformers_output()) > 1e-2
    # and the whole shared expert on one rank only is right: the control is the replication, nothing else
    right = b.sharded_output(2, shared_override=lambda rank: b.whole_shared() if rank == 0 else None)
    assert error(right, b.transformers_output()) <= TOL


def test_qwen2_moe_shared_gate_skipped_fails(blocks):
    b = blocks("qwen2_moe")
    wrong = b.sharded_output(3, shared_override=lambda rank: None if rank else b.whole_shared(gate=False))
    assert error(wrong, b.transformers_output()) > 1e-2


def test_deepseek_v3_correction_bias_in_the_weights_fails(blocks):
    """e_score_correction_bias chooses the experts only; a router that also adds it to their weights is off."""
    b = blocks("deepseek_v3")
    gate = b.block.gate
    assert gate.e_score_correction_bias.abs().max() > 0.1
    ids_TK, weights_TK = b.routing()
    scores_TE = torch.sigmoid(torch.nn.functional.linear(b.x_TD, gate.weight))
    biased_TK = (scores_TE + gate.e_score_correction_bias).gather(1, ids_TK)
    biased_TK = biased_TK / biased_TK.sum(-1, keepdim=True) * gate.routed_scaling_factor
    wrong = b.sharded_output(2, routing=(ids_TK, biased_TK))
    assert error(wrong, b.transformers_output()) > 1e-2
    # the built-in's bias changes the choice of some tokens: a router that ignored it would fail as well
    bias = gate.e_score_correction_bias.clone()
    gate.e_score_correction_bias.zero_()
    try:
        unbiased_ids_TK, _ = b.routing()
    finally:
        gate.e_score_correction_bias.copy_(bias)
    assert not torch.equal(unbiased_ids_TK.sort(-1).values, ids_TK.sort(-1).values)


def test_deepseek_v2_greedy_router(blocks):
    """DeepSeek-V2-Lite routes greedily (`topk_method` "greedy", no groups), the built-in group-limited
    (1 group of 4): the same weights routed both ways choose differently, and both add up at every world size."""
    greedy, grouped = Block("tiny-deepseek-v2", topk_method="greedy"), blocks("deepseek_v2")
    assert greedy.family.moe_block(greedy.model, greedy.layer).gate.topk_method == "greedy"
    assert not torch.equal(greedy.routing()[0].sort(-1).values, grouped.routing()[0].sort(-1).values)
    want = greedy.transformers_output()
    assert error(want, grouped.transformers_output()) > 1e-2
    for world in (1, 2, 3, 4):
        assert error(greedy.sharded_output(world), want) <= TOL, world


def test_phimoe_softmax_top2_in_place_of_sparsemixer_fails(blocks):
    b = blocks("phimoe")
    logits_TE = torch.nn.functional.linear(b.x_TD, b.block.router.weight)
    top_TK = logits_TE.topk(2, -1)
    plain = (top_TK.indices, torch.softmax(top_TK.values, -1))
    assert error(b.sharded_output(2, routing=plain), b.transformers_output()) > 1e-2


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "granitemoe", "granitemoeshared"])
def test_gate_and_up_cut_from_the_fused_rows_fails(blocks, family):
    """Rank r taking rows [2 lo, 2 hi) of the fused [gate; up] and halving them (a plain slicing of
    transformers' in-memory tensor, and of Granite's `input_linear` on disk) is wrong for the routed
    and the shared experts alike."""
    b = blocks(family)
    world = 2
    good = b.rank_state

    def fused_cut(rank, world_):
        out = good(rank, world_)
        for key in out:
            layer, e, matrix = b.family.parse_expert_key(key)
            if matrix == "down_proj":
                continue
            full = torch.cat([b.state[b.family.expert_key(layer, e, "gate_proj")], b.state[b.family.expert_key(layer, e, "up_proj")]])
            lo, hi = tensor_bounds(b.state[key].shape, 0, world_)[rank]
            gate, up = full[2 * lo:2 * hi].chunk(2)
            out[key] = gate if matrix == "gate_proj" else up
        return out

    b.rank_state = fused_cut
    try:
        wrong = b.sharded_output(world)
    finally:
        b.rank_state = good
    assert error(wrong, b.transformers_output()) > 1e-2


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_bench_shared_mlp_slices_add_up_to_the_whole(blocks, family):
    """The bench gives MoEShard a rank's slice of the shared expert and the other systems the whole one."""
    from moeshard_cli.bench.systems import SharedMLP, Skip, build_dispatch

    b = blocks(family)
    inputs = [b.state[b.family.expert_key(b.layer, SHARED_EXPERT, m)] for m in b.family.expert_inputs]
    output = b.state[b.family.expert_key(b.layer, SHARED_EXPERT, b.family.expert_output)]
    mlp = SharedMLP(inputs, output, b.family.shared_gate_fn(b.model, b.layer), b.family.act(b.config), "loop")
    with torch.no_grad():
        whole = mlp.whole()(b.x_TD)
        for world in (2, 3):
            assert error(sum(mlp.rank_slice(b.family, r, world)(b.x_TD) for r in range(world)), whole) <= TOL
        assert error(mlp.rank_slice(b.family, 0, 2)(b.x_TD), whole) > 1e-2
    skip = build_dispatch("deepspeed", b.layer, b.family, b.config, None, type("C", (), {"world": 2, "rank": 0})(), None, None,
                          "loop", None, 0, mlp)
    assert isinstance(skip, Skip) and "shared-expert" in skip.reason


@pytest.mark.parametrize("family", ["granitemoe", "granitemoeshared"])
def test_granite_logits_scaling(blocks, family):
    """`--score` takes the family's logits: Granite's causal LM divides them by `logits_scaling` (6 in
    the built-ins, as granite-3.0), and the LM head alone scores far from transformers' forward."""
    from moeshard_cli.reference import reference_outputs
    from moeshard_cli.run.worker import score_lines

    b = blocks(family)
    assert b.config.logits_scaling == 6.0
    ids_BS = torch.tensor([[5, 40, 77, 9, 120, 3, 1], [8, 8, 61, 200, 1, 0, 0]])
    lengths_B = torch.tensor([7, 5])
    want = torch.stack(reference_outputs(b.family, b.model, [row[:n].tolist() for row, n in zip(ids_BS, lengths_B)], pooling="score"))
    with torch.no_grad():
        hidden_BSD = b.family.hidden_states(b.model, ids_BS, (torch.arange(7)[None] < lengths_B[:, None]).long())
        vocab = b.config.vocab_size
        right = score_lines(lambda h: b.family.logits(b.model, h), vocab, hidden_BSD, ids_BS, lengths_B)
        wrong = score_lines(b.model.lm_head, vocab, hidden_BSD, ids_BS, lengths_B)
    assert error(right, want) <= TOL * want.abs().max()
    assert error(wrong[:, 1], want[:, 1]) > 1.0


class RankSum(torch.nn.Module):
    """In place of transformers' experts: the sum over ranks of what each rank's slices compute (the reduce-scatter's result)."""

    def __init__(self, block: Block, world: int):
        super().__init__()
        self.b, self.world = block, world

    def forward(self, x_TD, ids_TK, weights_TK):
        self.b.x_TD = x_TD
        return self.b.sharded_output(self.world, routing=(ids_TK, weights_TK))


@pytest.mark.parametrize("family", list(GENERIC_MODELS))
def test_generic_family_block_with_rank_slices_is_transformers_block(blocks, family):
    """A family served from the module tree alone: transformers' whole block (router, shared expert and
    its gate, its own) with its experts replaced by the rank slices' sum gives the block's output, at
    1-4 workers; with one rank's slices missing it does not."""
    b = blocks(family)
    assert b.family.model_type == family and builtin_family(GENERIC_MODELS[family]) is b.family
    x_TD, experts, good = b.x_TD, b.block.experts, b.rank_state
    with torch.no_grad():
        want = b.block(x_TD[None])[0]
        assert want.abs().max() > 0.1
        try:
            for world in (1, 2, 3, 4):
                b.block.experts = RankSum(b, world)
                assert error(b.block(x_TD[None])[0], want) <= TOL, world
            b.rank_state = lambda rank, world: {k: v * 0 if rank == 2 else v for k, v in good(rank, world).items()}
            b.block.experts = RankSum(b, 3)
            assert error(b.block(x_TD[None])[0], want) > 1e-2
        finally:
            b.block.experts, b.x_TD, b.rank_state = experts, x_TD, good
