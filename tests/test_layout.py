"""Each piece of knowledge has one owner: a family's layout lives in its file under families/ only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moeshard_cli"

# Where transformers keeps the MoE modules, how checkpoints name expert weights, and the slicing rule.
LAYOUTS = {
    "families/switch.py": {
        "module path of a sparse MLP": re.compile(r"\.layer\[-1\]|\.block\[[^\]]*\]\.layer"),
        "expert key format": re.compile(r"expert_\{|experts\\?\.expert_|layer\\?\.1\\?\.mlp"),
        "slicing rule (rows of wi, columns of wo)": re.compile(r"w[io]\w*\[[^\]]*lo:hi|\"wi\": 0|dim=0 if|== \"wi\" else"),
    },
    "families/gated.py": {
        "fused expert parameters": re.compile(r"gate_up_proj"),
        "module path of the experts": re.compile(r"model\\?\.layers|\.layers\["),
        "slicing rule (rows of gate and up, columns of down)": re.compile(r"\"gate_proj\": 0"),
    },
    "families/mixtral.py": {
        "Mixtral's checkpoint names": re.compile(r"block_sparse_moe|\"w[123]\""),
    },
}


# GPT-OSS states its own layout, which shares transformers' names (gate_up_proj, model.layers) with gated.py's;
# Granite-MoE-Shared its fused shared MLP's keys; Granite-MoE's block has Mixtral's hub name, block_sparse_moe.
# generic.py finds the fused experts in any model tree and reads Mixtral's names where a checkpoint keeps them.
ALSO_OWNED_BY = {"families/gated.py": {"families/gpt_oss.py", "families/granitemoeshared.py", "families/generic.py"},
                 "families/mixtral.py": {"families/granitemoe.py", "families/generic.py"}}


def docstring_lines(text: str) -> set[int]:
    """Line numbers of docstrings: prose may name a layout, code may not."""
    lines = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


@pytest.mark.parametrize("owner", sorted(LAYOUTS))
def test_only_the_owner_knows_its_layout(owner):
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in {owner, *ALSO_OWNED_BY.get(owner, ())}:
            continue
        text = path.read_text()
        prose = docstring_lines(text)
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, pattern in LAYOUTS[owner].items():
                if pattern.search(code) and number not in prose:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {what}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("owner", sorted(LAYOUTS))
def test_the_owner_states_each_piece(owner):
    text = (PACKAGE / owner).read_text()
    for what, pattern in LAYOUTS[owner].items():
        assert pattern.search(text), f"{owner} no longer holds the {what}"
