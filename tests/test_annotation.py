"""Conflict-mask annotation without a server: the brush codec, the store, the review rule, the
simulated annotators, and the annotate stage's synthetic backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_pair_shards
from label_studio_sdk.converter.brush import mask2rle

from annotation.labeling import AnnotationError, mask_to_result, result_to_mask, review_choice
from annotation.simulated import AnnotatorNoise, annotator_rng, simulate
from annotation.store import conflict_iou, decide, merge

ROOT = Path(__file__).resolve().parents[1]


def _mask(seed: int = 0, size: int = 32) -> np.ndarray:
    r = np.random.default_rng(seed)
    m = np.zeros((size, size), np.uint8)
    m[:, :4] = 255
    y, x = r.integers(6, size - 10, 2)
    m[y : y + 6, x : x + 8] = 1
    return m


def _rec(key, aid, mask, who="a@x", updated="t1", review=None, cancelled=False, task=1):
    result = mask_to_result(mask, key, salt=who)
    if review:
        result.append(
            {"from_name": "review", "to_name": "ref", "type": "choices", "value": {"choices": [review]}}
        )
    return {
        "task_id": task,
        "pair_key": key,
        "annotation_id": aid,
        "annotator": who,
        "created_at": "t0",
        "updated_at": updated,
        "was_cancelled": cancelled,
        "result": result,
    }


def test_brush_round_trip_is_exact():
    for seed in range(5):
        m = _mask(seed)
        res = mask_to_result(m, "k")
        assert {r["value"]["brushlabels"][0] for r in res} == {"conflict", "ignore"}
        assert len({r["id"] for r in res}) == len(res)  # region ids unique within a result
        np.testing.assert_array_equal(result_to_mask(res, 32, 32, "k"), m)
    empty = np.zeros((8, 8), np.uint8)
    assert mask_to_result(empty, "k") == []
    np.testing.assert_array_equal(result_to_mask([], 8, 8, "k"), empty)


def test_conflict_is_painted_over_ignore():
    conflict = np.zeros((16, 16), np.uint8)
    conflict[4:8, 4:8] = 1
    res = mask_to_result(conflict, "k")
    ign = mask_to_result(np.full((16, 16), 255, np.uint8), "k", salt="2")
    m = result_to_mask(ign + res, 16, 16, "k")
    assert (m[4:8, 4:8] == 1).all() and (m == 255).sum() == 256 - 16


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["value"].update(brushlabels=["teeth"]), "label(s) ['teeth']"),
        (lambda r: r["value"].update(brushlabels=[]), "label(s) (none)"),
        (lambda r: r["value"].update(rle=[]), "empty brush"),
        (lambda r: r.update(original_width=64), "painted on a 64x32 image"),
        (
            lambda r: r["value"].update(rle=[int(v) for v in mask2rle(np.zeros((40, 40), np.uint8))]),
            "out of bounds",
        ),
        (
            lambda r: r["value"].update(rle=[int(v) for v in mask2rle(np.zeros((32, 32), np.uint8))]),
            "empty brush",
        ),
        (lambda r: r["value"].update(rle=[1, 2, 3]), "corrupt RLE"),
        (lambda r: r.update(type="rectanglelabels"), "unexpected region type"),
    ],
)
def test_bad_annotations_name_the_task(edit, message):
    res = mask_to_result(_mask(), "pairX")
    edit(res[0])
    with pytest.raises(AnnotationError, match="pairX") as exc:
        result_to_mask(res, 32, 32, "pairX")
    assert message in str(exc.value)


def test_mask_outside_contract_is_refused():
    with pytest.raises(AnnotationError, match=r"values \[7\]"):
        mask_to_result(np.full((4, 4), 7, np.uint8), "k")


def test_store_keeps_every_version():
    a1 = _rec("p", 1, _mask(0), updated="t1")
    a1b = _rec("p", 1, _mask(1), updated="t2")  # the same annotation edited later
    store, new = merge([], [a1])
    store, new2 = merge(store, [a1, a1b])
    assert (new, new2, len(store)) == (1, 1, 2)
    store, new3 = merge(store, [a1, a1b])
    assert new3 == 0 and len(store) == 2
    decisions, _ = decide(store, {"p": (32, 32)})
    np.testing.assert_array_equal(decisions["p"]["mask"], _mask(1))  # newest version decides
    assert decisions["p"]["versions"] == 2


def test_review_rule():
    truth = _mask(3)
    close = truth.copy()
    close[10:12, :] = 0
    far = _mask(9)
    recs = [_rec("p", 1, truth, "a"), _rec("p", 2, close, "b"), _rec("p", 3, far, "c")]
    d, q = decide(recs, {"p": (32, 32)})
    assert d["p"]["state"] == "consensus" and d["p"]["annotator"] in ("a", "b") and d["p"]["n"] == 3
    assert 0 < d["p"]["agreement_iou"] < 1 and q == []
    # A reviewer's accept wins over consensus; a reject or a skip removes an annotation.
    recs2 = recs[:2] + [_rec("p", 3, far, "c", review="accept")]
    assert decide(recs2, {"p": (32, 32)})[0]["p"]["annotator"] == "c"
    assert decide(recs2, {"p": (32, 32)})[0]["p"]["state"] == "reviewed"
    recs3 = [
        _rec("p", 1, truth, "a", review="reject"),
        _rec("p", 2, far, "b", cancelled=True),
        _rec("p", 3, close, "c"),
    ]
    d3, _ = decide(recs3, {"p": (32, 32)})
    assert d3["p"]["state"] == "single" and d3["p"]["annotator"] == "c"
    assert review_choice(recs2[2]["result"]) == "accept"


def test_malformed_and_orphan_annotations_are_quarantined_not_lost():
    bad = _rec("p", 1, _mask(0))
    bad["result"][0]["value"]["brushlabels"] = ["teeth"]
    good = _rec("p", 2, _mask(1), "b")
    orphan = _rec("gone", 3, _mask(2), task=9)
    store, _ = merge([], [bad, good, orphan])
    d, q = decide(store, {"p": (32, 32)})
    assert d["p"]["annotation_id"] == 2
    reasons = {x["annotation_id"]: x["reason"] for x in q}
    assert "teeth" in reasons[1] and "task 9 (gone)" in reasons[3]
    assert len(store) == 3  # the store still holds all three


def test_annotation_drawn_on_other_pixels_is_quarantined_not_applied():
    old = _rec("p", 1, _mask(0))
    old["content"] = "aaaa"  # drawn when the pair showed other images
    legacy = _rec("p", 2, _mask(2), "b")  # records no content at all
    new = _rec("p", 3, _mask(1), "c")
    new["content"] = "bbbb"
    store, _ = merge([], [old, legacy, new])
    d, q = decide(store, {"p": (32, 32)}, {"p": "bbbb"})
    assert d["p"]["annotation_id"] == 3 and d["p"]["state"] == "single"
    reasons = {x["annotation_id"]: x["reason"] for x in q}
    assert set(reasons) == {1, 2}
    assert "content aaaa, the pair's now bbbb" in reasons[1] and "records no content" in reasons[2]
    assert len(store) == 3  # nothing is lost
    d, q = decide(store, {"p": (32, 32)}, {"p": "cccc"})  # rendered again: no annotation decides
    assert d == {} and len(q) == 3
    assert decide(store, {"p": (32, 32)})[0]["p"]["n"] == 3  # without contents: as before


def test_simulated_annotator_is_realistic_and_reproducible():
    from pipelines.synthetic import conflict_mask, face_spec

    ious = []
    for i in range(12):
        t, r = face_spec(5, "album", i, 0), face_spec(5, "album", i, 1)
        truth = conflict_mask(t, r, 64)
        a = simulate(truth, annotator_rng(0, "ann", f"k{i}"), AnnotatorNoise())
        b = simulate(truth, annotator_rng(0, "ann", f"k{i}"), AnnotatorNoise())
        np.testing.assert_array_equal(a, b)
        assert set(np.unique(a)) <= {0, 1, 255}
        if (truth == 1).any():
            ious.append(conflict_iou(a, truth))
    assert ious and 0.4 < np.mean(ious) < 0.98  # noisy, but a person's work, not random
    perfect = simulate(truth, np.random.default_rng(0), AnnotatorNoise(0, 0.0, 0, 0.0))
    np.testing.assert_array_equal(perfect, truth)


def _run_stage(module: str, params: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, "--params", str(params), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "REFFACE_PROGRESS": "0"},
        timeout=600,
    )


def test_annotate_stage_synthetic_backend(tmp_path):
    shards = make_pair_shards(tmp_path / "shards")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"annotate": {"pool": 20, "double_fraction": 0.5}}))
    out = tmp_path / "ann"
    args = ("--shards", str(shards), "--out", str(out), "--metrics", str(tmp_path / "m.json"))
    r = _run_stage("stages.annotate", params, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["pool"] == 20 and m["pairs_decided"] == 20 and m["quarantined"] == 0
    assert m["multi_annotated_pairs"] > 0 and m["agreement_conflict_iou"] is not None
    assert 0.5 < m["vs_truth_accuracy"] <= 1
    first = {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())}
    store = (out / "annotations.jsonl").read_bytes()
    # Rerun: identical, nothing new stored. Growing the pool appends pairs and keeps the old ones.
    assert _run_stage("stages.annotate", params, *args).returncode == 0
    assert (out / "annotations.jsonl").read_bytes() == store
    assert {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())} == first
    params.write_text(yaml.safe_dump({"annotate": {"pool": 30, "double_fraction": 0.5}}))
    assert _run_stage("stages.annotate", params, *args).returncode == 0
    grown = {p.name for p in (out / "masks").iterdir()}
    assert set(first) < grown and len(grown) == 30
    assert (out / "annotations.png").is_file()
    # The shards rendered again (other pixels under the same pair keys): the stored annotations are
    # quarantined with their reason, the pairs annotated again, and the decisions equal a fresh store's.
    shards2 = make_pair_shards(tmp_path / "shards2", seed=4)
    # The mask model refuses to train the new pixels on the old decisions.
    r = _run_stage(
        "stages.refsel",
        params,
        *("--shards", str(shards2), "--annotate", str(out), "--out", str(tmp_path / "rs")),
        *("--metrics", str(tmp_path / "rs.json"), "--plot", str(tmp_path / "rs.csv")),
    )
    assert r.returncode != 0 and "drawn on other images" in r.stderr and "re-run annotate" in r.stderr
    args2 = ("--shards", str(shards2), "--out", str(out), "--metrics", str(tmp_path / "m2.json"))
    assert _run_stage("stages.annotate", params, *args2).returncode == 0
    fresh = (
        "--shards",
        str(shards2),
        "--out",
        str(tmp_path / "fresh"),
        "--metrics",
        str(tmp_path / "m3.json"),
    )
    assert _run_stage("stages.annotate", params, *fresh).returncode == 0
    m2, m3 = (json.loads((tmp_path / f).read_text()) for f in ("m2.json", "m3.json"))
    assert {p.name for p in (out / "masks").iterdir()} == grown
    m30 = json.loads((tmp_path / "m.json").read_text())  # the store before the shards changed
    assert m2["annotations_stored"] == m30["annotations_stored"] + m3["annotations_stored"]
    assert m2["quarantined"] == m30["annotations_stored"]
    assert m3["quarantined"] == 0 and m2["pairs_decided"] == m3["pairs_decided"] == 30
    for name in sorted(grown):
        assert (out / "masks" / name).read_bytes() == (tmp_path / "fresh" / "masks" / name).read_bytes()
    reasons = [json.loads(x)["reason"] for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert reasons and all("drawn on other images" in r for r in reasons)
