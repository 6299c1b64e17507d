"""benchmarks/compare_evaluations.py: two models' per-target values, paired on the same frozen set."""

import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from compare_evaluations import compare  # noqa: E402


def per_target(content: str, blind: np.ndarray, one_ref: np.ndarray) -> dict:
    rows = {
        "no reference": {"gt_id": blind.tolist(), "psnr": (30 + blind).tolist()},
        "1 reference": {"gt_id": one_ref.tolist(), "psnr": (30 + one_ref).tolist()},
    }
    return {"severe": {"content": content, "keys": [], "rows": rows}}


def test_pairs_each_row_and_the_references_own_effect_across_models():
    rng = np.random.default_rng(0)
    blind = rng.uniform(0.6, 0.8, 40)
    old = per_target("abc", blind, blind + 0.01)
    new = per_target("abc", blind + 0.002, blind + 0.05)  # the references' effect grows by 0.038
    rows = {(r["row"], r["metric"], r["what"]): r["d"] for r in compare(new, old, None, 42)}
    gain = rows[("1 reference", "gt_id", "(row - blind): A - B")]
    assert gain.mean == pytest.approx(0.038) and gain.verdict == "higher"
    assert rows[("no reference", "gt_id", "A - B")].mean == pytest.approx(0.002)
    assert ("no reference", "gt_id", "(row - blind): A - B") not in rows  # blind against itself: nothing
    only = compare(new, old, ["1 reference"], 42)
    assert {r["row"] for r in only} == {"1 reference"}


def test_refuses_two_different_frozen_sets():
    a = per_target("abc", np.zeros(3), np.zeros(3))
    b = per_target("def", np.zeros(3), np.zeros(3))
    with pytest.raises(SystemExit, match="different frozen sets"):
        compare(a, b, None, 42)
