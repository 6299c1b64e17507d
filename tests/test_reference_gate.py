"""The reference gate (pipelines/reference_gate.py): its weight by definition, its fit, and that in a
restorer it scales the reference readout's Δ per image and nothing else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.pathways import sharpness_tensor
from pipelines.reference_gate import ReferenceGate, fit, sharpness, write_gate


def _images():
    """A flat image (s = 0), a smooth ramp and a checkerboard (very sharp), 32 px uint8 RGB."""
    flat = np.full((32, 32, 3), 128, np.uint8)
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 32)[None, :, None], 32, 0), 3, 2)
    ramp = (ramp + 40 * (np.indices((32, 32)).sum(0) % 2)[..., None]).clip(0, 255).astype(np.uint8)
    board = (255 * (np.indices((32, 32)).sum(0) % 2)).astype(np.uint8)[..., None].repeat(3, 2)
    return [flat, ramp, board]


def test_sharpness_is_the_mean_absolute_laplacian():
    flat, ramp, board = _images()
    s = sharpness([flat, ramp, board])
    assert s[0] == 0 and 0 < s[1] < s[2]
    # a checkerboard of 0/255: every interior pixel's 4-neighbour Laplacian is 4·255 in magnitude
    assert s[2] > 0.8 * 4 * 255


def test_the_torch_sharpness_is_the_opencv_one():
    rng = np.random.default_rng(0)
    noisy = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    images = _images() + noisy
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    np.testing.assert_allclose(sharpness_tensor(x).double().numpy(), sharpness(images), atol=5e-3, rtol=1e-4)


def test_alpha_by_definition():
    imgs = _images()
    s = sharpness(imgs)
    gate = ReferenceGate(sharp=float(s[2]), blurred=float(s[0]))
    a = gate.alpha(imgs)
    assert a.dtype == np.float32 and a.shape == (3,)
    assert a[0] == 1.0 and a[2] == 0.0
    assert a[1] == pytest.approx((s[2] - s[1]) / (s[2] - s[0]), abs=1e-6)
    # outside [blurred, sharp] it is clipped
    assert (ReferenceGate(sharp=0.5, blurred=0.1).alpha(imgs[1:]) == 0).all()
    assert (ReferenceGate(sharp=1e6, blurred=1e5).alpha(imgs) == 1).all()


def test_round_trip_and_a_bad_record():
    g = ReferenceGate(9.8, 4.3)
    assert ReferenceGate.from_dict(json.loads(json.dumps(g.as_dict()))) == g
    with pytest.raises(ValueError, match="unknown statistic 'entropy'"):
        ReferenceGate.from_dict({"statistic": "entropy", "sharp": 1.0, "blurred": 0.5})


def _total(gate, s, delta):
    sv = np.concatenate([s[k] for k in sorted(s)])
    dv = np.concatenate([delta[k] for k in sorted(s)])
    return float((gate.alpha_of(sv) * dv).sum())


def test_fit_takes_the_threshold_with_the_largest_validation_gain():
    rng = np.random.default_rng(0)
    s = {"mild": np.exp(rng.uniform(2.0, 3.5, 80)), "severe": np.exp(rng.uniform(0.8, 2.2, 80))}
    a, b = 0.03, -0.013  # δ = a + b·log s: references help below s = exp(a / 0.013) ≈ 10.1
    delta = {k: a + b * np.log(v) + rng.normal(0, 0.002, v.size) for k, v in s.items()}
    gate, rec = fit(s, delta)
    assert gate.blurred == pytest.approx(min(np.median(v) for v in s.values()))
    # the least-squares line is recorded beside the gate
    assert rec["slope_per_log_s"] == pytest.approx(b, abs=2e-3) and rec["intercept"] == pytest.approx(
        a, abs=5e-3
    )
    # no threshold on a fine grid (nor full weight) gains the validation targets more than the chosen one
    best = _total(gate, s, delta)
    assert rec["gain_gated"] == pytest.approx(best, abs=1e-6) and best > rec["gain_open"]
    for t in np.linspace(gate.blurred, 40.0, 400):
        assert _total(ReferenceGate(float(t), gate.blurred), s, delta) <= best + 1e-9
    # the gate opens below where the references stop helping and closes above it
    assert 10.1 < gate.sharp < 40.0


def test_fit_does_not_open_where_no_target_gains():
    """Two clusters, as two evaluation presets give: a line through them crosses zero between the
    clusters (here at s ≈ 10), where the mildly degraded targets at s 9–11 lose. The largest total gain
    alone would open the gate over them too (the severe targets gain more than they lose); the fit keeps
    every preset's mean gain at or above zero, so it gives them no weight, and no threshold that loses no
    preset gains more."""
    rng = np.random.default_rng(1)
    severe = rng.uniform(3.0, 6.0, 90)
    mild = np.concatenate([rng.uniform(9.0, 11.0, 10), rng.uniform(15.0, 40.0, 80)])
    s = {"mild": mild, "severe": severe}
    delta = {"mild": np.full(mild.size, -0.02), "severe": np.full(severe.size, 0.02)}
    gate, rec = fit(s, delta)
    crossing = np.exp(-rec["intercept"] / rec["slope_per_log_s"])
    assert crossing > 9.0  # the line's zero lies among the mild targets that lose

    def mild_mean(g):
        return float((g.alpha_of(mild) * delta["mild"]).mean())

    line = ReferenceGate(float(crossing), gate.blurred)
    assert mild_mean(line) < 0
    grid = [ReferenceGate(float(t), gate.blurred) for t in np.linspace(gate.blurred, 40.0, 400)]
    greedy = max(grid, key=lambda g: _total(g, s, delta))  # the largest total gain, presets ignored
    assert _total(greedy, s, delta) > _total(gate, s, delta) and mild_mean(greedy) < 0
    # the fit: no weight on the mild targets, every preset's mean gain >= 0, the best such threshold
    assert (gate.alpha_of(mild) == 0).all() and rec["mean_gain_gated"]["mild"] == 0.0
    assert rec["mean_gain_gated"]["severe"] > 0
    assert all(_total(g, s, delta) <= _total(gate, s, delta) + 1e-9 for g in grid if mild_mean(g) >= 0)
    assert (gate.alpha_of(severe[severe <= gate.blurred]) == 1).all()


def test_fit_edge_cases():
    s = {"a": np.array([2.0, 4.0, 8.0]), "b": np.array([16.0, 32.0, 64.0])}
    # references help everywhere: full weight gains most, no gate
    assert fit(s, {k: np.full(3, 0.01) for k in s})[0] is None
    # they help more on sharper inputs: no gate
    assert fit(s, {k: 0.001 * np.log(v) for k, v in s.items()})[0] is None
    # full weight gains most in total but loses preset b: a gate that gives b's inputs no weight
    g, rec = fit(s, {"a": np.full(3, 0.03), "b": np.full(3, -0.01)})
    assert g is not None and (g.alpha_of(s["b"]) == 0).all() and rec["gain_open"] > 0
    assert rec["mean_gain_gated"]["b"] == 0.0 and rec["mean_gain_gated"]["a"] > 0
    # they hurt everywhere: the gate is shut (α = 0 on every input)
    shut, rec = fit(s, {k: np.full(3, -0.01) for k in s})
    assert shut == ReferenceGate(0.0, 0.0) and (shut.alpha_of(np.array([0.5, 3.0, 100.0])) == 0).all()
    assert rec["gain_gated"] == 0.0
    # a tie keeps the stricter gate: only the bluriest target gains, every threshold up to the next
    # target's sharpness gains the same
    g, _ = fit({"a": np.array([1.0, 5.0, 9.0])}, {"a": np.array([0.02, -0.01, -0.01])})
    assert g.blurred == 5.0 and g.sharp == 5.0
    # one point: it is the median, a step there
    one, _ = fit({"x": np.array([3.0])}, {"x": np.array([0.1])})
    assert one is None  # its gain is full weight's


@pytest.fixture(scope="module")
def restorer(tmp_path_factory):
    """A tiny bundle's restorer whose reference readout gives a clearly visible Δ."""
    from conftest import write_tiny_bundle

    from pipelines.restorer import Restorer

    bundle = write_tiny_bundle(tmp_path_factory.mktemp("gate"))
    r = Restorer(bundle)
    fuse = r.module.net.ref_fuse
    assert fuse is not None, "the tiny bundle has no reference readout"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fuse.out.weight.copy_(torch.randn(fuse.out.weight.shape, generator=g) * 0.5)
    return r


def test_the_gate_scales_the_reference_readout_per_image(restorer, tmp_path):
    r = restorer
    imgs = _images()
    lq = [imgs[0], imgs[2]]  # α = 1 (flat) and α = 0 (sharp)
    rng = np.random.default_rng(1)
    refs = [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)] for _ in lq]
    s = sharpness(lq)
    assert r.gate is None
    full = r.restore_batch(lq, refs)  # no gate in the bundle: full weight
    blind = r.restore_batch(lq, [[] for _ in lq])
    assert not np.array_equal(full, blind)

    r.gate = ReferenceGate(sharp=float(s[1]), blurred=float(s[0]))
    try:
        gated = r.restore_batch(lq, refs)
        assert np.array_equal(r.restore_batch(lq, refs, gate=False), full)
        assert np.array_equal(r.restore_batch(lq, [[] for _ in lq]), blind)  # blind: nothing to weigh
        fuse = r.module.net.ref_fuse
        w = fuse.out.weight.detach().clone()
        with torch.no_grad():
            fuse.out.weight.zero_()
        try:
            no_readout = r.restore_batch(lq, refs, gate=False)
        finally:
            with torch.no_grad():
                fuse.out.weight.copy_(w)
    finally:
        r.gate = None
    assert np.array_equal(gated[0], full[0])  # α = 1: exactly the readout's Δ
    # α = 0: the image's references are left out, not only their Δ: it is restored blind (in the same
    # batch as the other image's references, so compared with that batch exactly, and with the blind
    # batch to the float rounding of the longer, masked attention rows)
    assert np.array_equal(gated, r.restore_batch(lq, [refs[0], []], gate=False))
    assert np.abs(gated[1].astype(int) - blind[1]).max() <= 1
    assert not np.array_equal(gated[1], no_readout[1]) and not np.array_equal(gated[1], full[1])


def test_a_shut_gate_restores_exactly_as_blind_and_keeps_the_masks_in_step(restorer):
    """Every image shut (α = 0): the references and their masks are left out, the batch is the blind one."""
    r = restorer
    imgs = _images()
    lq = [imgs[1], imgs[2]]
    rng = np.random.default_rng(3)
    refs = [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)] for _ in lq]
    masks = [[np.zeros((32, 32), np.uint8)] for _ in lq]
    blind = r.restore_batch(lq, [[] for _ in lq])
    r.gate = ReferenceGate(sharp=0.5, blurred=0.25)  # every textured input: α = 0
    try:
        assert (r.gate.alpha(lq) == 0).all()
        assert np.array_equal(r.restore_batch(lq, refs), blind)
        assert np.array_equal(r.restore_batch(lq, refs, ref_masks=masks), blind)
        assert r.last_masks == {"source": "none"}
        assert not np.array_equal(r.restore_batch(lq, refs, gate=False), blind)
    finally:
        r.gate = None


def test_chunks_the_gate_shuts_entirely_are_taken_from_the_blind_restorations(restorer, monkeypatch):
    """restore_in_batches(blind=...), as evaluation calls it: a chunk whose every image is shut is the
    blind mode's chunk, bytewise what restoring it gives; a chunk with an open image is restored."""
    r = restorer
    flat, ramp, board = _images()
    lq = [ramp, board, flat, board]  # chunks of 2: both shut | one open (flat: α = 1)
    rng = np.random.default_rng(4)
    refs = [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)] for _ in lq]
    r.gate = ReferenceGate(sharp=0.5, blurred=0.25)
    try:
        assert r.shut(lq).tolist() == [True, True, False, True]
        blind = r.restore_in_batches(lq, [[] for _ in lq], 2)
        want = r.restore_in_batches(lq, refs, 2)
        calls = []
        restore_batch = r.restore_batch
        monkeypatch.setattr(r, "restore_batch", lambda *a, **k: calls.append(a[0]) or restore_batch(*a, **k))
        got = r.restore_in_batches(lq, refs, 2, blind=blind)
        assert np.array_equal(got, want) and len(calls) == 1 and calls[0][0] is flat
        calls.clear()  # the gate open (calibration): nothing is taken from the blind restorations
        assert np.array_equal(
            r.restore_in_batches(lq, refs, 2, gate=False, blind=blind),
            r.restore_in_batches(lq, refs, 2, gate=False),
        )
        assert len(calls) == 4
    finally:
        r.gate = None
    assert not r.shut(lq).any()


def test_a_gate_written_to_the_bundle_is_read_back(tmp_path):
    from conftest import write_tiny_bundle

    from pipelines.restorer import Restorer

    bundle = write_tiny_bundle(tmp_path)
    write_gate(bundle, ReferenceGate(9.5, 4.25))
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["reference_gate"] == {"statistic": "sharpness", "sharp": 9.5, "blurred": 4.25}
    assert Restorer(bundle).gate == ReferenceGate(9.5, 4.25)


def test_refface_restore_follows_the_bundles_gate_unless_told_not_to(tmp_path):
    """The CLI restores as the report measured (the bundle's gate), and `--no-gate` at full weight."""
    from conftest import write_tiny_bundle
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from models.lora import PATHWAYS_FILE
    from pipelines.restorer import Restorer
    from stages.cli import main

    bundle = write_tiny_bundle(tmp_path)
    f = bundle / "model" / PATHWAYS_FILE
    w = load_file(f)
    key = next(k for k in w if "ref_fuse.out.weight" in k)
    w[key] = torch.randn(w[key].shape, generator=torch.Generator().manual_seed(0)) * 0.5
    save_file(w, f)
    write_gate(bundle, ReferenceGate(sharp=1.0, blurred=0.5))  # any textured photo: α = 0
    rng = np.random.default_rng(2)
    lq, ref = (rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(lq).save(tmp_path / "lq.png")
    Image.fromarray(ref).save(tmp_path / "ref.png")
    args = ["restore", "--aligned", str(tmp_path / "lq.png"), "--ref", str(tmp_path / "ref.png")]
    args += ["--model", str(bundle)]
    main([*args, "--out", str(tmp_path / "gated.png")])
    main([*args, "--out", str(tmp_path / "full.png"), "--no-gate"])
    gated, full = (np.asarray(Image.open(tmp_path / n)) for n in ("gated.png", "full.png"))
    r = Restorer(bundle)
    assert np.array_equal(gated, r.restore(lq, [ref], colour=True))
    assert np.array_equal(full, r.restore(lq, [ref], colour=True, gate=False))
    assert not np.array_equal(gated, full)


def test_no_validation_target_with_a_reference_means_no_gate_and_the_report_says_why(tmp_path):
    """calibrate on a validation split whose targets have no reference: no gate (α = 1), a reason in the
    record, and the report's paragraph gives it; nothing is restored."""
    import hashlib
    from pathlib import Path

    from conftest import make_shards

    from pipelines.reference_gate import calibrate
    from pipelines.set_evaluation import gate_lines
    from pipelines.shards import INDEX_NAME

    root = tmp_path / "shards"
    paths = make_shards(root, 4, refs=0, per_shard=4, split="val")
    entries = [
        {
            "name": Path(p).name,
            "samples": 4,
            "bytes": Path(p).stat().st_size,
            "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest(),
        }
        for p in paths
    ]
    index = {"format_version": 1, "splits": {"val": {"samples": 4, "shards": entries}}}
    (root / INDEX_NAME).write_text(json.dumps(index))

    class NoRestore:  # calibrate must stop before restoring anything
        def restore_in_batches(self, *a, **k):
            raise AssertionError("restored without a target to fit on")

    gate, record = calibrate(NoRestore(), str(root), {"severe": "refldm_severe"}, 0, 0, 0.0)
    assert gate is None and record["gate"] is None
    assert "has no target with a reference to fit the gate on" in record["reason"]
    (line,) = [x for x in gate_lines(record) if x]
    assert line.startswith("References keep their full weight: no reference gate") and str(root) in line


def test_the_gates_own_effect_is_a_paired_row_apart_from_the_blind_comparisons():
    from pipelines.set_evaluation import GATED_VS_OPEN, SetResult, markdown, paired_rows, row_means

    rng = np.random.default_rng(0)
    n = 30

    def row(gt_id, psnr):
        return {
            "gt_id": gt_id,
            "psnr": psnr,
            "ssim": np.full(n, 0.9),
            "copy_score": np.full(n, np.nan),
            "ref_id_primary": np.full(n, 0.5),
            "ref_id_evaluator": np.full(n, 0.5),
        }

    base = rng.normal(0.8, 0.01, n)
    values = {
        "no reference": row(base, np.full(n, 30.0)),
        "1 reference": row(base + 0.001, np.full(n, 30.0)),
        "1 reference - gate open": row(base - 0.01, np.full(n, 29.0) + rng.normal(0, 0.01, n)),
        "1 reference of another person": row(base, np.full(n, 30.0)),
    }
    res = SetResult([], values, {}, "1 reference of another person", 1)
    paired = paired_rows(res, ("gt_id", "psnr"), seed=0)
    g = paired[GATED_VS_OPEN]
    assert list(g) == ["1 reference"]
    assert (
        g["1 reference"]["gt_id"]["verdict"] == "higher" and g["1 reference"]["psnr"]["verdict"] == "higher"
    )
    assert abs(g["1 reference"]["gt_id"]["diff"] - 0.011) < 1e-6
    results = {"severe": {k: row_means(v) for k, v in values.items()}}
    text = markdown(results, {"severe": paired}, {}, "m", 0)
    assert "The gate's own effect" in text and "| 1 reference | +0.0110" in text
    assert f"| {GATED_VS_OPEN} |" not in text  # not listed among the differences to the blind mode


def test_a_bundle_with_the_degradation_embedding_restores_by_its_inputs_sharpness(tmp_path):
    """train.degradation_embed through the product's path: the bundle is built from its train config,
    the module computes each input's log-sharpness (sharpness_tensor) and the model reads it."""
    from conftest import write_tiny_bundle

    from pipelines.restorer import Restorer

    r = Restorer(write_tiny_bundle(tmp_path, degradation_embed=True))
    emb = r.module.net.deg_embed
    assert emb is not None
    flat, _, board = _images()
    lq = [flat, board]
    before = r.restore_batch(lq, [[], []])
    with torch.no_grad():
        emb.out.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    after = r.restore_batch(lq, [[], []])
    assert not np.array_equal(before, after)  # the embedding reaches the output
