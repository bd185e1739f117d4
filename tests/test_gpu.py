"""On one CUDA device (world size 1): `moeshard run` against transformers, the expert backends
against each other, and `moeshard bench`. Skipped where CUDA is absent: `python -m pytest -m gpu`.

- fp32 embeddings within 1e-4 of transformers' dropless encoder on the same GPU;
- bf16 and fp16 shard sets: moeshard's embeddings must be about as close to fp32 transformers as
  transformers' own model in that dtype is (per-line cosine, mean and min); the two are printed
  on lines starting with "gpu figure |" (benchmarks/gpu_check.sh collects them);
- grouped_mm against loop in fp32 and bf16; megablocks' grouped GEMM where it is importable;
- `moeshard bench` on CUDA with one worker: every cell has samples, dropless systems agree.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.activations import ACT2FN

from conftest import REPO, cli_popen, invoke, run_cli, write_lines
from moeshard_cli.moe.experts import GroupedExperts, megablocks_available, stack_experts
from moeshard_cli.reference import reference_model
from moeshard_cli.shard.manifest import read_shard_set

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (see docs/gpu.md)")]
needs_megablocks = pytest.mark.skipif(not megablocks_available(), reason="megablocks' grouped GEMM (grouped_gemm) is not importable here: see docs/gpu.md")

TOL = 1e-4
MAX_LENGTH = 64
BATCH = 4  # lines per step: batches are padded
DTYPES = ("float32", "bfloat16", "float16")
# the sample corpus plus an empty line, a one-byte line and one cut to MAX_LENGTH tokens
CORPUS = (REPO / "moeshard_cli" / "data" / "sample.txt").read_text().splitlines() + ["", "x", "a long line, " * 20]


@dataclass
class Run:
    code: int
    log: str
    output: Path
    json: Path

    def embeddings(self) -> torch.Tensor:
        assert self.code == 0, f"exit {self.code}\n{self.log}"
        return load_file(str(self.output))["embeddings"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_lines(tmp_path_factory.mktemp("corpus") / "corpus.txt", CORPUS)


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict[str, Path]:
    """A one-rank tiny-switch shard set per dtype (the built-in weights, cast)."""
    out = tmp_path_factory.mktemp("shards")
    for dtype in DTYPES:
        code, _, err = invoke(["shard", "tiny-switch", "--gpus", 1, "--dtype", dtype, "--out", out / dtype])
        assert code == 0, err
    return {dtype: out / dtype for dtype in DTYPES}


@pytest.fixture(scope="module")
def runs(shard_sets, corpus, tmp_path_factory) -> dict[str, Run]:
    """`moeshard run --device cuda` per dtype (and with megablocks on bf16 where it is importable), started together."""
    out = tmp_path_factory.mktemp("runs")
    jobs = {dtype: (shard_sets[dtype], []) for dtype in DTYPES}
    if megablocks_available():
        jobs["megablocks"] = (shard_sets["bfloat16"], ["--expert-backend", "megablocks"])
    started = {}
    for name, (shards, extra) in jobs.items():
        output, json_path, log = out / f"{name}.safetensors", out / f"{name}.json", open(out / f"{name}.log", "w")
        args = ["run", "--shards", shards, "--input", corpus, "--output", output, "--json", json_path, "--device", "cuda",
                "--batch-size", BATCH, "--max-length", MAX_LENGTH, *extra]
        started[name] = (cli_popen(args, stdout=log, stderr=subprocess.STDOUT), log, output, json_path)
    results = {}
    for name, (proc, log, output, json_path) in started.items():
        try:
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        results[name] = Run(code, Path(log.name).read_text(), output, json_path)
    return results


@pytest.fixture(scope="module")
def token_ids(shard_sets) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shard_sets["float32"]))
    return tokenizer(CORPUS, truncation=True, max_length=MAX_LENGTH)["input_ids"]


@torch.inference_mode()
def transformers_embeddings(shards: Path, token_ids: list[list[int]]) -> torch.Tensor:
    """transformers' dropless encoder on CUDA, in the shard set's dtype, one line at a time (no padding): [lines, d_model] fp32."""
    shard_set = read_shard_set(shards)
    model = reference_model(shard_set).cuda()
    rows = [model(input_ids=torch.tensor([row], device="cuda")).last_hidden_state[0].float().mean(0) for row in token_ids]
    return torch.stack(rows).cpu()


@pytest.fixture(scope="module")
def transformers_rows(shard_sets, token_ids) -> dict[str, torch.Tensor]:
    return {dtype: transformers_embeddings(shard_sets[dtype], token_ids) for dtype in DTYPES}


def cosines(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a_ND.double(), b_ND.double(), dim=1)


# ---------------------------------------------------------------- moeshard run on CUDA


def test_fp32_run_on_cuda_matches_transformers(runs, transformers_rows, token_ids):
    run = runs["float32"]
    got = run.embeddings()
    assert got.dtype == torch.float32 and got.shape == (len(CORPUS), 64)
    error = (got - transformers_rows["float32"]).abs().max().item()
    print(f"\ngpu figure | run --device cuda, fp32 tiny-switch against transformers | max abs error {error:.2e}")
    assert error <= TOL, f"max abs error {error:.2e}"
    fig = json.loads(run.json.read_text())
    assert (fig["device"], fig["world_size"], fig["backend"]) == ("cuda", 1, "grouped_mm")
    assert fig["lines"] == len(CORPUS) and fig["tokens"] == sum(len(row) for row in token_ids)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_run_is_as_close_to_fp32_as_transformers_own(runs, transformers_rows, dtype):
    truth = transformers_rows["float32"]
    ours, theirs = cosines(runs[dtype].embeddings(), truth), cosines(transformers_rows[dtype], truth)
    print(f"\ngpu figure | {dtype} tiny-switch, per-line cosine to fp32 transformers, mean / min | "
          f"moeshard {ours.mean():.6f} / {ours.min():.6f} | transformers {dtype} {theirs.mean():.6f} / {theirs.min():.6f}")
    assert ours.mean() >= theirs.mean() - 1e-3
    assert ours.min() >= theirs.min() - 1e-2


@needs_megablocks
def test_megablocks_run_matches_the_grouped_mm_run(runs, transformers_rows):
    truth = transformers_rows["float32"]
    mega, grouped = cosines(runs["megablocks"].embeddings(), truth), cosines(runs["bfloat16"].embeddings(), truth)
    diff = (runs["megablocks"].embeddings() - runs["bfloat16"].embeddings()).abs().max().item()
    print(f"\ngpu figure | bfloat16 run, megablocks against grouped_mm | max abs difference {diff:.2e}, "
          f"cosine to fp32 mean / min {mega.mean():.6f} / {mega.min():.6f} (grouped_mm {grouped.mean():.6f} / {grouped.min():.6f})")
    assert mega.mean() >= grouped.mean() - 1e-3 and mega.min() >= grouped.min() - 1e-2
    assert json.loads(runs["megablocks"].json.read_text())["backend"] == "megablocks"


# ---------------------------------------------------------------- expert backends on CUDA

D, WIDTH = 256, 130  # WIDTH divides by no 16-byte step: padded columns in both dtypes
COUNTS = [37, 0, 500, 1, 0, 64, 3, 0]


def random_experts(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    wi = [(torch.randn(WIDTH, D, generator=gen) / D**0.5).to(dtype) for _ in COUNTS]  # nn.Linear layout [F, D]
    wo = [(torch.randn(D, WIDTH, generator=gen) / WIDTH**0.5).to(dtype) for _ in COUNTS]
    x_ND = torch.randn(sum(COUNTS), D, generator=gen).to(dtype)
    return wi, wo, x_ND


def fp32_reference(wi, wo, x_ND, act) -> torch.Tensor:
    """Each expert on its rows, in fp32 on the host, from the same (possibly rounded) weights and inputs."""
    out, start = [], 0
    for e, n in enumerate(COUNTS):
        out.append(act(x_ND[start:start + n].float() @ wi[e].float().T) @ wo[e].float().T)
        start += n
    return torch.cat(out)


def run_backend(backend: str, wi, wo, x_ND, act) -> torch.Tensor:
    w_in_EDH, w_out_EFD = stack_experts([[w] for w in wi], wo)
    experts = GroupedExperts(w_in_EDH.cuda(), w_out_EFD.cuda(), act, backend)
    return experts(x_ND.cuda(), torch.tensor(COUNTS)).float().cpu()


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_and_loop_agree_on_cuda(dtype):
    act = ACT2FN["gelu_new"]
    wi, wo, x_ND = random_experts(dtype)
    expected = fp32_reference(wi, wo, x_ND, act)
    grouped, loop = run_backend("grouped_mm", wi, wo, x_ND, act), run_backend("loop", wi, wo, x_ND, act)
    if dtype == torch.float32:
        torch.testing.assert_close(grouped, expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(loop, expected, atol=TOL, rtol=TOL)
    else:  # the hidden activations are rounded to bf16 between the two matmuls
        assert relative_error(grouped, expected) < 1e-2 and relative_error(loop, expected) < 1e-2
        assert relative_error(grouped, loop) < 1e-2


@needs_megablocks
def test_megablocks_matches_grouped_mm_on_cuda():
    act = ACT2FN["gelu_new"]
    wi, wo, x_ND = random_experts(torch.bfloat16, seed=1)
    mega, grouped = run_backend("megablocks", wi, wo, x_ND, act), run_backend("grouped_mm", wi, wo, x_ND, act)
    assert relative_error(mega, fp32_reference(wi, wo, x_ND, act)) < 1e-2
    assert relative_error(mega, grouped) < 1e-2


# ---------------------------------------------------------------- moeshard bench on CUDA


def test_bench_on_one_gpu(tmp_path):
    """deepspeed may be missing on a GPU machine: only the systems the project runs itself."""
    path = tmp_path / "bench.json"
    code, _, err = run_cli(["bench", "--model", "tiny-switch", "--gpus", 1, "--device", "cuda", "--batch-sizes", 2, "--seq-len", 16,
                            "--iters", 3, "--warmup", 1, "--skew", "0,0.6", "--systems", "moeshard,ep,hf", "--json", path], timeout=300)
    assert code == 0, err
    result = json.loads(path.read_text())
    assert result["config"]["device"] == "cuda" and result["config"]["workers"] == 1 and "gpu" in result["machine"]
    cells = result["cells"]
    assert sorted(c["system"] for c in cells) == sorted(["moeshard", "ep", "hf"] * 2)
    for c in cells:
        assert c["skipped"] is None and len(c["samples_ms"]) == 3 and all(s > 0 for s in c["samples_ms"]), c
        if c["system"] != "moeshard":
            assert c["max_abs_diff_vs_moeshard"] <= TOL and c["dropped_pct"] == 0.0, c
