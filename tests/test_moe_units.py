"""The pieces of `moeshard run`, one by one, in this process: index arithmetic, routers,
grouped expert compute and the world-size-1 dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from moeshard_cli.errors import UserError
from moeshard_cli.run.command import RunOptions
from moeshard_cli.moe.dispatch import ShardedDispatch
from moeshard_cli.moe.exchange import Collectives, exclusive_cumsum, expert_major_index
from moeshard_cli.moe.experts import GroupedExperts, padded_width, stack_bias, stack_experts
from moeshard_cli.moe.layer import ShardedSparseMLP, TokenContext
from moeshard_cli.moe.routing import RouterSpec, route, skewed_experts, skewed_probabilities, token_uniforms
from moeshard_cli.moe.timing import SectionTimer

# ---------------------------------------------------------------- expert_major_index

# counts_GE tables: rank g sent counts[g][e] tokens of expert e
COUNT_TABLES = {
    "one-rank": [[3, 0, 2, 1]],
    "one-rank-one-expert": [[5]],
    "all-zero": [[0, 0, 0], [0, 0, 0]],
    "one-token": [[0, 0], [0, 1], [0, 0]],
    "square": [[1, 2], [3, 4]],
    "uneven-ranks": [[5, 0, 1, 0], [0, 0, 0, 0], [2, 3, 0, 1]],
    "empty-experts": [[0, 4, 0, 0, 2], [1, 0, 0, 0, 7], [0, 0, 0, 0, 0], [3, 3, 0, 0, 0]],
    "one-expert-many-ranks": [[2], [0], [3], [1]],
}


def brute_expert_major(counts: list[list[int]], starts: list[int]) -> list[int]:
    """For expert 0: rank 0's rows, rank 1's rows, ...; then expert 1; rows of rank g start at starts[g]."""
    out = []
    for e in range(len(counts[0])):
        for g, row in enumerate(counts):
            first = starts[g] + sum(row[:e])
            out.extend(range(first, first + row[e]))
    return out


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("name", list(COUNT_TABLES))
def test_expert_major_index_matches_brute_force(name, layout):
    counts = COUNT_TABLES[name]
    rows = [sum(r) for r in counts]
    starts = [sum(rows[:g]) for g in range(len(rows))] if layout == "packed" else [g * max(rows) for g in range(len(rows))]
    idx_N = expert_major_index(torch.tensor(counts), torch.tensor(starts))
    assert idx_N.dtype == torch.long
    assert idx_N.tolist() == brute_expert_major(counts, starts)


def test_expert_major_index_groups_a_labelled_buffer():
    counts_GE = torch.tensor(COUNT_TABLES["empty-experts"])
    G, E = counts_GE.shape
    # a packed rank-major buffer whose rows say (rank, expert)
    labels = [(g, e) for g in range(G) for e in range(E) for _ in range(int(counts_GE[g, e]))]
    idx_N = expert_major_index(counts_GE, exclusive_cumsum(counts_GE.sum(1)))
    regrouped = [labels[i] for i in idx_N.tolist()]
    assert regrouped == sorted(labels, key=lambda ge: (ge[1], ge[0]))


# ---------------------------------------------------------------- routers


@pytest.mark.parametrize("E, skew, hot, K", [(8, 0.6, 0.1, 1), (8, 0.0, 0.1, 1), (16, 0.3, 0.25, 4), (128, 0.6, 0.1, 13), (4, 1.0, 1.0, 4)])
def test_skewed_probabilities_formula(E, skew, hot, K):
    p = skewed_probabilities(E, skew, hot)
    assert p.dtype == torch.float64 and p.shape == (E,)
    expected = [(1 / E + (skew if i < K else 0.0)) / (1 + K * skew) for i in range(E)]
    assert p.tolist() == pytest.approx(expected, abs=1e-12)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("E, skew, hot", [(8, 0.6, 0.1), (8, 0.0, 0.1), (16, 0.3, 0.25)])
def test_skewed_router_draws_follow_the_formula(E, skew, hot):
    n = 200_000
    spec = RouterSpec("skewed", skew, hot, seed=3)
    # token ids as the workers number them: line << 20 | position
    ids_T = (torch.arange(n) // 100 << 20) + torch.arange(n) % 100
    logits_TE = torch.randn(n, E)
    expert_T, prob_T = route(logits_TE, torch.float32, spec, ids_T, layer=1)
    freq_E = torch.bincount(expert_T, minlength=E).double() / n
    assert (freq_E - skewed_probabilities(E, skew, hot)).abs().max() < 0.01
    # the output is scaled by the router's own probability of the drawn expert, as transformers does
    torch.testing.assert_close(prob_T, torch.softmax(logits_TE, -1).gather(1, expert_T[:, None]).squeeze(1))


def test_model_router_is_the_argmax_of_the_softmax():
    logits_TE = torch.randn(1000, 8)
    expert_T, prob_T = route(logits_TE, torch.float32, RouterSpec(), torch.arange(1000), layer=1)
    probs_TE = torch.softmax(logits_TE, -1)
    assert torch.equal(expert_T, probs_TE.argmax(-1))
    torch.testing.assert_close(prob_T, probs_TE.max(-1).values)


def test_token_uniforms_do_not_depend_on_batching():
    gen = torch.Generator().manual_seed(0)
    ids_T = (torch.randint(0, 10_000, (4096,), generator=gen) << 20) + torch.randint(0, 512, (4096,), generator=gen)
    u_T = token_uniforms(ids_T, seed=7, layer=3)
    assert ((u_T >= 0) & (u_T < 1)).all()
    assert torch.equal(torch.cat([token_uniforms(c, 7, 3) for c in ids_T.split(97)]), u_T)
    assert torch.equal(token_uniforms(ids_T.view(64, 64), 7, 3).view(-1), u_T)
    perm = torch.randperm(4096, generator=gen)
    assert torch.equal(token_uniforms(ids_T[perm], 7, 3), u_T[perm])
    # a pure function of (seed, layer, id): other seeds and layers draw differently
    assert not torch.equal(token_uniforms(ids_T, 8, 3), u_T)
    assert not torch.equal(token_uniforms(ids_T, 7, 1), u_T)
    assert abs(float(u_T.mean()) - 0.5) < 0.02


ROUTER_VALUES = [({"kind": "random"}, "--router random is unknown"), ({"kind": "skewed", "skew": -0.1}, "--skew -0.1 is negative"),
                 ({"kind": "skewed", "skew": float("nan")}, "--skew nan is not a finite number"),
                 ({"kind": "skewed", "hot_experts": 0.0}, "--hot-experts 0.0 is outside (0, 1]"),
                 ({"kind": "skewed", "hot_experts": 1.5}, "--hot-experts 1.5 is outside (0, 1]")]


@pytest.mark.parametrize("kwargs, message", ROUTER_VALUES, ids=[m for _, m in ROUTER_VALUES])
def test_router_spec_rejects_bad_values(kwargs, message):
    """The core says what is wrong in plain words; `run`'s options turn it into one line naming the flag."""
    with pytest.raises(ValueError):
        RouterSpec(**kwargs)
    fields = {"kind": "router", "skew": "skew", "hot_experts": "hot_experts"}
    opts = RunOptions(input=Path("x.txt"), **{fields[k]: v for k, v in kwargs.items()})
    with pytest.raises(UserError) as info:
        opts.validate()
    assert info.value.fix and "\n" not in info.value.line() and info.value.line().startswith(message)


# ---------------------------------------------------------------- grouped expert compute

D = 64


def random_experts(E: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    wi = [torch.randn(width, D, generator=gen) / D**0.5 for _ in range(E)]  # nn.Linear layout [F, D]
    wo = [torch.randn(D, width, generator=gen) / width**0.5 for _ in range(E)]  # [D, F]
    return wi, wo


def dense_reference(x_ND, expert_N, wi, wo, act):
    """Every token through its own expert, one token at a time."""
    rows = [act(x_ND[n] @ wi[e].T) @ wo[e].T for n, e in enumerate(expert_N.tolist())]
    return torch.stack(rows) if rows else x_ND.new_zeros(0, D)


BACKENDS = ["grouped_mm", "loop"]  # megablocks (CUDA, bfloat16 only): tests/test_gpu.py
COUNTS = [[3, 0, 7, 0, 1], [0, 0, 0, 0, 5], [1, 1, 1, 1, 1], [0, 12, 0, 0, 0]]


@pytest.mark.parametrize("act", ["relu", "gelu_new"])
@pytest.mark.parametrize("width", [43, 44, 1, 130])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_experts_match_a_dense_reference(backend, width, act):
    wi, wo = random_experts(len(COUNTS[0]), width)
    w_in_EDF, w_out_EFD = stack_experts([[m] for m in wi], wo)
    assert w_in_EDF.shape == (5, D, padded_width(width, torch.float32)) and w_in_EDF.is_contiguous()
    experts = GroupedExperts(w_in_EDF, w_out_EFD, ACT2FN[act], backend)
    for counts in COUNTS:
        counts_E = torch.tensor(counts)
        expert_N = torch.repeat_interleave(torch.arange(len(counts)), counts_E)
        x_ND = torch.randn(len(expert_N), D)
        out_ND = experts(x_ND, counts_E)
        torch.testing.assert_close(out_ND, dense_reference(x_ND, expert_N, wi, wo, ACT2FN[act]), atol=1e-5, rtol=1e-5)


def test_grouped_mm_and_loop_agree_and_slices_sum_to_the_full_expert():
    """MoEShard's identity: column slices of d_ff (uneven: 44, 43, 43) summed give the full FFN."""
    wi, wo = random_experts(5, 130, seed=1)
    counts_E = torch.tensor(COUNTS[0])
    x_ND = torch.randn(int(counts_E.sum()), D)
    full = {b: GroupedExperts(*stack_experts([[m] for m in wi], wo), nn.ReLU(), b)(x_ND, counts_E) for b in ("grouped_mm", "loop")}
    torch.testing.assert_close(full["grouped_mm"], full["loop"], atol=1e-5, rtol=1e-5)
    parts = []
    for lo, hi in [(0, 44), (44, 87), (87, 130)]:
        w = stack_experts([[m[lo:hi]] for m in wi], [m[:, lo:hi] for m in wo])
        parts.append(GroupedExperts(*w, nn.ReLU(), "grouped_mm")(x_ND, counts_E))
    torch.testing.assert_close(sum(parts), full["loop"], atol=1e-5, rtol=1e-5)


def test_sharded_dispatch_on_one_worker_equals_the_dense_reference():
    E, width = 6, 43
    wi, wo = random_experts(E, width, seed=2)
    comm = Collectives()  # no process group: one worker
    assert (comm.world, comm.rank) == (1, 0)
    dispatch = ShardedDispatch(GroupedExperts(*stack_experts([[m] for m in wi], wo), nn.ReLU(), "grouped_mm"), comm, SectionTimer(torch.device("cpu")))
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(50, D, generator=gen)
    expert_T = torch.tensor([0, 2, 5])[torch.randint(0, 3, (50,), generator=gen)]  # experts 1, 3, 4 get nothing
    y_TD, counts_GE = dispatch(x_TD, expert_T[:, None], torch.ones(50, 1))
    assert counts_GE.tolist() == [torch.bincount(expert_T, minlength=E).tolist()]
    # returned in the caller's token order, weight 1
    torch.testing.assert_close(y_TD, dense_reference(x_TD, expert_T, wi, wo, nn.ReLU()), atol=1e-5, rtol=1e-5)


def test_sharded_sparse_mlp_matches_transformers_on_real_tokens():
    """The drop-in layer on one worker against transformers' own sparse MLP (made dropless);
    padding positions are not routed and get a zero MLP output."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    from moeshard_cli.shard.builtin import builtin_config

    _, config = builtin_config("tiny-switch")
    torch.manual_seed(0)
    hf = SwitchTransformersSparseMLP(config).eval()
    hf.router.expert_capacity = 10**9
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    experts = [hf.experts[f"expert_{e}"] for e in range(config.num_experts)]
    grouped = GroupedExperts(*stack_experts([[m.wi.weight.detach()] for m in experts], [m.wo.weight.detach() for m in experts]),
                             ACT2FN[config.dense_act_fn], "grouped_mm")
    ctx = TokenContext()
    layer = ShardedSparseMLP(config.d_model, config.num_experts, config.router_bias,
                             ShardedDispatch(grouped, Collectives(), SectionTimer(torch.device("cpu"))), RouterSpec(), ctx, 1)
    layer.router.classifier.weight.data.copy_(hf.router.classifier.weight)
    hidden_BSD = torch.randn(3, 7, config.d_model)
    mask_BS = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate([7, 2, 5]):
        mask_BS[row, :n] = 1
    ctx.set_batch(mask_BS, torch.arange(21).view(3, 7))
    with torch.inference_mode():
        ours_BSD, theirs_BSD = layer(hidden_BSD), hf(hidden_BSD)
    real = mask_BS.bool()
    torch.testing.assert_close(ours_BSD[real], theirs_BSD[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(ours_BSD[~real], torch.zeros_like(ours_BSD[~real]))
    assert int(layer.load.tokens_E.sum()) == int(mask_BS.sum()) == int(layer.load.tokens_G.sum())


# ---------------------------------------------------------------- top-k, gated experts

def gated_reference(x_TD, ids_TK, weights_TK, gate, up, down, act, bias_in=None, bias_out=None):
    """Per token, the weighted sum over its K experts of down(act(gate x) * up x), one token at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(D)
        for e, w in zip(ids_TK[t].tolist(), weights_TK[t].tolist()):
            g, u = x_TD[t] @ gate[e].T, x_TD[t] @ up[e].T
            if bias_in is not None:
                g, u = g + bias_in[e][0], u + bias_in[e][1]
            out = (act(g) * u) @ down[e].T
            y += w * (out + (bias_out[e] if bias_out is not None else 0))
        rows.append(y)
    return torch.stack(rows)


def random_gated(E: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gate = [torch.randn(width, D, generator=gen) / D**0.5 for _ in range(E)]
    up = [torch.randn(width, D, generator=gen) / D**0.5 for _ in range(E)]
    down = [torch.randn(D, width, generator=gen) / width**0.5 for _ in range(E)]
    return gate, up, down


def random_routing(T: int, E: int, K: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return ids_TK, torch.rand(T, K, generator=gen)


# width 38 on 3 ranks: 13, 13, 12 (uneven, and not 16-byte aligned)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_gated_slices_of_every_expert_sum_to_the_top_k_output(backend, K):
    """MoEShard's identity for SwiGLU experts: rows [lo, hi) of gate and up and the same columns of down, per rank."""
    E, width = 6, 38
    gate, up, down = random_gated(E, width)
    ids_TK, weights_TK = random_routing(40, E, K)
    x_TD = torch.randn(40, D)
    act = ACT2FN["silu"]
    parts = []
    for lo, hi in [(0, 13), (13, 26), (26, 38)]:
        experts = GroupedExperts(*stack_experts([[g[lo:hi], u[lo:hi]] for g, u in zip(gate, up)], [d[:, lo:hi] for d in down]), act, backend)
        assert experts.gated
        parts.append(ShardedDispatch(experts, Collectives(), SectionTimer(torch.device("cpu")))(x_TD, ids_TK, weights_TK)[0])
    torch.testing.assert_close(sum(parts), gated_reference(x_TD, ids_TK, weights_TK, gate, up, down, act), atol=1e-5, rtol=1e-5)


def test_slicing_the_fused_gate_up_tensor_by_contiguous_rows_is_wrong():
    """The negative control of the rule: contiguous rows of transformers' fused [gate; up] tensor are not a slice."""
    E, width = 4, 38
    gate, up, down = random_gated(E, width, seed=3)
    ids_TK, weights_TK = random_routing(30, E, 2, seed=3)
    x_TD = torch.randn(30, D)
    act = ACT2FN["silu"]
    total = 0
    for lo, hi in [(0, 13), (13, 26), (26, 38)]:
        fused = [torch.cat([g, u]) for g, u in zip(gate, up)]  # [2F, D], as transformers holds it
        wrong = [[f[2 * lo:2 * hi][: hi - lo], f[2 * lo:2 * hi][hi - lo:]] for f in fused]
        total = total + ShardedDispatch(GroupedExperts(*stack_experts(wrong, [d[:, lo:hi] for d in down]), act, "loop"),
                                        Collectives(), SectionTimer(torch.device("cpu")))(x_TD, ids_TK, weights_TK)[0]
    assert (total - gated_reference(x_TD, ids_TK, weights_TK, gate, up, down, act)).abs().max() > 0.1


def test_expert_biases_are_sliced_in_and_added_once_out():
    """Input biases travel with their slice; the output bias is given to one rank only, as the partials are summed."""
    E, width = 5, 38
    gate, up, down = random_gated(E, width, seed=4)
    gen = torch.Generator().manual_seed(4)
    bias_in = [(torch.randn(width, generator=gen), torch.randn(width, generator=gen)) for _ in range(E)]
    bias_out = [torch.randn(D, generator=gen) for _ in range(E)]
    ids_TK, weights_TK = random_routing(25, E, 2, seed=4)
    x_TD = torch.randn(25, D)
    act = ACT2FN["silu"]
    total = 0
    for rank, (lo, hi) in enumerate([(0, 19), (19, 38)]):
        w_in, w_out = stack_experts([[g[lo:hi], u[lo:hi]] for g, u in zip(gate, up)], [d[:, lo:hi] for d in down])
        b_in = stack_bias([[bg[lo:hi], bu[lo:hi]] for bg, bu in bias_in], w_out.shape[1])
        experts = GroupedExperts(w_in, w_out, act, "grouped_mm", b_in, torch.stack(bias_out) if rank == 0 else None)
        total = total + ShardedDispatch(experts, Collectives(), SectionTimer(torch.device("cpu")))(x_TD, ids_TK, weights_TK)[0]
    expected = gated_reference(x_TD, ids_TK, weights_TK, gate, up, down, act, bias_in, bias_out)
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("E, K", [(8, 2), (64, 8), (5, 5)])
def test_skewed_top_k_draws_distinct_experts_and_keeps_the_top_1_draw(E, K):
    spec = RouterSpec("skewed", 0.6, 0.25, seed=1)
    ids_T = torch.arange(5000)
    ids_TK = skewed_experts(E, K, spec, ids_T, layer=3)
    assert ids_TK.shape == (5000, K) and int(ids_TK.min()) >= 0 and int(ids_TK.max()) < E
    assert all(len(set(row)) == K for row in ids_TK.tolist())  # without replacement
    top1, _ = route(torch.zeros(5000, E), torch.float32, spec, ids_T, 3)
    assert torch.equal(ids_TK[:, 0], top1)  # a top-1 family sees the same assignment
    hot = max(1, round(0.25 * E))
    assert (ids_TK[:, 0] < hot).float().mean() > hot / E  # the first draw is skewed toward the hot experts
