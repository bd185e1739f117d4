"""The DeepSpeed-MoE baseline: the real `deepspeed.moe.layer.MoE`, wrapped as a moeshard dispatch.

It follows the dispatch contract of moe/dispatch.py (`(x_TD, ids_TK, weights_TK) -> (y_TD,
counts_GE)`, token and drop counters, `reset()`) for the top-1 and top-2 routing DeepSpeed's
gates implement, with plain (Switch) or gated (SwiGLU) experts: the router runs outside it, so
every system of the bench sees the same assignment.

What is DeepSpeed's own here, and what is forced:
- The layer is DeepSpeed's `MoE` (top-1 `TopKGate` + `MOELayer` + `Experts`), expert
  parallel over the workers (`ep_size = world`), in eval mode, `use_rts=False`,
  `min_capacity=0`, `capacity_factor = eval_capacity_factor = cf`. Local expert j on EP rank r
  is global expert `r * E / world + j`, which is how DeepSpeed's all-to-all lays them out.
- Routing is forced: `TopKGate.forward` computes its logits from `self.wg.weight` itself, so
  the gate's forward is replaced (on this instance only) by a call to DeepSpeed's own
  `top1gating` / `top2gating` on forced logits: log(weight) at our experts, -1e9 elsewhere.
  Top-1: the softmax is exactly 1.0 at the chosen expert, so the layer returns the unscaled
  expert output (zero where it dropped), scaled by the router weight afterwards. Top-2 (with
  `top2_2nd_expert_sampling=False`, no Gumbel noise): DeepSpeed renormalises the two kept
  gates to sum to 1, so the output is scaled by the weights' sum afterwards, which is exactly
  moeshard's for every token that keeps both experts; a token that loses one to capacity gets
  DeepSpeed's renormalised weight on the other. Drops are counted per (token, expert) pair.
- Capacity is DeepSpeed's: with `drop_tokens=True` every expert holds
  `ceil(T / E * cf)` tokens of a rank's T tokens (evaluated in float32 by DeepSpeed), the
  same on every rank, and every expert is padded to it. Which of an over-full expert's
  tokens are kept is what `torch.topk` picks among equal one-hot entries: with
  `use_rts=False` that is NOT position order (on CPU it is a deterministic but arbitrary
  selection). With `drop_tokens=False` the capacity is the largest per-expert count over all
  ranks (an all-reduce inside `top1gating`): dropless, but every expert on every rank is
  padded to the busiest one.
- Both modes need matching capacities on every rank, or DeepSpeed's all-to-all aborts or
  hangs. With dropping that means the same token count on every rank (the bench feeds every
  worker the same number of tokens: same batch size and sequence length, all positions
  routed); dropless it means the busiest (worker, expert) pair fits in every rank's token
  count. `DeepSpeedDispatch` checks this on the counts table that every rank holds, and
  raises the same ValueError on every rank instead of hanging.

Expert weights are never copied: the DeepSpeed expert module is built on the meta device
(DeepSpeed deep-copies it once per local expert) and its `nn.Linear` weights are then
replaced by transposed views of the given `w_in_EDF` / `w_out_EFD`.

Groups: `init_deepspeed_groups()` hands an already initialised torch.distributed to
DeepSpeed (`deepspeed.init_distributed`). By default it skips DeepSpeed's shared-memory
comm op, a C++ extension JIT-built with g++ on first use (~36 s on the 2-core CPU machine):
it serves only `inference_all_reduce` for tensor-parallel inference, never the MoE layer's
all-to-all or capacity all-reduce. With `build_shm_op=True` it is built and cached under
`TORCH_EXTENSIONS_DIR`, defaulting to ~/.cache/moeshard/torch_extensions (0.1 s once cached).
Each layer then joins DeepSpeed's expert-parallel group with `MoE.set_deepspeed_parallelism()`
(the call the paper's script missed); its groups are made by DeepSpeed with torch's default
timeout (30 min for gloo), not the world group's. Pass `group=` to use a group of your own.

deepspeed is imported lazily, so this module imports without it (`deepspeed_version()`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moeshard_cli.moe.dispatch import Counted
from moeshard_cli.moe.exchange import Collectives

EXTENSIONS_DIR = Path.home() / ".cache" / "moeshard" / "torch_extensions"
_NOT_CHOSEN = -1.0e9  # logit of every expert but the forced one: its softmax weight is exactly 0


def deepspeed_version() -> str | None:
    """The installed deepspeed's version, or None when it is not installed (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def deepspeed_capacity(tokens: int, num_experts: int, capacity_factor: float) -> int:
    """DeepSpeed's per-expert capacity with dropping, computed as its `_capacity` does (float32)."""
    cf = torch.tensor(capacity_factor)  # float32, as in top1gating
    return int(torch.ceil((tokens / num_experts) * cf).to(torch.int64))


def init_deepspeed_groups(backend: str | None = None, *, build_shm_op: bool = False,
                          extensions_dir: str | Path | None = None, quiet: bool = True) -> None:
    """Hand the initialised default torch.distributed process group to DeepSpeed. Idempotent.

    Exactly: `deepspeed.init_distributed(dist_backend=backend or dist.get_backend())`, which on
    an initialised torch.distributed only wraps it (`deepspeed.comm` needs that wrapper for
    every collective of the MoE layer) and never re-initialises it.

    - `build_shm_op=False` (default) skips DeepSpeed's shm comm op JIT build (~36 s of g++ on
      first use) by having `deepspeed.comm.torch.build_shm_op` return None while the wrapper is
      made; the MoE layer never uses that op. With True it is built, cached in
      `TORCH_EXTENSIONS_DIR` (set to `extensions_dir`, default ~/.cache/moeshard/torch_extensions,
      unless the variable is already set).
    - With the gloo backend, `DS_ACCELERATOR=cpu` is set (unless set already) before deepspeed's
      first import, which is when DeepSpeed picks its accelerator: on this CPU machine it picks
      CPU anyway (with a warning); on a CUDA machine it would pick CUDA for a CPU/gloo run.
    - `quiet` lowers DeepSpeed's logger to WARNING (it logs every group and layer it creates).
    """
    if not dist.is_initialized():
        raise RuntimeError("init_deepspeed_groups needs torch.distributed initialised first "
                           "(dist.init_process_group), even for one worker")
    backend = backend or dist.get_backend()
    if backend == "gloo" and "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if build_shm_op:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir or EXTENSIONS_DIR))
    import deepspeed
    import deepspeed.comm as ds_dist
    from deepspeed.utils import logger as ds_logger

    if quiet:
        ds_logger.setLevel(logging.WARNING)
    if ds_dist.is_initialized():
        return
    ds_torch = sys.modules["deepspeed.comm.torch"]  # `deepspeed.comm.torch` the attribute is torch itself
    original = getattr(ds_torch, "build_shm_op", None)
    skip = not build_shm_op and original is not None
    if skip:
        ds_torch.build_shm_op = lambda: None
    try:
        with _stdout_to_logger(quiet):
            deepspeed.init_distributed(dist_backend=backend)
    finally:
        if skip:
            ds_torch.build_shm_op = original


@contextlib.contextmanager
def _stdout_to_logger(quiet: bool):
    """DeepSpeed print()s while making groups; keep that off the bench's stdout."""
    if not quiet:
        yield
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logging.getLogger(__name__).debug("deepspeed: %s", buffer.getvalue().strip())


class DenseActDense(nn.Module):
    """One expert without biases: `wo(act(wi(x)))` like transformers' SwitchTransformersDenseActDense,
    or with `gated`, `wo(act(gate(x)) * wi(x))` (SwiGLU; `wi` is the up projection).

    With `slices > 1` the expert is held as column slices of d_ff whose outputs add up
    (slice 0 is this module, `more_slices` the rest), as moeshard's GroupedExperts allows.
    """

    def __init__(self, d_model: int, d_ff: int, act: nn.Module, slices: int = 1, gated: bool = False):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False) if gated else None
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.act = act
        self.more_slices = nn.ModuleList(DenseActDense(d_model, d_ff, act, gated=gated) for _ in range(slices - 1))

    def slices(self) -> list["DenseActDense"]:
        return [self, *self.more_slices]

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.wi(x) if self.gate is not None else self.act(self.wi(x))
        return self.wo(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._one(x)
        for m in self.more_slices:
            y = y + m._one(x)
        return y


class DeepSpeedDispatch(Counted):
    """DeepSpeed-MoE (top-1 or top-2, expert parallel over the EP group) with our assignment forced into its gate.

    Args:
        w_in_EDH, w_out_EFD: this worker's experts, [E_local, d_model, H] and [E_local, d_ff,
            d_model] (or [G, E_local, ...]: the bench's G rank slices of each expert, which add up),
            H = d_ff, or 2 d_ff for gated experts (gate, then up: moe/experts.stack_experts' layout).
            Used as views, never copied.
        top_k: 1 or 2, the gates DeepSpeed has.
        num_experts: E over all workers; must divide by the EP group's size.
        act: the activation module, e.g. `ACT2FN["relu"]`.
        drop_tokens, capacity_factor: DeepSpeed's; cf is both its train and eval factor.
        comm: the `Collectives` the [G, E] counts table is all-gathered over (same workers as the group).
        group: the EP process group; None uses DeepSpeed's own, made by `set_deepspeed_parallelism()`
            over the whole world.

    Attributes: `moe` (the DeepSpeed `MoE` module), `world`, `rank`, `num_experts`, `local`
    (experts per worker), `first_expert` (global id of local expert 0), `drop_tokens`,
    `capacity_factor`, `tokens` and `dropped` (this worker's routed and dropped tokens since
    `reset()`), `last_dropped_T` (bool mask of the last call's dropped tokens) and `capacity`
    (per-expert capacity DeepSpeed used in the last call; it pads every expert to it).
    """

    def __init__(self, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor, num_experts: int, act: nn.Module,
                 drop_tokens: bool, capacity_factor: float, comm: Collectives, group=None, top_k: int = 1):
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if num_experts % world:
            raise ValueError(f"DeepSpeed-MoE needs the {num_experts} experts divisible by the {world} workers "
                             f"(expert parallelism places E/world whole experts on each)")
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedDispatch needs torch.distributed initialised, even for one worker")
        if comm.world != world:
            raise ValueError(f"the counts Collectives spans {comm.world} workers but the EP group {world}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity factor {capacity_factor} must be positive")
        if top_k not in (1, 2):
            raise ValueError(f"DeepSpeed-MoE's gates are top-1 and top-2, not top-{top_k}")
        if w_in_EDH.dim() == 3:
            w_in_EDH, w_out_EFD = w_in_EDH[None], w_out_EFD[None]
        G, L, D, H = w_in_EDH.shape
        F_ = w_out_EFD.shape[2]
        gated = H == 2 * F_
        if L != num_experts // world or w_out_EFD.shape != (G, L, F_, D) or H not in (F_, 2 * F_):
            raise ValueError(f"expected this worker's {num_experts // world} experts as [E_local, d_model, d_ff or 2 d_ff] and "
                             f"[E_local, d_ff, d_model] (or [G, E_local, ...] column slices), got {tuple(w_in_EDH.shape)} and "
                             f"{tuple(w_out_EFD.shape)}")

        self.world, self.rank, self.top_k = world, dist.get_rank(group), top_k
        self.num_experts, self.local = num_experts, L
        self.first_expert = self.rank * L
        self.drop_tokens, self.capacity_factor = bool(drop_tokens), float(capacity_factor)
        self.comm, self.group = comm, group
        self.capacity: int | None = None
        self.last_dropped_T = torch.zeros(0, dtype=torch.bool)
        self._logits_TE: torch.Tensor | None = None

        init_deepspeed_groups(dist.get_backend(group))
        from deepspeed.moe.layer import MoE
        from deepspeed.moe.sharded_moe import top1gating, top2gating

        with torch.device("meta"):  # placeholders only: the weights below are views, the gate's wg unused
            moe = MoE(D, expert=DenseActDense(D, F_, act, slices=G, gated=gated), num_experts=num_experts, ep_size=world, k=top_k,
                      capacity_factor=self.capacity_factor, eval_capacity_factor=self.capacity_factor,
                      min_capacity=0, drop_tokens=self.drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
        for j, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            for s, part in enumerate(expert.slices()):
                w_in_DH = w_in_EDH[s, j]
                part.wi.weight = nn.Parameter(w_in_DH[:, F_:].T if gated else w_in_DH.T, requires_grad=False)
                if gated:
                    part.gate.weight = nn.Parameter(w_in_DH[:, :F_].T, requires_grad=False)
                part.wo.weight = nn.Parameter(w_out_EFD[s, j].T, requires_grad=False)
        moe.eval().requires_grad_(False)
        if group is None:
            with _stdout_to_logger(True):
                moe.set_deepspeed_parallelism()  # DeepSpeed's EP group over the world; collective
        else:
            moe.deepspeed_moe._set_ep_group(group)  # what set_deepspeed_parallelism does with its own group
        ep_group = moe.deepspeed_moe.ep_group
        if ep_group is None or dist.get_world_size(ep_group) != world:
            raise RuntimeError("DeepSpeed's expert-parallel group was not set to the EP workers")
        self.moe = moe

        gate = moe.deepspeed_moe.gate
        gate_signature = inspect.signature(type(gate).forward)
        gating = top1gating if top_k == 1 else top2gating
        gating_params = set(inspect.signature(gating).parameters)

        def forced_gate_forward(*args, **kwargs):
            call = gate_signature.bind(gate, *args, **kwargs)
            call.apply_defaults()
            given = call.arguments
            options = dict(logits=self._logits_TE.to(given["input"].device),
                           capacity_factor=gate.capacity_factor if gate.training else gate.eval_capacity_factor,
                           min_capacity=gate.min_capacity, used_token=given.get("used_token"),
                           noisy_gate_policy=None, drop_tokens=gate.drop_tokens, use_rts=gate.use_rts,
                           ep_group=gate.ep_group, sparse_routes=given.get("sparse_routes", False),
                           use_tutel=given.get("use_tutel", False), top2_2nd_expert_sampling=False)
            out = gating(**{k: v for k, v in options.items() if k in gating_params})
            self._record_gate(out)
            return out

        gate.forward = forced_gate_forward  # this instance only

    def _record_gate(self, out) -> None:
        """Kept (token, expert) pairs from the gate's output: a kept pair has a non-zero combine weight."""
        if len(out) == 4:  # (l_aux, combine_weights_TEC, dispatch_mask_TEC, exp_counts)
            combine_TEC = out[1]
            kept_T = combine_TEC.reshape(combine_TEC.shape[0], -1).ne(0).sum(1)
            self.capacity = int(combine_TEC.shape[-1])
        else:  # sparse routes: (l_aux, capacity, E, indices_KS, locations_KS, gates_KS, exp_counts)
            gates_KS = out[5]
            kept_T = gates_KS.reshape(gates_KS.shape[0], -1).ne(0).sum(0)
            self.capacity = int(out[1])
        self.last_dropped_T = kept_T < self.top_k  # a token that lost at least one of its experts
        self.last_dropped_pairs = int(self.top_k * kept_T.numel() - kept_T.sum())

    def _check_capacities(self, counts_GE: torch.Tensor) -> None:
        """Raise (on every rank alike: they all hold the same table) where DeepSpeed would hang."""
        rows_G = counts_GE.sum(1)
        if self.drop_tokens and bool((rows_G != rows_G[0]).any()):
            raise ValueError(f"DeepSpeed with token dropping needs the same number of tokens on every worker "
                             f"(its capacity ceil(T/E*cf) must match), got {rows_G.tolist()}")
        if not self.drop_tokens and int(counts_GE.max()) > int(rows_G.min()):
            raise ValueError(f"dropless DeepSpeed caps each worker's capacity at its own token count: the busiest "
                             f"expert has {int(counts_GE.max())} tokens from one worker but a worker has only "
                             f"{int(rows_G.min())}; give every worker the same number of tokens")

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor):
        if ids_TK.shape[1] != self.top_k:
            raise ValueError(f"this DeepSpeedDispatch forces top-{self.top_k} routing, not top-{ids_TK.shape[1]}")
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
        counts_GE = self.comm.all_gather_counts(counts_E)
        self._check_capacities(counts_GE)
        T = x_TD.shape[0]
        if int(counts_GE.sum()) == 0:  # every worker is empty: nothing for DeepSpeed to do
            self.last_dropped_T = torch.zeros(0, dtype=torch.bool, device=x_TD.device)
            return torch.zeros_like(x_TD), counts_GE
        logits_TE = torch.full((T, self.num_experts), _NOT_CHOSEN, dtype=torch.float32, device=x_TD.device)
        if self.top_k == 1:
            logits_TE.scatter_(1, ids_TK, 0.0)  # softmax exactly 1.0: the unscaled expert output
        else:
            logits_TE.scatter_(1, ids_TK, weights_TK.float().clamp_min(1e-30).log())  # DeepSpeed renormalises the pair
        self._logits_TE = logits_TE
        try:
            with torch.no_grad():
                y_TD, _, _ = self.moe(x_TD)
        finally:
            self._logits_TE = None
        self.count(T * self.top_k, self.last_dropped_pairs)
        return y_TD * weights_TK.sum(1, keepdim=True).to(y_TD.dtype), counts_GE


__all__ = ["EXTENSIONS_DIR", "DeepSpeedDispatch", "DenseActDense", "deepspeed_capacity", "deepspeed_version",
           "init_deepspeed_groups"]
