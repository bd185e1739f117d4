"""docs/models.md's support table against the registry, each served family's exactness tests, and the refusals.

The table is rendered from the code (families/table.py): it must be the committed one, every
served family must have the tests that prove it exact, and a refused model type is refused by
`shard` in one line before any weight is read.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from conftest import REPO, invoke
from moeshard_cli.families import builtin_family, families
from moeshard_cli.families.table import BEGIN, END, EXACTNESS_TESTS, REFUSED, render_table, rows
from test_run import error_line


def test_the_committed_table_is_the_registry_rendered():
    text = (REPO / "docs" / "models.md").read_text(encoding="utf-8")
    committed = text.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")
    assert committed == render_table(), "docs/models.md is stale: run python -m moeshard_cli.families.table"


def test_every_served_family_has_an_exactness_test():
    """A decoder family is in the run matrix with last, mean and score, on an even and an uneven
    number of workers, and in the in-process slice check; one served from the module tree alone
    (families/generic.py) has no output hook of its own: its whole block is checked at 1-4 workers
    and it has one run. Switch has its own run tests."""
    import test_families
    import test_family_blocks
    import test_run

    for model_type, family in families().items():
        if not family.decoder:
            assert hasattr(test_run, "test_embeddings_match_transformers")
            continue
        if model_type in EXACTNESS_TESTS:  # a module of its own (GPT-OSS): its MATRIX of (world, mode) and a slice check
            own = importlib.import_module(Path(EXACTNESS_TESTS[model_type].split()[0]).stem)
            assert {mode for _, mode in own.MATRIX} == {"last", "mean", "score"}, f"{model_type} lacks a run test of each output"
            assert {w % 2 for w, _ in own.MATRIX} == {0, 1} and hasattr(own, "test_rank_slices_sum_to_transformers_experts")
            continue
        cases = [(world, mode) for model, world, mode in test_families.MATRIX if builtin_family(model) is family]
        if getattr(family, "generic", False):  # no hook of its own: its whole block at 1-4 workers, and one run
            assert model_type in test_family_blocks.GENERIC_MODELS and cases, f"{model_type} lacks its block check or a run"
            continue
        assert {mode for _, mode in cases} == {"last", "mean", "score"}, f"{model_type} lacks a run test of each output"
        widths = {builtin_family(m).dims(builtin_family(m).builtin_config(m)).d_ff for m, *_ in test_families.MATRIX if builtin_family(m) is family}
        uneven = [w for w, _ in cases if any(width % w for width in widths)]
        assert any(w % 2 == 0 for w, _ in cases) and uneven, f"{model_type} lacks an even and an uneven number of workers"
        assert model_type in test_family_blocks.MODELS, f"{model_type} lacks the in-process slice check"
    assert {t for t, status, *_ in rows() if status.startswith("served")} == set(families())


def test_the_table_lists_refusals_and_what_is_left():
    table = {t: (status, why) for t, status, why, _ in rows()}
    assert all(table[t][0] == "refused" for t in REFUSED)
    assert table["muse_spark"] == ("refused", table["muse_spark"][1]) and "has_post_expert_norm" in table["muse_spark"][1]
    assert table["switch_transformers"][0] == table["deepseek_v3"][0] == "served"
    assert table["nemotron_h"][0] == "not served yet" and "ungated" in table["nemotron_h"][1]
    assert len(table) > 40  # every MoE model type of transformers 5.24, not only the served ones


@pytest.mark.parametrize("model_type, needle", [("nllb-moe", "routes it wrongly"), ("muse_spark", "has_post_expert_norm"),
                                                ("longcat_flash", "zero")])
def test_refused_types_stop_in_one_line_before_reading_weights(tmp_path, model_type, needle):
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": model_type}))  # no weights at all
    code, _, err = invoke(["shard", source, "--gpus", 2, "--out", tmp_path / "set"])
    line = error_line(err)
    assert code == 2
    assert f"holds a {model_type} model, which moeshard refuses" in line and needle in line, line
    assert not (tmp_path / "set").exists()
