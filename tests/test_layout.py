"""Each piece of knowledge has one owner: the Switch Transformers layout lives in switch.py only."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moeshard_cli"

# Where transformers keeps the sparse MLPs, how it names expert weights, and the slicing rule.
LAYOUT = {
    "module path of a sparse MLP": re.compile(r"\.layer\[-1\]|\.block\[[^\]]*\]\.layer"),
    "expert key format": re.compile(r"expert_\{|experts\\?\.expert_|layer\\?\.1\\?\.mlp"),
    "slicing rule (rows of wi, columns of wo)": re.compile(r"w[io]\w*\[[^\]]*lo:hi|\"wi\": 0|dim=0 if|== \"wi\" else"),
}


def test_only_switch_py_knows_the_switch_layout():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "switch.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, pattern in LAYOUT.items():
                if pattern.search(code) and not code.strip().startswith(('"', "'")):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {what}: {line.strip()}")
    assert offenders == []


def test_the_owner_states_each_piece_once():
    text = (PACKAGE / "switch.py").read_text()
    for what, pattern in LAYOUT.items():
        assert pattern.search(text), f"switch.py no longer holds the {what}"
