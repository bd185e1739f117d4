"""The DeepSpeed-MoE baseline (`moeshard_cli.bench.deepspeed_moe`), 2 gloo workers on CPU.

The real `deepspeed.moe.layer.MoE` with our assignment forced into its gate is checked
against a dense single-process reference `wo_e(act(wi_e(x)))` per token, and against
moeshard's own dropless `ExpertParallelDispatch` on the same weights. With token dropping,
the dropped tokens must be exactly those DeepSpeed's capacity rule drops, with zero output.

All checks run in one pair of spawned workers (DeepSpeed's start-up is paid once); each check
records its traceback or None, and the tests below read them. The workers' process group has a
30 s timeout and the parent kills them after `JOIN_TIMEOUT`, so a failure never hangs the suite.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeshard_cli.bench.deepspeed_moe import deepspeed_version

pytestmark = pytest.mark.skipif(deepspeed_version() is None, reason="deepspeed is not installed")

WORLD, D_MODEL, D_FF, TOKENS = 2, 64, 128, 32
JOIN_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _act():
    from transformers.activations import ACT2FN

    return ACT2FN["relu"]


def _full_weights(num_experts: int, seed: int = 0):
    """The same full weights on every rank: w_in [E, D, F], w_out [E, F, D]."""
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(num_experts, D_MODEL, D_FF, generator=g) / D_MODEL**0.5
    w_out = torch.randn(num_experts, D_FF, D_MODEL, generator=g) / D_FF**0.5
    return w_in, w_out


def _reference(x_TD, expert_T, w_in, w_out, act):
    """Dense, per token: wo_e(act(wi_e(x)))."""
    return torch.stack([act(x @ w_in[e]) @ w_out[e] for x, e in zip(x_TD, expert_T.tolist())])


def _inputs(rank: int, num_experts: int, probs: list[float], tokens: int = TOKENS, seed: int = 0):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x_TD = torch.randn(tokens, D_MODEL, generator=g)
    expert_T = torch.multinomial(torch.tensor(probs), tokens, replacement=True, generator=g)
    return x_TD, expert_T


def _all_counts(expert_T, num_experts):
    import torch.distributed as dist

    counts_E = torch.bincount(expert_T, minlength=num_experts)
    out = [torch.empty_like(counts_E) for _ in range(dist.get_world_size())]
    dist.all_gather(out, counts_E)
    return torch.stack(out)


def _dispatch(rank, num_experts, drop_tokens, cf, seed=0):
    from moeshard_cli.bench.deepspeed_moe import DeepSpeedDispatch
    from moeshard_cli.moe.exchange import Collectives

    w_in, w_out = _full_weights(num_experts, seed)
    L = num_experts // WORLD
    local = slice(rank * L, (rank + 1) * L)
    disp = DeepSpeedDispatch(w_in[local], w_out[local], num_experts, _act(), drop_tokens, cf, Collectives())
    return disp, w_in, w_out


def check_dropless(rank):
    """drop_tokens=False: every token equals the reference and ExpertParallelDispatch; nothing dropped."""
    from moeshard_cli.moe.dispatch import ExpertParallelDispatch
    from moeshard_cli.moe.exchange import Collectives
    from moeshard_cli.moe.experts import GroupedExperts
    from moeshard_cli.moe.timing import SectionTimer

    E = 8
    disp, w_in, w_out = _dispatch(rank, E, drop_tokens=False, cf=1.0)
    L = E // WORLD
    for j, expert in enumerate(disp.moe.deepspeed_moe.experts.deepspeed_experts):  # views, not copies
        assert expert.wi.weight.data_ptr() == w_in[rank * L + j].data_ptr()
        assert expert.wo.weight.data_ptr() == w_out[rank * L + j].data_ptr()
        assert torch.equal(expert.wi.weight, w_in[rank * L + j].T)
    probs = [0.4, 0.05, 0.2, 0.05, 0.1, 0.1, 0.05, 0.05] if rank == 0 else [0.05, 0.05, 0.05, 0.05, 0.1, 0.1, 0.2, 0.4]
    x_TD, expert_T = _inputs(rank, E, probs)
    y_TD, counts_GE = disp(x_TD, expert_T[:, None], torch.ones(len(expert_T), 1))
    want_GE = _all_counts(expert_T, E)
    assert torch.equal(counts_GE, want_GE), (counts_GE, want_GE)
    assert disp.capacity == int(want_GE.max()), "dropless DeepSpeed pads every expert to the busiest one"
    ref_TD = _reference(x_TD, expert_T, w_in, w_out, _act())
    err = (y_TD - ref_TD).abs().max().item()
    assert err <= 1e-5, f"max |deepspeed - reference| = {err}"
    assert disp.dropped == 0 and disp.tokens == TOKENS and not disp.last_dropped_T.any()

    local = slice(rank * L, (rank + 1) * L)
    timer = SectionTimer(torch.device("cpu"), enabled=False)
    ep = ExpertParallelDispatch(GroupedExperts(w_in[local], w_out[local], _act(), "loop"), E, Collectives(), timer)
    y_ep, counts_ep = ep(x_TD, expert_T[:, None], torch.ones(len(expert_T), 1))
    assert torch.equal(counts_ep, counts_GE)
    err = (y_TD - y_ep).abs().max().item()
    assert err <= 1e-5, f"max |deepspeed - ExpertParallelDispatch| = {err}"

    y2_TD, _ = disp(x_TD, expert_T[:, None], torch.ones(len(expert_T), 1))  # running totals, and the same answer again
    assert torch.equal(y2_TD, y_TD) and disp.tokens == 2 * TOKENS and disp.dropped == 0


def check_dropping(rank):
    """drop_tokens=True: DeepSpeed's capacity ceil(T/E*cf) per expert per rank; dropped tokens give 0."""
    from moeshard_cli.bench.deepspeed_moe import deepspeed_capacity

    E = 4
    probs = [0.7, 0.1, 0.1, 0.1] if rank == 0 else [0.1, 0.15, 0.15, 0.6]
    for layer, cf in enumerate((1.0, 1.5)):  # two layers: the second reuses DeepSpeed's EP group
        disp, w_in, w_out = _dispatch(rank, E, drop_tokens=True, cf=cf, seed=layer)
        x_TD, expert_T = _inputs(rank, E, probs, seed=layer)
        y_TD, counts_GE = disp(x_TD, expert_T[:, None], torch.ones(len(expert_T), 1))

        capacity = math.ceil(TOKENS / E * cf)  # cf is exact in binary: no float32 rounding question
        assert disp.capacity == capacity == deepspeed_capacity(TOKENS, E, cf), (disp.capacity, capacity)
        n_E = torch.bincount(expert_T, minlength=E)
        want_dropped_E = (n_E - capacity).clamp(min=0)
        assert int(want_dropped_E.sum()) > 0, "the skewed assignment must overflow an expert"
        dropped_T = disp.last_dropped_T
        got_dropped_E = torch.bincount(expert_T[dropped_T], minlength=E)
        assert torch.equal(got_dropped_E, want_dropped_E), (got_dropped_E, want_dropped_E, n_E)
        assert disp.dropped == int(want_dropped_E.sum()) and disp.tokens == TOKENS

        # Which tokens: top1gating keeps torch.topk(one-hot mask, capacity, dim=0) per expert with
        # use_rts=False. torch.topk breaks the ties among equal ones its own way, not by position.
        mask_TE = F.one_hot(expert_T, E)
        top_CE = torch.topk(mask_TE, k=min(capacity, TOKENS), dim=0)[1]
        kept_T = (mask_TE * torch.zeros_like(mask_TE).scatter_(0, top_CE, 1)).sum(1).bool()
        assert torch.equal(~kept_T, dropped_T)

        assert bool((y_TD[dropped_T] == 0).all()), "a dropped token must have exactly zero output"
        ref_TD = _reference(x_TD, expert_T, w_in, w_out, _act())
        err = (y_TD[~dropped_T] - ref_TD[~dropped_T]).abs().max().item()
        assert err <= 1e-5, f"max |deepspeed - reference| over kept tokens = {err}"
        assert torch.equal(counts_GE, _all_counts(expert_T, E)), "counts_GE is the routing, before drops"


def check_column_slices(rank):
    """The bench's layout: experts held as G column slices [G, E_local, D, F/G] whose outputs add up."""
    from moeshard_cli.bench.deepspeed_moe import DeepSpeedDispatch
    from moeshard_cli.moe.exchange import Collectives

    E, G = 4, 2
    w_in, w_out = _full_weights(E, seed=3)
    w_in_GEDF = w_in.view(E, D_MODEL, G, D_FF // G).permute(2, 0, 1, 3).contiguous()
    w_out_GEFD = w_out.view(E, G, D_FF // G, D_MODEL).transpose(0, 1).contiguous()
    local = slice(rank * E // WORLD, (rank + 1) * E // WORLD)
    disp = DeepSpeedDispatch(w_in_GEDF[:, local], w_out_GEFD[:, local], E, _act(), False, 1.0, Collectives())
    expert = disp.moe.deepspeed_moe.experts.deepspeed_experts[1]
    assert expert.more_slices[0].wi.weight.data_ptr() == w_in_GEDF[1, local][1].data_ptr()
    x_TD, expert_T = _inputs(rank, E, [0.4, 0.3, 0.2, 0.1], seed=3)
    y_TD, _ = disp(x_TD, expert_T[:, None], torch.ones(len(expert_T), 1))
    err = (y_TD - _reference(x_TD, expert_T, w_in, w_out, _act())).abs().max().item()
    assert err <= 1e-5, f"max |deepspeed - reference| = {err}"


def check_unequal_tokens(rank):
    """With dropping, different token counts per rank are refused on every rank instead of hanging."""
    disp, _, _ = _dispatch(rank, 4, drop_tokens=True, cf=1.0)
    x_TD, expert_T = _inputs(rank, 4, [0.25] * 4, tokens=TOKENS - 8 * rank)
    with pytest.raises(ValueError, match="same number of tokens"):
        disp(x_TD, expert_T[:, None], torch.ones(len(expert_T), 1))


def check_indivisible(rank):
    """E not divisible by the workers -> ValueError before anything is built."""
    from moeshard_cli.bench.deepspeed_moe import DeepSpeedDispatch
    from moeshard_cli.moe.exchange import Collectives

    w_in, w_out = _full_weights(5)
    with pytest.raises(ValueError, match="divisible"):
        DeepSpeedDispatch(w_in[:2], w_out[:2], 5, _act(), True, 1.0, Collectives())


CHECKS = {f.__name__.removeprefix("check_"): f for f in (check_indivisible, check_dropless, check_dropping,
                                                         check_column_slices, check_unequal_tokens)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    results, started = {}, time.perf_counter()
    try:
        from moeshard_cli.bench.deepspeed_moe import init_deepspeed_groups

        init_deepspeed_groups()
        results["_init_s"] = time.perf_counter() - started
        for name, check in CHECKS.items():
            try:
                check(rank)
                results[name] = None
            except Exception:  # recorded; the other checks still run on both ranks in step
                results[name] = traceback.format_exc()
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("deepspeed-moe")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"DeepSpeed workers did not finish in {JOIN_TIMEOUT:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CHECKS))
def test_deepspeed_moe(worker_results, name):
    for rank, results in enumerate(worker_results):
        assert name in results, f"rank {rank} never ran {name}"
        assert results[name] is None, f"rank {rank}:\n{results[name]}"
