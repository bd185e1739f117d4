"""`moeshard shard`: round trips from every source format, the manifest, refusals and atomicity."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ARCHS, FORMATS, cli_popen, invoke, read_rank_files, run_cli, save_checkpoint, tiny_checkpoint, tiny_model
from moeshard_cli.families import families
from moeshard_cli.shard import builtin
from moeshard_cli.errors import UserError
from moeshard_cli.shard.manifest import MANIFEST, check_files, read_shard_set
from moeshard_cli.shard.plan import rank_file_name, slice_bounds
from moeshard_cli.families.switch import EXPERT_KEY
from moeshard_cli.families import families

D_FF = 130  # tiny-switch


# ---------------------------------------------------------------- helpers


def encoder_reference(state: dict) -> dict[str, torch.Tensor]:
    """What a shard set must hold, reassembled: `shared.weight` plus every encoder key but the tied embedding."""
    ref = {k: v for k, v in state.items() if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"}
    ref["shared.weight"] = state["shared.weight"] if "shared.weight" in state else state["encoder.embed_tokens.weight"]
    return ref


def builtin_reference(name: str) -> dict[str, torch.Tensor]:
    family, config = builtin.builtin_config(name)
    return {k: builtin.random_tensor(family, k, shape, config) for k, shape in family.expected_tensors(config).items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_round_trip(out: Path, reference: dict[str, torch.Tensor], world: int) -> None:
    """Reassemble the expert slices of every rank: bit-identical to the source; replicated tensors equal everywhere."""
    ranks = read_rank_files(out)
    assert len(ranks) == world
    bounds = slice_bounds(D_FF, world)
    for rank, tensors in enumerate(ranks):
        assert set(tensors) == set(reference), f"rank {rank} holds other keys than the source encoder"
    for key, source in reference.items():
        parts = [tensors[key] for tensors in ranks]
        match = EXPERT_KEY.match(key)
        if match:
            axis = 0 if match.group(3) == "wi" else 1
            assert [p.shape[axis] for p in parts] == [hi - lo for lo, hi in bounds], key
            assert same_bits(torch.cat(parts, axis), source), f"{key} does not reassemble to the source"
        else:
            for rank, part in enumerate(parts):
                assert same_bits(part, source), f"replicated {key} differs on rank {rank}"


def assert_refused(code: int, out: str, err: str, *needles: str) -> None:
    """A refusal: non-zero exit, one line on stderr naming problem and fix, no traceback."""
    assert code != 0, out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and ": " in lines[0][len("error: "):], err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in err + out


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_round_trip_builtin(tmp_path, world):
    code, out, err = invoke(["shard", "tiny-switch", "--gpus", world, "--out", tmp_path / "set"])
    assert code == 0, err
    assert_round_trip(tmp_path / "set", builtin_reference("tiny-switch"), world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_local(tmp_path, checkpoints, fmt, arch, world):
    source, state = checkpoints(fmt, arch)
    code, out, err = invoke(["shard", source, "--gpus", world, "--out", tmp_path / "set"])
    assert code == 0, err
    assert_round_trip(tmp_path / "set", encoder_reference(state), world)
    data = json.loads((tmp_path / "set" / MANIFEST).read_text())
    assert data["source"]["kind"] == "local" and data["source"]["path"] == str(source.resolve())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_trip_cast(tmp_path, checkpoints, dtype):
    source, state = checkpoints("safetensors", "conditional")
    code, _, err = invoke(["shard", source, "--gpus", 3, "--dtype", dtype, "--out", tmp_path / "set"])
    assert code == 0, err
    reference = {k: v.to(getattr(torch, dtype)) for k, v in encoder_reference(state).items()}
    assert_round_trip(tmp_path / "set", reference, 3)
    assert read_shard_set(tmp_path / "set").dtype == dtype


def make_hub_cache(home: Path, repo_id: str, checkpoint: Path, refs=("main",)) -> str:
    """huggingface_hub's cache layout under HF_HOME: hub/models--org--name/ with refs/<ref> holding the
    commit, blobs/<sha256> holding the bytes and snapshots/<commit>/<file> symlinks to the blobs."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    for folder in ("blobs", "refs", f"snapshots/{commit}"):
        (repo / folder).mkdir(parents=True)
    for file in checkpoint.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (repo / "snapshots" / commit / file.name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.mark.parametrize("fmt, revision", [("safetensors-sharded", None), ("bin", "v1")])
def test_round_trip_hub_cache_offline(tmp_path, checkpoints, fmt, revision):
    source, state = checkpoints(fmt, "conditional")
    commit = make_hub_cache(tmp_path / "hf", "moeshard-test/tiny-switch", source, refs=("main", "v1"))
    args = ["shard", "moeshard-test/tiny-switch", "--gpus", 2, "--out", tmp_path / "set"]
    args += ["--revision", revision] if revision else []
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None, "HUGGINGFACE_HUB_CACHE": None}
    code, out, err = run_cli(args, env=env)
    assert code == 0, err
    assert_round_trip(tmp_path / "set", encoder_reference(state), 2)
    data = json.loads((tmp_path / "set" / MANIFEST).read_text())
    assert data["source"]["kind"] == "hub" and data["source"]["id"] == "moeshard-test/tiny-switch"
    assert data["source"]["revision"] == revision and commit in data["source"]["path"]


# ---------------------------------------------------------------- what a shard set holds


def test_manifest_and_copied_files(tmp_path, checkpoints):
    source, _ = checkpoints("safetensors", "conditional")
    out = tmp_path / "set"
    code, stdout, err = invoke(["shard", source, "--gpus", 3, "--out", out])
    assert code == 0, err
    data = json.loads((out / MANIFEST).read_text())
    assert data["format_version"] == 1 and data["tool"] == "moeshard" and data["tool_version"]
    assert data["world_size"] == 3 and data["dtype"] == "float32" and data["d_ff"] == D_FF
    assert data["encoder_only"] is True and data["num_experts"] == 8 and data["sparse_layers"] == [1, 3]
    assert data["slices"] == [[0, 44], [44, 87], [87, 130]]
    assert data["config"]["d_ff"] == D_FF and data["config"]["model_type"] == "switch_transformers"
    assert [f["name"] for f in data["files"]] == [rank_file_name(r, 3) for r in range(3)]
    for rank, entry in enumerate(data["files"]):
        file = out / entry["name"]
        assert entry["rank"] == rank and entry["bytes"] == file.stat().st_size
        assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata()
        assert meta["moeshard_rank"] == str(rank) and meta["moeshard_world"] == "3"
        assert meta["slice"] == ",".join(map(str, data["slices"][rank]))
    assert "tokenizer_config.json" in data["tokenizer_files"]
    for name in data["tokenizer_files"]:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["d_ff"] == D_FF
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "config.json", *data["tokenizer_files"], *(f["name"] for f in data["files"])])
    check_files(read_shard_set(out), verify=True)  # what `run` checks before starting
    assert str(out) in stdout and "[44, 87)" in stdout  # the summary table


def test_default_model_and_out(tmp_path):
    """The README command: no SOURCE, no --out."""
    code, out, err = invoke(["shard", "--gpus", 3], cwd=tmp_path)
    assert code == 0, err
    target = tmp_path / "moeshard-shards" / "tiny-switch-w3"
    assert "moeshard-shards/tiny-switch-w3" in out and "44" in out
    check_files(read_shard_set(target), verify=True)
    assert_round_trip(target, builtin_reference("tiny-switch"), 3)


def test_force_overwrites_a_complete_set(tmp_path):
    out = tmp_path / "set"
    assert invoke(["shard", "--gpus", 2, "--out", out])[0] == 0
    code, _, err = invoke(["shard", "--gpus", 3, "--out", out, "--force"])
    assert code == 0, err
    assert sorted(p.name for p in out.glob("rank-*")) == [rank_file_name(r, 3) for r in range(3)]
    assert not list(out.glob(".*tmp-*"))
    assert read_shard_set(out).world_size == 3
    assert_round_trip(out, builtin_reference("tiny-switch"), 3)


# ---------------------------------------------------------------- bad input: one line, non-zero exit, nothing left


def _dense_t5(tmp: Path) -> Path:
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(str(tmp / "t5"))
    return tmp / "t5"


def _bert(tmp: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(str(tmp / "bert"))
    return tmp / "bert"


def _a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file"


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _damaged(fmt: str, damage):
    def setup(tmp: Path) -> Path:
        src, _ = tiny_checkpoint(tmp / fmt, fmt)
        damage(src)
        return src

    return setup


def _truncate(name_glob: str, keep: float):
    def damage(src: Path):
        file = sorted(src.glob(name_glob))[-1]
        data = file.read_bytes()
        file.write_bytes(data[: int(len(data) * keep)])

    return damage


def _overwrite(name: str, junk: bytes):
    return lambda src: (src / name).write_bytes(junk)


def _remove(name_glob: str):
    return lambda src: sorted(src.glob(name_glob))[1].unlink()


# id, setup(tmp) -> SOURCE, extra args, words the one line must hold (problem and fix)
BAD_SOURCES = [
    ("missing-path", lambda tmp: tmp / "no-such-dir", [], ["does not exist", "pass a checkpoint directory"]),
    ("source-is-a-file", _a_file, [], ["is a file", "checkpoint directory"]),
    ("no-config", _empty_dir, [], ["has no config.json", "save_pretrained"]),
    ("dense-t5", _dense_t5, [], ["dense t5 checkpoint with no experts", "use a checkpoint with experts"]),
    ("non-switch-bert", _bert, [], ["holds a bert model, which moeshard does not serve",
                                    "use a checkpoint of a served family: " + ", ".join(sorted(families()))]),
    ("truncated-safetensors", _damaged("safetensors", _truncate("model.safetensors", 0.6)), [],
     ["model.safetensors is truncated or corrupt", "download or copy that file again"]),
    ("truncated-safetensors-shard", _damaged("safetensors-sharded", _truncate("model-*.safetensors", 0.9)), [],
     ["is truncated or corrupt", "download or copy that file again"]),
    ("corrupt-safetensors-header", _damaged("safetensors", _overwrite("model.safetensors", b"\xff" * 4096)), [],
     ["model.safetensors is truncated or corrupt", "download or copy that file again"]),
    ("truncated-bin", _damaged("bin", _truncate("pytorch_model.bin", 0.5)), [],
     ["pytorch_model.bin is truncated or corrupt", "download or copy that file again"]),
    ("corrupt-bin", _damaged("bin", _overwrite("pytorch_model.bin", os.urandom(4096))), [],
     ["pytorch_model.bin is truncated or corrupt", "download or copy that file again"]),
    ("index-names-missing-safetensors", _damaged("safetensors-sharded", _remove("model-*.safetensors")), [],
     ["model.safetensors.index.json names missing file model-00002-of-", "download the complete checkpoint"]),
    ("index-names-missing-bin", _damaged("bin-sharded", _remove("pytorch_model-*.bin")), [],
     ["pytorch_model.bin.index.json names missing file pytorch_model-00002-of-00003.bin", "download the complete checkpoint"]),
    ("gpus-zero", lambda tmp: "tiny-switch", ["--gpus", 0], ["--gpus must be at least 1, got 0", "--gpus 2"]),
    ("gpus-negative", lambda tmp: "tiny-switch", ["--gpus", -2], ["--gpus must be at least 1, got -2", "--gpus 2"]),
    ("gpus-above-d_ff", lambda tmp: "tiny-switch", ["--gpus", D_FF + 1], [f"--gpus {D_FF + 1} is larger than d_ff={D_FF}", f"at most {D_FF} ranks"]),
]


@pytest.mark.parametrize("setup, extra, needles", [c[1:] for c in BAD_SOURCES], ids=[c[0] for c in BAD_SOURCES])
def test_bad_source_is_refused(tmp_path, setup, extra, needles):
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    source = setup(inputs)
    before = listing(inputs)
    args = ["shard", source, "--out", work / "set", *extra]
    args += [] if "--gpus" in extra else ["--gpus", 2]
    code, out, err = invoke(args, cwd=work)
    assert_refused(code, out, err, *needles)
    assert listing(work) == [], "a refused shard left files behind"
    assert listing(inputs) == before


def test_unreachable_hub_id(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None, "HUGGINGFACE_HUB_CACHE": None}
    code, out, err = run_cli(["shard", "moeshard-test/not-cached", "--gpus", 2, "--out", tmp_path / "set"], env=env, cwd=tmp_path)
    assert_refused(code, out, err, "cannot fetch moeshard-test/not-cached from the Hugging Face hub",
                   "pass a local checkpoint directory", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "set").exists() and not (tmp_path / "moeshard-shards").exists()


def test_out_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = invoke(["shard", "--gpus", 2, "--out", tmp_path / "file" / "set"], cwd=tmp_path)
    assert_refused(code, out, err, f"cannot write to --out {tmp_path / 'file' / 'set'}", "Not a directory", "choose a directory")
    assert listing(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_out_is_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = invoke(["shard", "--gpus", 2, "--out", tmp_path / "file"], cwd=tmp_path)
    assert_refused(code, out, err, "is a file", "pass a directory path for --out")
    assert listing(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_non_empty_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, stdout, err = invoke(["shard", "--gpus", 2, "--out", out, "--force"])
    assert_refused(code, stdout, err, "is a non-empty directory that is not a shard set", "notes.txt", "empty or new directory")
    assert listing(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_existing_set_needs_force(tmp_path):
    out = tmp_path / "set"
    assert invoke(["shard", "--gpus", 2, "--out", out])[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, err = invoke(["shard", "--gpus", 3, "--out", out])
    assert_refused(code, stdout, err, "already holds a complete shard set", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------- nothing half-written


class _FullDisk:
    """Stands in for StreamingSafetensorsWriter.append (its file writes): ENOSPC after `budget` bytes."""

    def __init__(self, original, budget: int):
        self.original, self.budget = original, budget

    def __call__(self, writer, data):
        self.budget -= len(memoryview(data).cast("B"))
        if self.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.original(writer, data)


@pytest.mark.parametrize("budget", [0, 1_000_000], ids=["at-header", "mid-tensors"])
@pytest.mark.parametrize("pre_existing", [False, True], ids=["new-out", "empty-out"])
def test_full_disk_mid_write_cleans_up(tmp_path, monkeypatch, pre_existing, budget):
    from moeshard_cli.shard.writer import StreamingSafetensorsWriter

    fake = _FullDisk(StreamingSafetensorsWriter.append, budget=budget)
    monkeypatch.setattr(StreamingSafetensorsWriter, "append", lambda self, data: fake(self, data))
    out = tmp_path / "set"
    if pre_existing:
        out.mkdir()
    code, stdout, err = invoke(["shard", "--gpus", 2, "--out", out])
    assert_refused(code, stdout, err, f"disk full while writing {out}", "free space")
    assert listing(tmp_path) == (["set"] if pre_existing else []), "temporary files or the new --out were left"


def test_full_disk_at_manifest_removes_finished_rank_files(tmp_path, monkeypatch):
    import moeshard_cli.shard.command as shard_mod

    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shard_mod, "write_json_atomic", full)
    code, stdout, err = invoke(["shard", "--gpus", 2, "--out", tmp_path / "set"])
    assert_refused(code, stdout, err, "disk full while writing", "free space")
    assert listing(tmp_path) == []


def _interrupt_after(monkeypatch, tensors: int) -> None:
    """Ctrl-C while the built-in model streams: the n-th generated tensor raises KeyboardInterrupt."""
    original, calls = builtin.random_tensor, iter(range(1_000_000))

    def interrupted(*args, **kwargs):
        if next(calls) == tensors:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(builtin, "random_tensor", interrupted)


def test_interrupt_cleans_up(tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 20)
    invoke(["shard", "--gpus", 2, "--out", tmp_path / "set"])
    assert listing(tmp_path) == [], "an interrupted shard left files behind"


def test_interrupt_exits_130(tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 20)
    code, _, err = invoke(["shard", "--gpus", 2, "--out", tmp_path / "set"])
    assert code == 130 and "Traceback" not in err


def test_killed_shard_leaves_nothing_run_accepts(tmp_path):
    """SIGKILL mid-write: no manifest, no rank file under its final name; `run`'s reader refuses it."""
    out = tmp_path / "set"
    proc = cli_popen(["shard", "switch-base-8", "--gpus", 2, "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, grown = time.monotonic() + 120, False
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = list(out.glob(".*.tmp-*")) if out.is_dir() else []
            if tmps and max(p.stat().st_size for p in tmps) > 32 << 20:
                grown = True
                break
            time.sleep(0.02)
        assert grown, f"no growing temporary rank file appeared (exit code {proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = [p.name for p in out.iterdir()]
    assert MANIFEST not in names and not [n for n in names if n.startswith("rank-")], names
    with pytest.raises(UserError, match="not a complete shard set"):
        read_shard_set(out)
    # the leftovers are recognised: refused without --force, cleaned up with it
    code, stdout, err = invoke(["shard", "--gpus", 2, "--out", out])
    assert_refused(code, stdout, err, "already holds an unfinished shard set", "--force")
    assert invoke(["shard", "--gpus", 2, "--out", out, "--force"])[0] == 0
    assert not list(out.glob(".*tmp-*"))
    check_files(read_shard_set(out), verify=True)


# ---------------------------------------------------------------- many ranks: one open file each


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 32


@pytest.fixture
def low_open_file_limit():
    """Lower this process's soft open-file limit below what --gpus 130 needs; restored afterwards."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < D_FF + 300:
        pytest.skip(f"hard open-file limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 40, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_one_rank_per_column_raises_the_open_file_limit(tmp_path, low_open_file_limit):
    code, _, err = invoke(["shard", "--gpus", D_FF, "--out", tmp_path / "set"])
    assert code == 0, err
    shards = read_shard_set(tmp_path / "set")
    assert shards.world_size == D_FF and all(hi - lo == 1 for lo, hi in shards.slices)
    check_files(shards)


def test_too_many_open_files_is_one_line(tmp_path, monkeypatch, low_open_file_limit):
    import moeshard_cli.shard.command as shard_mod

    monkeypatch.setattr(shard_mod, "_allow_open_files", lambda world: None)  # as if the hard limit were low
    code, stdout, err = invoke(["shard", "--gpus", D_FF, "--out", tmp_path / "set"])
    assert_refused(code, stdout, err, f"--gpus {D_FF} needs {D_FF} rank files open at once", "ulimit -n")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- SentencePiece-only tokenizers

# Lines the tokenizer is checked on: non-ASCII (some characters outside the tiny vocabulary), runs of
# whitespace, a line far longer than any piece, and an empty one.
SPIECE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Grüße aus Zürich, naïve café: 日本語 🚀 ﬁ Ｆｕｌｌ",
                "  spaces   and\ttabs  ", "antidisestablishmentarianism" * 30, ""]

# On PYTHONPATH, makes `import sentencepiece` fail as if it were not installed (find_spec returns None).
HIDE_SENTENCEPIECE = "import sys\nsys.modules['sentencepiece'] = None\n"


@pytest.fixture(scope="module")
def spiece_checkpoint(tmp_path_factory):
    """A tiny Switch checkpoint whose tokenizer is only spiece.model, T5's layout (pad 0, eos 1, unk 2)."""
    spm = pytest.importorskip("sentencepiece")
    path = save_checkpoint(tiny_model(), tmp_path_factory.mktemp("spiece-ckpt"), tokenizer=False)
    rng = random.Random(0)  # enough distinct words for 200 pieces
    syllables = "ka to ri mu ne sa lo pe di fu ch th st er an qu zü gr öß na ï ca fé".split()
    lines = [" ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(12)) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path / "spiece"), vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (path / "spiece.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "model_max_length": 512}))
    return path


@pytest.fixture(scope="module")
def spiece_shard_set(spiece_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("spiece-set") / "set"
    code, _, err = invoke(["shard", spiece_checkpoint, "--gpus", 2, "--out", out])
    assert code == 0, err
    return out


def hide_sentencepiece(tmp_path: Path) -> dict:
    """Environment for a child process in which sentencepiece cannot be imported."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE_SENTENCEPIECE)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "hide"), os.environ.get("PYTHONPATH")]))}


def test_spiece_only_checkpoint_gets_tokenizer_json(spiece_checkpoint, spiece_shard_set):
    out = spiece_shard_set
    data = json.loads((out / MANIFEST).read_text())
    assert "tokenizer.json" in data["tokenizer_files"] and (out / "tokenizer.json").is_file()
    assert "spiece.model" in data["tokenizer_files"]
    assert (out / "spiece.model").read_bytes() == (spiece_checkpoint / "spiece.model").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512  # the source's settings kept
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "config.json", *data["tokenizer_files"], *(f["name"] for f in data["files"])])
    assert not (spiece_checkpoint / "tokenizer.json").exists()  # the source is left as it was


def test_converted_tokenizer_loads_without_sentencepiece(tmp_path, spiece_checkpoint, spiece_shard_set):
    spm = pytest.importorskip("sentencepiece")
    # Loaded and applied as `run` does, in a process where sentencepiece is hidden (checked first).
    script = (
        "import importlib.util, json, sys\n"
        "assert importlib.util.find_spec('sentencepiece') is None, 'sentencepiece is not hidden'\n"
        "from moeshard_cli.run.inputs import tokenize\n"
        "from moeshard_cli.run.worker import _tokenizer\n"
        "print(json.dumps(tokenize(json.loads(sys.argv[2]), _tokenizer(sys.argv[1]), 10**6)[0]))\n"
    )
    env = {**os.environ, **hide_sentencepiece(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script, str(spiece_shard_set), json.dumps(SPIECE_TEXTS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # The reference is sentencepiece itself plus </s>, which is what the slow T5Tokenizer computed
    # (transformers 5 has no slow T5Tokenizer: T5Tokenizer is the tokenizers-backed class).
    sp = spm.SentencePieceProcessor(model_file=str(spiece_checkpoint / "spiece.model"))
    expected = [sp.encode(text) + [sp.eos_id()] for text in SPIECE_TEXTS]
    assert any(sp.unk_id() in ids for ids in expected) and max(map(len, expected)) > 100  # the cases are exercised
    assert json.loads(proc.stdout) == expected


def test_spiece_only_without_sentencepiece_is_one_line(tmp_path, spiece_checkpoint):
    before = listing(spiece_checkpoint)
    out = tmp_path / "work" / "set"
    code, stdout, err = run_cli(["shard", spiece_checkpoint, "--gpus", 2, "--out", out], env=hide_sentencepiece(tmp_path))
    assert code == 2, err
    assert_refused(code, stdout, err, "spiece.model", "sentencepiece", "pip install sentencepiece")
    assert not out.exists() and not out.parent.exists()
    assert listing(spiece_checkpoint) == before
