"""Source checkpoints: resolve SOURCE and list the tensors its rank files need, without loading them.

A `Source` is a model family, a config and an ordered list of `TensorEntry`s, named as rank files
name them (the family's `rank_key`), whose `load()` reads one tensor. Three kinds: built-in random models, local `save_pretrained` directories
(safetensors or pytorch_model.bin, single or sharded), and hub ids fetched with
huggingface_hub. Nothing here holds more than one tensor at a time.

Tokenizers: a source whose tokenizer is only a SentencePiece `spiece.model` (the T5 family's
format, e.g. google/switch-base-*) gets a fast `tokenizer.json` converted once, at shard time,
by transformers' own converter. Reading spiece.model needs `sentencepiece` and `protobuf`;
reading tokenizer.json needs only `tokenizers`, so `run` does not need them.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moeshard_cli.shard import builtin
from moeshard_cli.shard.dequant import dequantized, quantization
from moeshard_cli.dtypes import FROM_SAFETENSORS
from moeshard_cli.errors import UserError
from moeshard_cli.families import family_of
from moeshard_cli.families.table import refusal
from moeshard_cli.shard.plan import join_rank_parts, rank_cut

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
    "added_tokens.json", "vocab.json", "merges.txt",
)
HUB_PATTERNS = ["config.json", *TOKENIZER_FILES]


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    load_row: Callable[[int], torch.Tensor] | None = None  # index i of the first axis alone (one expert of a fused tensor)

    def row(self, i: int) -> torch.Tensor:
        return self.load_row(i) if self.load_row is not None else self.load()[i].clone()

    def piece(self, row: int | None, part: int, parts: int) -> torch.Tensor:
        """Piece `part` of `parts` equal pieces along the first axis of index `row` (None: of the whole tensor)."""
        whole = self.load() if row is None else self.row(row)
        return whole if parts == 1 else whole.chunk(parts)[part].clone()


@dataclass
class Source:
    label: str  # what the user typed
    kind: str  # "builtin" | "local" | "hub" | "shard-set"
    family: object  # a families/ FAMILY
    config: object  # the family's transformers config
    tensors: list[TensorEntry]
    path: str | None = None
    revision: str | None = None
    tokenizer_dir: Path | None = None  # where tokenizer files live; None for built-ins (byte_tokenizer)
    extra: dict = field(default_factory=dict)
    _converted: object = field(default=None, repr=False, compare=False)  # fast tokenizer from spiece.model

    @property
    def dims(self):
        return self.family.dims(self.config)

    def describe(self) -> dict:
        return {"kind": self.kind, "id": self.label, "revision": self.revision, "path": self.path}

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        """Copy (or, for built-ins, write) the tokenizer files into out_dir; returns their names."""
        if self.tokenizer_dir is None:
            byte_tokenizer().save_pretrained(str(out_dir))
            return sorted(p.name for p in out_dir.iterdir() if p.name in TOKENIZER_FILES)
        copied = []
        for name in TOKENIZER_FILES:
            src = self.tokenizer_dir / name
            if src.is_file():
                shutil.copyfile(src, out_dir / name)
                copied.append(name)
        if not self._needs_conversion():
            return copied
        # Writes tokenizer.json and a tokenizer_config.json that matches it (over the copied one).
        # spiece.model stays: with tokenizer.json beside it, AutoTokenizer reads only tokenizer.json.
        self.prepare_tokenizer().save_pretrained(str(out_dir))
        return [name for name in TOKENIZER_FILES if (out_dir / name).is_file()]

    def prepare_tokenizer(self):
        """Convert a spiece.model-only tokenizer to a fast one (kept for save_tokenizer); None if no conversion is needed.

        Called before anything is written, so that a missing converter fails the command at once.
        """
        if self._converted is not None or not self._needs_conversion():
            return self._converted
        from transformers.utils import is_protobuf_available, is_sentencepiece_available

        # Checked here: without them transformers falls back to a tiktoken reader and fails obscurely.
        missing = [name for name, ok in (("sentencepiece", is_sentencepiece_available()), ("protobuf", is_protobuf_available())) if not ok]
        if missing:
            raise UserError(f"the tokenizer of {self.label} is a SentencePiece spiece.model only, and converting it to tokenizer.json "
                            f"needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}", f"pip install {' '.join(missing)}")
        from transformers import AutoTokenizer

        try:
            self._converted = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        except Exception as exc:
            raise UserError(f"cannot convert {self.tokenizer_dir / 'spiece.model'} to tokenizer.json ({type(exc).__name__})",
                            "restore spiece.model from the original checkpoint") from exc
        return self._converted

    def _needs_conversion(self) -> bool:
        d = self.tokenizer_dir
        return d is not None and (d / "spiece.model").is_file() and not (d / "tokenizer.json").is_file()


def byte_tokenizer():
    """The built-in models' tokenizer: ByT5's ids (UTF-8 byte b is id b + 3; pad 0, end of sequence 1,
    appended) as a fast `tokenizer.json`, which AutoTokenizer loads for any family's config
    (it does not honour ByT5's slow class beside a Mixtral config)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char_of_byte = bytes_to_unicode()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{char_of_byte[b]: b + 3 for b in range(256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def resolve(source: str, revision: str | None = None) -> Source:
    if builtin.is_builtin(source):
        return _builtin_source(source)
    path = Path(source).expanduser()
    if (path / "moeshard.json").is_file():
        return _shard_set_source(path, label=source)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"source {source} is a file", "pass the checkpoint directory (with config.json) instead")
        return _local_source(path, label=source, kind="local")
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return _hub_source(source, revision)
    raise UserError(
        f"source {source!r} does not exist",
        f"pass a checkpoint directory, a hub id like Qwen/Qwen3-30B-A3B, or one of: {', '.join(builtin.builtin_names())}",
    )


def _builtin_source(name: str) -> Source:
    family, config = builtin.builtin_config(name)
    entries = [
        TensorEntry(key, shape, torch.float32, functools.partial(builtin.random_tensor, family, key, shape, config))
        for key, shape in family.expected_tensors(config).items()
    ]
    return Source(label=name, kind="builtin", family=family, config=config, tensors=entries)


def _hub_source(repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except Exception as exc:  # huggingface_hub raises many types: offline, not found, network, auth
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot fetch {repo_id} from the Hugging Face hub ({type(exc).__name__}: {reason[:160]})",
                            "pass a local checkpoint directory, or use a machine where the model is in the HF cache (HF_HOME) with HF_HUB_OFFLINE=1") from exc

    _read_config(fetch(["config.json"]))  # an unserved family or quantization is refused before the weights are downloaded
    folder = fetch(HUB_PATTERNS + ["*.safetensors", "*.safetensors.index.json"])
    if not any(folder.glob("*.safetensors")):
        folder = fetch(HUB_PATTERNS + ["pytorch_model*.bin", "pytorch_model*.bin.index.json"])
    src = _local_source(folder, label=repo_id, kind="hub")
    src.revision = revision
    return src


def _read_config(path: Path):
    """(family, config) of a save_pretrained directory."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.json", "pass a directory written by save_pretrained")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_file} is not valid JSON ({exc})", "restore config.json from the original checkpoint") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_file} is not a config (a JSON object)", "restore config.json from the original checkpoint")
    from transformers import PretrainedConfig

    raw = PretrainedConfig._decode_special_floats(raw)  # {"__float__": "Infinity"}, as from_pretrained reads it (Mamba's time_step_limit)
    model_type = raw.get("model_type")
    if model_type == "t5":
        raise UserError(f"{path} is a dense t5 checkpoint with no experts", "moeshard shards Mixture-of-Experts models: use a checkpoint with experts")
    if reason := refusal(model_type):  # before any weight is read
        raise UserError(f"{path} holds a {model_type} model, which moeshard refuses: {reason}",
                        "use a checkpoint of a served family (docs/models.md lists every MoE model type and why)")
    try:
        family = family_of(model_type)
    except ValueError as exc:
        raise UserError(f"{path} holds a {model_type or 'unknown'} model, which moeshard does not serve", f"use a checkpoint of a served family: {str(exc).split('(')[-1].rstrip(')')}") from None
    problem = family.check_config(raw, str(path))
    if problem:
        raise UserError(problem, "moeshard shards Mixture-of-Experts models: use a checkpoint with experts")
    quant = quantization(raw, str(path))  # refused here, before a weight is read
    # the rank files hold dequantized tensors: their config must not claim otherwise
    return family, family.config({k: v for k, v in raw.items() if k != "quantization_config"}), quant


def _weight_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, files, weight_map) for a save_pretrained directory."""
    for fmt, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                               ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
                raise UserError(f"{path / index} is not a valid index", "restore it from the original checkpoint") from exc
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index} names missing file {missing[0]}", "download the complete checkpoint (every file its index lists)")
            return fmt, files, weight_map
        if (path / single).is_file():
            return fmt, [path / single], None
    raise UserError(f"{path} has no weights (model.safetensors or pytorch_model.bin)", "pass a directory written by save_pretrained")


def safetensors_entries(file: Path) -> dict[str, TensorEntry]:
    """Check the file (safe_open validates the header) and index its tensors; `load()` preads one tensor.

    Not `safe_open(...).get_tensor`: that copies out of a memory map of the whole file, and the
    pages it touched stay in this process's resident set, which then grows to the checkpoint's size
    (and a worker holding a tensor that still points into the map counts its whole file twice).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
        header_len, header = _read_safetensors_header(file)
        base = 8 + header_len
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            (lo, hi), shape, dtype = info["data_offsets"], tuple(info["shape"]), FROM_SAFETENSORS[info["dtype"]]
            entries[key] = TensorEntry(key, shape, dtype, functools.partial(_pread_tensor, file, base + lo, hi - lo, shape, dtype),
                                       functools.partial(_pread_row, file, base + lo, hi - lo, shape, dtype) if shape else None)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{file.name} is truncated or corrupt ({str(exc).splitlines()[0][:120]})", "download or copy that file again") from exc
    return entries


def _read_safetensors_header(file: Path) -> tuple[int, dict]:
    """safe_open maps lazily: also check that the header's data exactly fills the file before trusting it."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise UserError(f"{file.name} is truncated or corrupt ({size} bytes, header needs {8 + header_len + end})", "download or copy that file again")
    return header_len, header


def _pread_tensor(file: Path, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Read one tensor's bytes straight into a fresh buffer (little-endian, as safetensors stores them)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view, done = memoryview(buf.numpy()), 0
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise UserError(f"{file.name} is truncated (it shrank while being read)", "download or copy that file again")
            done += n
    return buf.view(dtype).reshape(shape)


def _pread_row(file: Path, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype, i: int) -> torch.Tensor:
    """Index i of a tensor's first axis: a contiguous run of its bytes."""
    step = nbytes // shape[0]
    return _pread_tensor(file, offset + i * step, step, shape[1:], dtype)


def _open_bin(file: Path) -> dict[str, TensorEntry]:
    try:
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise UserError(f"{file.name} is truncated or corrupt ({str(exc).splitlines()[0][:120]})", "download or copy that file again") from exc
    maps = _file_mappings(file)
    return {k: TensorEntry(k, tuple(v.shape), v.dtype, functools.partial(_copy_out_of_map, v, maps),
                           (lambda i, v=v: _copy_out_of_map(v[i], maps)) if v.dim() else None) for k, v in state.items()}


def _copy_out_of_map(tensor: torch.Tensor, maps: list[tuple[int, int]]) -> torch.Tensor:
    """Copy a tensor out of torch.load's memory map, then drop its mapped pages from the resident set.

    Without this RSS grows to the size of the .bin file. The pages were only read, so the kernel
    re-reads them from the file if they are touched again. Only ranges inside a mapping of the
    file itself are dropped (on anonymous memory MADV_DONTNEED would zero the data).
    """
    copy = tensor.clone()
    storage = tensor.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if _LIBC is not None and any(m_lo <= lo and hi <= m_hi for m_lo, m_hi in maps):
        start = lo & ~(mmap.PAGESIZE - 1)
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(hi - start), _MADV_DONTNEED)
    return copy


def _file_mappings(file: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `file` (Linux /proc/self/maps; empty elsewhere)."""
    target, ranges = str(file.resolve()), []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _local_source(path: Path, label: str, kind: str) -> Source:
    family, config, quant = _read_config(path)
    fmt, files, _ = _weight_files(path)
    on_disk: dict[str, TensorEntry] = {}
    for file in files:
        on_disk.update(safetensors_entries(file) if fmt == "safetensors" else _open_bin(file))
    if quant:
        on_disk = dequantized(on_disk, quant, str(path))
    names = set(on_disk)
    expected = family.expected_tensors(config)
    available = from_fused({key: entry for name, entry in on_disk.items() if (key := family.rank_key(name, names))}, expected, family)
    if not any(family.parse_expert_key(k) for k in available):
        raise UserError(f"{path} has no expert weights (a dense model?)", f"use a {family.name} Mixture-of-Experts checkpoint")
    entries = []
    for key, shape in expected.items():
        entry = available.get(key)
        if entry is None:
            raise UserError(f"{path} lacks tensor {key}", "the checkpoint is incomplete or does not match its config.json")
        if entry.shape != shape:
            raise UserError(f"{key} has shape {list(entry.shape)} but config.json implies {list(shape)}", "the checkpoint does not match its config.json")
        entries.append(TensorEntry(key, shape, entry.dtype, entry.load))
    extra = {"format": fmt, "files": [f.name for f in files]} | ({"dequantized_from": quant["quant_method"]} if quant else {})
    return Source(label=label, kind=kind, family=family, config=config, tensors=entries, path=str(path.resolve()),
                  tokenizer_dir=path, extra=extra)


def from_fused(available: dict[str, TensorEntry], expected: dict[str, tuple[int, ...]], family) -> dict[str, TensorEntry]:
    """Per-expert rank-file keys that a checkpoint stores fused (GPT-OSS's `...experts.M` [E, ...], Granite's
    `input_linear` [E, 2F, D] holding gate and up, transformers' in-memory `gate_up_proj`), each read as
    its piece of one expert's row of the fused tensor (`family.fused_sources`): one expert at a time.
    Granite's gate and up read the expert's row once each."""
    out = dict(available)
    for key, shape in expected.items():
        if key in out:
            continue
        for source, row, part, parts in family.fused_sources(key):
            fused = available.get(source)
            if fused is None or (row is not None and row >= fused.shape[0]):
                continue
            whole = fused.shape if row is None else fused.shape[1:]
            out[key] = TensorEntry(key, (whole[0] // parts, *whole[1:]), fused.dtype, functools.partial(fused.piece, row, part, parts))
            break
    return out


def _shard_set_source(path: Path, label: str) -> Source:
    """A moeshard shard set read back as a checkpoint: experts are the concatenation of the rank slices."""
    from moeshard_cli.shard.manifest import check_files, read_shard_set

    shards = read_shard_set(path)
    check_files(shards)
    ranks = [safetensors_entries(shards.rank_file(r)) for r in range(shards.world_size)]
    family, config = shards.family, shards.family.config(shards.config)

    def load(key: str) -> torch.Tensor:
        if rank_cut(family, key, 0, 1) is None:  # replicated, or on rank 0 only
            return ranks[0][key].load()
        return join_rank_parts(family, key, [rank[key].load() for rank in ranks])

    entries = [TensorEntry(k, shape, ranks[0][k].dtype, functools.partial(load, k)) for k, shape in family.expected_tensors(config).items()]
    extra = {"dequantized_from": shards.data["dequantized_from"]} if "dequantized_from" in shards.data else {}
    return Source(label=label, kind="shard-set", family=family, config=config, tensors=entries, path=str(path.resolve()), tokenizer_dir=path,
                  extra=extra)
