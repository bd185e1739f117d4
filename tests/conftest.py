"""Shared test helpers: tiny Switch checkpoints built locally, and two ways to run the CLI.

- `tiny_checkpoint(path, fmt, arch)` writes a random tiny Switch model in `save_pretrained`
  layout (safetensors or pytorch_model.bin, single or sharded) plus ByT5 tokenizer files.
- `checkpoints` (session fixture) builds each (fmt, arch) once and hands out the directory;
  copy it before damaging it.
- `invoke(args)` runs `moeshard` in this process (fast); `run_cli(args)` runs
  `python -m moeshard_cli` in a subprocess (the real exit code and stderr, honours env vars).

No test touches the network: HF_HUB_OFFLINE=1 unless a test sets its own environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
ARCHS = ("conditional", "encoder")


def tiny_config(**overrides):
    """The built-in `tiny-switch` config (d_ff=130: divides by neither 3 nor 4), optionally changed."""
    from moeshard_cli.shard.builtin import builtin_config

    _, config = builtin_config("tiny-switch")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(arch: str = "conditional", seed: int = 0, config=None):
    """A random Switch model; every tensor (layer norms included) is redrawn so all values are distinct."""
    from transformers import SwitchTransformersEncoderModel, SwitchTransformersForConditionalGeneration

    cls = {"conditional": SwitchTransformersForConditionalGeneration, "encoder": SwitchTransformersEncoderModel}[arch]
    torch.manual_seed(seed)
    model = cls(config or tiny_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


def save_checkpoint(model, path: Path, fmt: str = "safetensors", tokenizer: bool = True) -> Path:
    """Write `model` into `path` the way `save_pretrained` lays it out, in one of FORMATS."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if fmt in ("safetensors", "safetensors-sharded"):
        model.save_pretrained(str(path), max_shard_size="200KB" if fmt.endswith("sharded") else "50GB")
    elif fmt in ("bin", "bin-sharded"):
        # transformers 5 only writes safetensors: lay out pytorch_model*.bin as transformers 4 did.
        model.config.save_pretrained(str(path))
        save_bin(model.state_dict(), path, shards=3 if fmt.endswith("sharded") else 1)
    else:
        raise ValueError(f"unknown checkpoint format {fmt}")
    if tokenizer:
        from transformers import ByT5Tokenizer

        ByT5Tokenizer().save_pretrained(str(path))
    return path


def save_bin(state: dict, path: Path, shards: int = 1) -> None:
    """`pytorch_model.bin`, or `pytorch_model-0000i-of-0000n.bin` files plus their index."""
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    names = list(state)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].clone() for k in names[i::shards]}
        torch.save(part, path / file)
        for key, tensor in part.items():
            weight_map[key] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def tiny_checkpoint(path: Path, fmt: str = "safetensors", arch: str = "conditional", seed: int = 0):
    """Build and save a tiny random Switch checkpoint; returns (directory, state dict of the model)."""
    model = tiny_model(arch, seed)
    save_checkpoint(model, path, fmt)
    return Path(path), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`checkpoints(fmt="safetensors", arch="conditional") -> (dir, state_dict)`, built once per session.

    The directories are shared: copy one (shutil.copytree) before modifying it.
    """
    cache: dict = {}

    def get(fmt: str = "safetensors", arch: str = "conditional"):
        if (fmt, arch) not in cache:
            cache[fmt, arch] = tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{fmt}-{arch}"), fmt, arch)
        return cache[fmt, arch]

    return get


def write_lines(path: Path, texts: list[str]) -> Path:
    """A corpus file: one text per line, UTF-8, each line ending in a newline."""
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def invoke(args, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run `moeshard ARGS` in this process through the real entry point; returns (exit code, stdout, stderr)."""
    from moeshard_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["moeshard", *map(str, args)]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(old_cwd)
    return code, out.getvalue(), err.getvalue()


def run_cli(args, env: dict | None = None, cwd: Path | None = None, timeout: float = 300) -> tuple[int, str, str]:
    """Run `python -m moeshard_cli ARGS` in a subprocess; `env` entries override os.environ (None removes one)."""
    proc = subprocess.run([sys.executable, "-m", "moeshard_cli", *map(str, args)], capture_output=True, text=True,
                          env=_child_env(env), cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def cli_popen(args, env: dict | None = None, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
    """Start `python -m moeshard_cli ARGS` without waiting (for tests that interrupt it)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "moeshard_cli", *map(str, args)], env=_child_env(env), cwd=cwd,
                            text=True, **kwargs)


def _child_env(env: dict | None) -> dict:
    merged = {**os.environ, "COLUMNS": "200", **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def read_rank_files(out: Path) -> list[dict[str, torch.Tensor]]:
    """Every tensor of every rank file in a shard set directory, in rank order."""
    from safetensors import safe_open

    ranks = []
    for file in sorted(Path(out).glob("rank-*-of-*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            ranks.append({key: handle.get_tensor(key) for key in handle.keys()})
    return ranks
