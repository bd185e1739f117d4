"""Every MoE `model_type` of the installed transformers, and what moeshard does with it.

The rows of docs/models.md's support table are rendered from here (`render_table`), so they
cannot drift from the code: a test compares the committed table with a fresh rendering. A model
type is MoE when its modeling file marks experts with `@use_experts_implementation` or defines a
sparse-MoE / experts class. Each row is one of:

- served: a family of `families()`, with the tests that prove it exact;
- refused: `refusal(model_type)` says why, and `shard` stops on it before reading any weight;
- not served yet: with the expert layout transformers' flags declare, so the work left is visible.

The modeling files are read as text (the decorator's flags), not imported: 70-odd model imports
would cost seconds on every `shard` of a refused type and on every test.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# Refused whatever their flags say, each for a reason read in transformers 5.24's code.
REFUSED = {
    "nllb-moe": "transformers 5.24 routes it wrongly (NllbMoeSparseMLP hands the router's one-hot top_1_mask to "
                "experts that one-hot it again, so experts 0 and 1 get every token) and cannot be the oracle",
    "longcat_flash": "its identity (\"zero\") experts return the token itself, which must be counted on one rank "
                     "only; moeshard's slicing rule splits every expert across all ranks",
}
POST_NORM = ("a norm over each expert's whole output (has_post_expert_norm) cannot be computed from d_ff slices: "
             "the slices' outputs no longer add up")
# Where each kind of family is proven exact against transformers (docs/models.md's last column).
DECODER_TESTS = "tests/test_families.py (run matrix), tests/test_family_blocks.py (slices at 1-4 workers)"
GENERIC_TESTS = "tests/test_family_blocks.py (whole block, slices at 1-4 workers), tests/test_families.py (a run)"
EXACTNESS_TESTS = {"switch_transformers": "tests/test_run.py::test_embeddings_match_transformers",
                   "gpt_oss": "tests/test_gpt_oss.py (run matrix at 1-4 workers, slices, wrong layouts)"}

_DECORATOR = re.compile(r"^@use_experts_implementation(?:\((?P<args>[^)]*)\))?", re.M)
_MOE_CLASS = re.compile(r"^class \w*(SparseMoe|SparseMLP|MoE|Moe|Experts)\w*\(", re.M)
_MODEL_TYPE = re.compile(r"""^\s+model_type\s*=\s*["']([\w-]+)["']""", re.M)
_FLAG_DEFAULTS = dict(is_concatenated=True, is_transposed=False, has_bias=False, has_gate=True, has_post_expert_norm=False)


def _models_dir() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


def _flags(text: str) -> dict | None:
    """The layout flags of the first experts class a modeling file decorates, or None."""
    m = _DECORATOR.search(text)
    if m is None:
        return None
    flags = dict(_FLAG_DEFAULTS)
    for name, value in re.findall(r"(\w+)\s*=\s*(True|False)", m.group("args") or ""):
        flags[name] = value == "True"
    return flags


@functools.lru_cache(maxsize=1)
def moe_model_types() -> dict[str, dict | None]:
    """{model_type: layout flags (None: experts without transformers' decorator)} of every MoE model."""
    found = {}
    for folder in sorted(_models_dir().iterdir()):
        modeling = folder / f"modeling_{folder.name}.py"
        configuration = folder / f"configuration_{folder.name}.py"
        if not (modeling.is_file() and configuration.is_file()):
            continue
        text = modeling.read_text(encoding="utf-8")
        flags = _flags(text)
        if flags is None and not _MOE_CLASS.search(text):
            continue
        types = _MODEL_TYPE.findall(configuration.read_text(encoding="utf-8"))
        if types:  # the folder's own type where it has one (others are its vision or audio parts)
            own = [t for t in types if t.replace("-", "_") == folder.name]
            found[own[0] if own else types[0]] = flags
    return found


def layout_flags(model_type: str) -> dict | None:
    return moe_model_types().get(model_type)


def refusal(model_type: str | None) -> str | None:
    """Why moeshard refuses a model type outright, or None."""
    if model_type in REFUSED:
        return REFUSED[model_type]
    flags = layout_flags(model_type) if model_type else None
    if flags and flags["has_post_expert_norm"]:
        return POST_NORM
    return None


def describe_layout(flags: dict | None) -> str:
    """What is left to serve a model type, in the words of transformers' layout flags."""
    if flags is None:
        return "experts without transformers' layout flags: needs a family of its own"
    odd = [text for flag, text in (("has_bias", "biased"), ("is_transposed", "transposed [E, D, 2F]")) if flags[flag]]
    if not flags["has_gate"]:
        odd.append("ungated (up/down only)")
    if not flags["is_concatenated"]:
        odd.append("gate/up interleaved")
    if odd:
        return "experts " + ", ".join(odd) + ": needs the layout in moeshard's slicing"
    return ("gated.py's layout (gate/up concatenated, untransposed, no bias): a line and a tiny config in "
            "families/generic.py, once checked (a family file where its hooks differ)")


def rows() -> list[tuple[str, str, str, str]]:
    """(model_type, status, why / what is left, exactness test) for every MoE model type, and every served family."""
    from moeshard_cli.families import families

    served = families()
    out = []
    for model_type in sorted(set(moe_model_types()) | set(served)):
        if model_type in served:
            family = served[model_type]
            builtins = ", ".join(f"`{n}`" for n in family_builtins(family))
            if getattr(family, "generic", False):
                out.append((model_type, "served (no family file)", f"built-ins {builtins}; families/generic.py", GENERIC_TESTS))
                continue
            test = EXACTNESS_TESTS.get(model_type, DECODER_TESTS if family.decoder else "")
            out.append((model_type, "served", f"built-ins {builtins}", test))
        elif reason := refusal(model_type):
            out.append((model_type, "refused", reason, ""))
        else:
            out.append((model_type, "not served yet", describe_layout(layout_flags(model_type)), ""))
    return out


def family_builtins(family) -> list[str]:
    from moeshard_cli.families import builtin_family, builtin_names

    return [name for name in builtin_names() if builtin_family(name) is family]


def render_table() -> str:
    """docs/models.md's support table, as markdown."""
    import transformers

    lines = [f"Every MoE `model_type` of transformers {transformers.__version__} "
             f"(rendered by `python -m moeshard_cli.families.table`; a test fails when it is stale):", "",
             "| `model_type` | moeshard | why, or what is left | proven exact by |", "|---|---|---|---|"]
    lines += [f"| `{t}` | {status} | {why.replace('|', '/')} | {test} |" for t, status, why, test in rows()]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- support table: begin -->", "<!-- support table: end -->"


def rewrite(doc: Path) -> None:
    """Put a fresh rendering between the markers of `doc` (docs/models.md)."""
    text = doc.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{render_table()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    rewrite(Path(__file__).resolve().parents[2] / "docs" / "models.md")
