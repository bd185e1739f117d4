"""One worker of `moeshard run`: load its rank file, encode its lines step by step, hand rows to rank 0.

Started by torch.distributed's elastic launcher (launch.py), one process per rank. The job it
receives is a few paths and scalars: each worker reads and tokenizes its own share of the
input (feed.py). All ranks walk the same schedule in lockstep; after each step the pooled rows
are gathered on rank 0, whose writer thread puts them in place in the output (outputs.py).
"""

from __future__ import annotations

import functools
import os
import time
from array import array
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from moeshard_cli.errors import UserError
from moeshard_cli.launch import release_free_memory, worker_process_group
from moeshard_cli.shard.manifest import MANIFEST, read_shard_set
from moeshard_cli.model import sharded_model
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.layer import token_ids_for
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.run.feed import PlannedWindow, WindowFeed
from moeshard_cli.run.outputs import Position
from moeshard_cli.run.inputs import SHOWN
from moeshard_cli.run.job import RunJob
from moeshard_cli.run.outputs import RowWriter
from moeshard_cli.run.schedule import spread, step_tokens
from moeshard_cli.ui import count_of


def encode(job: RunJob):
    """`moeshard run`'s worker: one job in a process group of its own."""
    with worker_process_group(job.options.device, job.options.timeout) as (rank, world, device):
        return EncodeSession(rank, world, device, job.options.timeout).encode(job)


class EncodeSession:
    """A worker's loaded model and side group, kept across the jobs it encodes: one for `moeshard run`,
    many for a pool (run/pool.py). A job for another shard set, expert backend or attention reloads;
    the router, being stateless (moe/routing.py), is swapped in place."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float):
        self.rank, self.world, self.device = rank, world, device
        self.side = dist.new_group(backend="gloo", timeout=_timeout(timeout)) if world > 1 else None
        self.key, self.sharded, self.timer = None, None, None

    def load(self, shards: str, backend: str, attention: str, router: RouterSpec) -> None:
        manifest = (Path(shards) / MANIFEST).stat()  # a set re-sharded in place (--force) is another set
        key = (str(Path(shards).resolve()), manifest.st_mtime_ns, manifest.st_ino, backend, attention)
        if key != self.key:
            self.key, self.sharded = None, None  # the old model's memory goes before the new one comes
            release_free_memory()
            self.timer = SectionTimer(self.device)
            self.sharded = sharded_model(read_shard_set(Path(shards)), self.rank, self.device, backend, router,
                                         Collectives(timer=self.timer), self.timer, attention)
            self.key = key
        self.timer.reset()
        for mlp in self.sharded.mlps.values():
            mlp.spec = router
            mlp.load.reset()

    def encode(self, job: RunJob) -> dict | None:
        return _Encoder(job, self).run()


class _Encoder:
    def __init__(self, job: RunJob, session: EncodeSession):
        self.job, self.session = job, session
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.start, self.lines_done = self._agree_on_start()

    def _agree_on_start(self) -> tuple[Position, int]:
        """Rank 0's node knows where the output stands; every rank checks it runs the same job.
        Every rank sees every rank's fingerprint, so all nodes stop at once with the same reason
        (a node stopping alone left node 0 waiting out --timeout)."""
        job = self.job
        if self.world == 1:
            return job.start, job.lines_done
        everyone = [None] * self.world
        dist.all_gather_object(everyone, [job.fingerprint, job.start, job.lines_done])
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        differ = sorted({rank // per_node for rank, (fingerprint, _, _) in enumerate(everyone) if fingerprint != everyone[0][0]})
        if differ:
            raise UserError(f"the input file, shard set or options of node {', '.join(map(str, differ))} differ from node 0's",
                            "run the same command, with the same input and shard set, on every node")
        return everyone[0][1], everyone[0][2]

    def run(self) -> dict | None:
        job, rank, world, session = self.job, self.rank, self.world, self.session
        opts = job.options
        feed = WindowFeed(job.input, _tokenizer(job.shards), opts.max_length, opts.window, opts.batch_size,
                          self.start, rank, world, session.side)
        try:  # the model loads while the feed tokenizes the first window
            session.load(job.shards, opts.expert_backend, opts.attention, opts.router_spec)
            self.sharded, timer = session.sharded, session.timer
            writer = RowWriter(job.layout, Path(job.journal)) if rank == 0 else None
            try:
                stats = self._loop(feed, writer, timer)
            finally:
                if writer is not None:
                    writer.close()
        finally:
            feed.close()
        return self._report(stats, self.sharded.mlps, self.sharded.backend, timer)

    @torch.inference_mode()
    def _loop(self, feed: WindowFeed, writer: RowWriter | None, timer) -> dict:
        job, rank = self.job, self.rank
        forward_s, spreads = array("f"), array("f")
        stats = {"tokens": 0, "padded": 0, "session_tokens": 0, "session_lines": 0, "truncated": 0, "truncated_lines": [],
                 "token_end": self.start.token}
        progress = job.options.progress.tracker("encoding", job.lines, self.lines_done, count_of("lines")) if rank == 0 else None
        started = time.perf_counter()
        try:
            for pw in feed:
                release_free_memory()  # once a window: what the last one freed must not pile up
                first = self.start.step if pw.first_line == self.start.line else 0
                stats["truncated"] += pw.truncated
                shown = stats["truncated_lines"]  # the first few, counted from 1, for the warning
                shown += [pw.first_line + i + 1 for i in sorted(pw.truncated_at)][:SHOWN - len(shown)]
                stats["token_end"] = pw.token_base + pw.tokens
                if writer is not None and first == 0:
                    writer.window(_window_record(pw), _line_offsets(pw) if job.options.pooling == "none" else None)
                prefix = np.concatenate([[0], np.cumsum(pw.lengths)]).astype(np.int64)
                for s in range(first, len(pw.steps)):
                    if s >= len(pw.steps) // 4:
                        feed.want(pw.index + 1)
                    step = pw.steps[s]
                    tokens_G = step_tokens(step, pw.lengths)
                    t0 = time.perf_counter()
                    rows = self._encode(pw, step[rank], stats)
                    forward_s.append(time.perf_counter() - t0)
                    gathered = self._gather(rows, tokens_G if job.options.pooling == "none" else [len(b) for b in step])
                    if writer is not None:
                        writer.rows({"window": pw.index, "step": s, "lines": sum(len(b) for b in step)},
                                    self._places(pw, step, prefix, gathered))
                    spreads.append(spread(tokens_G))
                    stats["session_tokens"] += sum(tokens_G)
                    stats["session_lines"] += sum(len(b) for b in step)
                    if progress:
                        rate = stats["session_tokens"] / max(time.perf_counter() - started, 1e-9)
                        progress.advance(sum(len(b) for b in step), f"{rate:,.0f} tok/s")
        finally:
            if progress:
                progress.close()
        stats["loop_s"] = time.perf_counter() - started
        stats["forward_s"], stats["spreads"] = forward_s, spreads
        return stats

    def _encode(self, pw: PlannedWindow, mine: list[int], stats: dict) -> torch.Tensor:
        """This rank's batch through the model; its float32 rows on the device: one per line
        (pooled, or the line's score), or every real token's (--pooling none)."""
        device, pad_id = self.device, self.sharded.pad_id
        if mine:
            rows = [pw.ids[i] for i in mine]
            lengths = torch.tensor([len(r) for r in rows])
            ids = pad_sequence(rows, batch_first=True, padding_value=pad_id).long()
            if ids.shape[1] == 0:  # every line empty, and a tokenizer without end-of-sequence token
                ids = torch.full((len(rows), 1), pad_id)
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            gid = token_ids_for([pw.first_line + i for i in mine], ids.shape[1])
            stats["tokens"] += int(lengths.sum())
            stats["padded"] += ids.numel()
        else:  # no line left for this rank in this step: it still joins every collective, on padding
            ids, mask, gid = torch.full((1, 1), pad_id), torch.zeros((1, 1), dtype=torch.long), torch.zeros((1, 1), dtype=torch.long)
            lengths = torch.zeros(0, dtype=torch.long)
        ids, mask, gid = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), gid.to(device, non_blocking=True)
        self.sharded.ctx.set_batch(mask, gid)
        hidden_BSD = self.sharded.hidden_states(ids, mask)
        pooling, lengths = self.job.options.pooling, lengths.to(device)
        if pooling == "score":
            model = self.sharded.model
            return score_lines(functools.partial(self.sharded.family.logits, model), model.config.vocab_size, hidden_BSD[: len(mine)],
                               ids[: len(mine)], lengths)
        if pooling == "none":
            rows_ND = hidden_BSD.float()[mask.bool()]
        elif pooling == "last":
            rows_ND = hidden_BSD[torch.arange(len(mine), device=device), (lengths - 1).clamp_min(0)].float()
            rows_ND = rows_ND * (lengths > 0)[:, None]  # an empty line (no token at all) is a zero row, as under mean
        else:
            weights_BS1 = mask[:, :, None].float()
            rows_ND = ((hidden_BSD.float() * weights_BS1).sum(1) / weights_BS1.sum(1).clamp_min(1.0))[: len(mine)]
        return F.normalize(rows_ND, dim=-1) if self.job.options.normalize else rows_ND

    def _gather(self, rows_ND: torch.Tensor, sizes_G: list[int]) -> np.ndarray | None:
        """Every rank's rows on rank 0, in rank order, with one device-to-host copy."""
        if self.world == 1:
            return rows_ND.cpu().numpy()
        pad = max(sizes_G)
        send = rows_ND.new_zeros(pad, rows_ND.shape[1])
        send[: rows_ND.shape[0]] = rows_ND
        out = [torch.empty_like(send) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(send, out, dst=0)
        if self.rank != 0:
            return None
        host = torch.stack(out).cpu().numpy()
        return np.concatenate([host[g, :n] for g, n in enumerate(sizes_G)])

    def _places(self, pw: PlannedWindow, step, prefix: np.ndarray, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(byte offset, rows) for every line of the step, in the order `_gather` stacked them."""
        layout, places, at = self.job.layout, [], 0
        for batch in step:
            for i in batch:
                line = pw.first_line + i
                if self.job.options.pooling != "none":
                    places.append((layout.embedding_at(line), layout.encode(line, rows[at:at + 1])))
                    at += 1
                else:
                    n = pw.lengths[i]
                    places.append((layout.token_at(pw.token_base + int(prefix[i])), rows[at:at + n]))
                    at += n
        return places

    def _report(self, stats: dict, mlps: dict, backend: str, timer) -> dict | None:
        mine = {"rank": self.rank, "pid": os.getpid(), "forward_s": list(stats["forward_s"]), "timer": timer.flush(),
                "tokens": stats["tokens"], "padded": stats["padded"]}
        gathered = [None] * self.world if self.rank == 0 else None
        if self.world > 1:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if self.rank != 0:
            return None
        loads = [{"layer": i, "tokens_E": m.load.tokens_E.tolist(), "tokens_G": m.load.tokens_G.tolist()}
                 for i, m in sorted(mlps.items()) if m.load.tokens_E is not None]
        return {"ranks": gathered, "layers": loads, "backend": backend, "loop_s": stats["loop_s"],
                "session_tokens": stats["session_tokens"], "session_lines": stats["session_lines"],
                "truncated": stats["truncated"], "truncated_lines": stats["truncated_lines"], "token_end": stats["token_end"], "spreads": list(stats["spreads"])}


LOGITS_BYTES = 1 << 28  # the LM head's logits are computed in chunks of at most this many bytes


def score_lines(logits_fn, vocab: int, hidden_BSD: torch.Tensor, ids_BS: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """[B, 3] float32: per line its token count, the sum of log p(token | the tokens before it)
    over every token after the first, and the mean negative log-likelihood (NaN below 2 tokens).
    Only positions that predict a real token go through the LM head, in chunks, so the
    [tokens, vocabulary] logits never exist whole. `logits_fn`: hidden [N, D] -> the family's logits [N, vocab]."""
    B, S, _ = hidden_BSD.shape
    predicts_BS = torch.arange(S, device=ids_BS.device)[None, :] < (lengths_B - 1)[:, None]
    h_PD = hidden_BSD[predicts_BS]
    target_P = ids_BS[:, 1:][predicts_BS[:, :-1]] if S > 1 else ids_BS.new_zeros(0)
    line_P = torch.arange(B, device=ids_BS.device)[:, None].expand(B, S)[predicts_BS]
    chunk = max(1, LOGITS_BYTES // (4 * vocab))
    logprob_P = torch.cat([torch.log_softmax(logits_fn(h_PD[i:i + chunk]).float(), -1).gather(1, target_P[i:i + chunk, None]).squeeze(1)
                           for i in range(0, h_PD.shape[0], chunk)]) if h_PD.shape[0] else h_PD.new_zeros(0, dtype=torch.float32)
    logprob_B = torch.zeros(B, dtype=torch.float32, device=ids_BS.device).index_add_(0, line_P, logprob_P)
    scored_B = (lengths_B - 1).clamp_min(0).float()
    mean_nll_B = torch.where(scored_B > 0, -logprob_B / scored_B.clamp_min(1.0), torch.full_like(logprob_B, float("nan")))
    return torch.stack([lengths_B.float(), logprob_B, mean_nll_B], 1)


def _window_record(pw: PlannedWindow) -> dict:
    return {"window": pw.index, "line": pw.first_line, "lines": len(pw.lengths), "byte": pw.byte_start, "byte_end": pw.byte_end,
            "token": pw.token_base, "tokens": pw.tokens, "truncated": pw.truncated, "steps": len(pw.steps)}


def _line_offsets(pw: PlannedWindow) -> np.ndarray:
    """Global token offset of every line of the window (--pooling none's offsets table)."""
    return (pw.token_base + np.concatenate([[0], np.cumsum(pw.lengths)[:-1]])).astype("<i8")


def _tokenizer(shards: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(shards)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer saved in {shards} ({type(exc).__name__}: {str(exc).strip()[:120]})",
                        "re-shard with this version of moeshard, which stores it as tokenizer.json") from exc


def _timeout(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)

