"""The RefSel-style mask model (OHEM-CE, eq. 2 of RefSTAR), the bootstrap library and the refsel stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_pair_shards

from models.refsel import RefSelConfig, RefSelUNet, mask_to_target, ohem_cross_entropy, probs_to_mask
from pipelines.refsel import load_model, per_type_report, save_model, scores, select_pool
from pipelines.shards import decode_sample, iter_raw, shard_paths, validate_shards

ROOT = Path(__file__).resolve().parents[1]


def test_ohem_keeps_hard_pixels_by_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g) * 3
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    ce = F.cross_entropy(logits, target, reduction="none").flatten()
    p_true = torch.exp(-ce)
    hard = p_true < 0.7
    assert hard.sum() > 0.25 * ce.numel()  # enough hard pixels: the mean over exactly those
    torch.testing.assert_close(ohem_cross_entropy(logits, target, 0.7, 0.25), ce[hard].mean())
    # Too few hard pixels: the hardest min_kept are used instead.
    easy = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    k = int(0.25 * ce.numel())
    ce_easy = F.cross_entropy(easy, target, reduction="none").flatten()
    torch.testing.assert_close(ohem_cross_entropy(easy, target, 0.7, 0.25), ce_easy.topk(k).values.mean())
    # Invalid pixels never count.
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[0, :2] = True
    ce_v = ce.view(2, 8, 8)[valid]
    torch.testing.assert_close(
        ohem_cross_entropy(logits, target, 0.7, 0.0, valid=valid), ce_v[ce_v > -np.log(0.7)].mean()
    )


def test_unet_shapes_classes_and_checks():
    net = RefSelUNet(RefSelConfig(widths=(8, 16, 32)))
    x = torch.zeros(2, 3, 32, 32)
    assert net(x, x).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 3, 30, 30), torch.zeros(1, 3, 30, 30))
    m = torch.tensor([[0, 1, 255]], dtype=torch.uint8)
    assert mask_to_target(m).tolist() == [[0, 1, 2]]
    probs = F.one_hot(mask_to_target(m), 3).permute(0, 2, 1).unsqueeze(-1).float()  # (1, 3, 3, 1)
    assert probs_to_mask(probs).squeeze(-1).tolist() == [[0, 1, 255]]


def test_model_file_round_trip(tmp_path):
    net = RefSelUNet(RefSelConfig(widths=(8, 16)))
    v = save_model(net, tmp_path / "m.safetensors")
    assert v.startswith("refsel-") and len(v) == 19
    # The version is a hash of the file, so the file must not depend on the process (metadata order)
    assert len({save_model(net, tmp_path / "m.safetensors", {"trained_on": 3}) for _ in range(5)}) == 1
    back = load_model(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(back(x, x), net.eval()(x, x))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope.safetensors")


def test_pool_grows_by_appending():
    keys = [f"k{i}" for i in range(50)]
    small, big = select_pool(keys, 10, 0), select_pool(keys, 20, 0)
    assert set(small) < set(big) and select_pool(keys, 10, 0) == small
    assert select_pool(keys, 10, 1) != small


def test_scores_and_per_type_table():
    truth = np.zeros((8, 8), np.uint8)
    truth[:, 0] = 255
    truth[2:4, 2:6] = 1  # 8 conflict pixels of 56 valid
    pred = truth.copy()
    pred[2, 2:6] = 0  # 4 missed
    s = scores(pred, truth)
    assert s["accuracy"] == pytest.approx(52 / 56) and s["iou"] == pytest.approx(0.5)

    class P:  # the fields per_type_report reads
        def __init__(self, kinds):
            self.truth, self.kinds = truth, kinds

    table = per_type_report([P(["mouth"]), P(["mouth", "eyes"]), P([])], np.stack([pred, truth, truth]))
    assert table["mouth"]["pairs"] == 2 and table["eyes"]["accuracy"] == 1.0
    assert table["none"]["pairs"] == 1 and table["all"]["pairs"] == 3
    assert table["mouth"]["conflict_recall"] == pytest.approx(12 / 16)


@pytest.mark.slow
def test_refsel_stage_trains_predicts_and_writes_shards(tmp_path):
    shards = make_pair_shards(tmp_path / "shards", identities=(8, 2, 3))
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "annotate": {"pool": 60, "double_fraction": 0.3},
                "refsel": {
                    "epochs": 25,
                    "widths": [16, 32, 64],
                    "batch_size": 16,
                    "review_max": 5,
                    "grid_samples": 3,
                },
            }
        )
    )
    env = {**__import__("os").environ, "REFFACE_PROGRESS": "0"}

    def run(*args):
        r = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    ann = tmp_path / "ann"
    run(
        "stages.annotate",
        "--params",
        str(params),
        "--shards",
        str(shards),
        "--out",
        str(ann),
        "--metrics",
        str(tmp_path / "a.json"),
    )
    out = tmp_path / "refsel"
    args = ["--params", str(params), "--shards", str(shards), "--annotate", str(ann), "--out", str(out)]
    args += ["--metrics", str(tmp_path / "r.json"), "--plot", str(tmp_path / "loss.csv")]
    run("stages.refsel", *args)
    m = json.loads((tmp_path / "r.json").read_text())
    loss = [float(line.split(",")[1]) for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert loss[-1] < 0.8 * loss[0]  # it learns (OHEM keeps the hardest pixels, so the loss stays high)
    all_row = m["per_type"]["all"]
    assert all_row["accuracy"] > m["baseline_no_conflict"]["all"]  # better than "no conflict anywhere"
    assert all_row["conflict_iou"] > 0.2
    assert m["masks"]["annotated"] == 60 and m["masks"]["predicted"] == (13 * 4 * 3) - 60
    assert m["review_queue"] <= 5
    validate_shards(out / "shards")
    provenance = set()
    for split in ("train", "val", "test"):
        for raw in iter_raw(shard_paths(out / "shards", split)):
            s = decode_sample(raw)
            assert all(mk is not None and set(np.unique(mk)) <= {0, 1, 255} for mk in s["masks"])
            assert s["meta"]["mask_model"] == m["model_version"]
            provenance |= set(s["meta"]["mask_provenance"])
    assert provenance == {"annotated", "predicted"}
    assert "| mouth |" in (out / "report.md").read_text() and (out / "predictions.png").is_file()

    # Same inputs, same bytes: a second run rewrites identical shards, model and review queue.
    def outputs():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = outputs()
    run("stages.refsel", *args)
    after = outputs()
    assert sorted(after) == sorted(before)
    assert [k for k in before if after[k] != before[k]] == []


def test_eval_sets_take_refsel_masks_where_the_source_has_none():
    """A reference without an exact conflict mask gets the refsel shard's mask and its provenance; an
    exact mask is never replaced."""
    import json

    from stages.eval_sets import with_masks

    meta = {"ref_count": 2, "mask_provenance": ["synthetic", None]}
    raw = {"__key__": "t0", "meta.json": json.dumps(meta).encode(), "refmask0.png": b"exact"}
    other = {
        "__key__": "t0",
        "meta.json": json.dumps({"ref_count": 2, "mask_provenance": ["annotated", "predicted"]}).encode(),
        "refmask0.png": b"refsel0",
        "refmask1.png": b"refsel1",
    }
    (out,), filled = with_masks([raw], {"t0": other})
    assert filled == 1 and out["refmask0.png"] == b"exact" and out["refmask1.png"] == b"refsel1"
    assert json.loads(out["meta.json"])["mask_provenance"] == ["synthetic", "predicted"]
    (same,), none = with_masks([raw], {})
    assert none == 0 and same is raw
