"""Evaluation metrics, the evaluate stage, registration with the promotion gate, `refface restore`
through the registry and the same model served by `mlflow models serve` on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_pair_shards, write_encoders
from PIL import Image

from pipelines.evaluation import copy_score, psnr_u8, ssim_u8
from pipelines.registry import Gate, blocking, decide, decode_image
from pipelines.restorer import InputError, check_image
from pipelines.viz import change_map

ROOT = Path(__file__).resolve().parents[1]


def test_psnr_ssim_by_their_definitions():
    r = np.random.default_rng(0)
    a = r.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    assert np.allclose(ssim_u8(a, a), 1.0) and np.isinf(psnr_u8(a, a)).sum() == 0
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(1)
    np.testing.assert_allclose(psnr_u8(a, b), 10 * np.log10(255**2 / mse))
    # A constant shift keeps structure: SSIM high; noise destroys it.
    noisy = np.clip(a.astype(int) + r.normal(0, 60, a.shape), 0, 255).astype(np.uint8)
    assert ssim_u8(a, b).mean() > 0.9 > ssim_u8(a, noisy).mean()


def test_ssim_is_the_2d_gaussian_window_ssim():
    """The separable filter gives the SSIM of the 11x11 Gaussian window (sigma 1.5, valid positions)
    written out directly, to float64 rounding: the values evaluation has always reported."""
    r = np.random.default_rng(1)
    a = r.integers(0, 256, (2, 20, 18, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + r.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    x1 = np.arange(11) - 5.0
    g1 = np.exp(-(x1**2) / (2 * 1.5**2))
    w = np.outer(g1, g1) / g1.sum() ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    want = np.zeros(len(a))
    for n in range(len(a)):
        for ch in range(3):
            x, y = a[n, :, :, ch].astype(np.float64), b[n, :, :, ch].astype(np.float64)
            vals = []
            for i in range(x.shape[0] - 10):
                for j in range(x.shape[1] - 10):
                    px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                    mx, my = (w * px).sum(), (w * py).sum()
                    sxx = (w * px * px).sum() - mx**2
                    syy = (w * py * py).sum() - my**2
                    sxy = (w * px * py).sum() - mx * my
                    vals.append(
                        ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
                    )
            want[n] += np.mean(vals) / 3
    np.testing.assert_allclose(ssim_u8(a, b), want, rtol=0, atol=1e-12)


def test_copy_score_extremes():
    tgt = np.zeros((8, 8, 3), np.uint8)
    ref = np.full((8, 8, 3), 200, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 1
    assert copy_score(tgt, tgt, ref, mask) == 0.0
    assert copy_score(ref, tgt, ref, mask) == 1.0
    half = tgt.copy()
    half[2:4, 2:6] = 200
    assert copy_score(half, tgt, ref, mask) == 0.5
    assert copy_score(tgt, tgt, tgt, mask) is None  # reference and target do not differ there


def test_change_map_shows_where_and_how_much_two_outputs_differ():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[1, 2] = 110  # |d| = 10 -> 10 * 4 / 255 of full scale: dark red
    b[5, 5] = 255  # |d| = 155 -> saturates (x4): white
    m = change_map(a, b)
    assert m.shape == (8, 8, 3) and m.dtype == np.uint8
    assert (m[a[..., 0] == b[..., 0]] == 0).all()  # unchanged pixels are black
    assert m[1, 2, 0] == round(255 * 3 * 40 / 255) and m[1, 2, 1] == m[1, 2, 2] == 0
    assert (m[5, 5] == 255).all()
    assert (change_map(b, a) == m).all()  # symmetric
    with pytest.raises(ValueError, match="shapes differ"):
        change_map(a, b[:4])


def test_gate_rules():
    """The primary is compared paired with an interval; guards on means."""
    g = Gate("s/1 reference/ref_id", 0.0, {"s/1 reference/psnr": 0.3, "s/1 reference/copy_score": 0.05})
    champ = {"s/1 reference/ref_id": 0.5, "s/1 reference/psnr": 20.0, "s/1 reference/copy_score": 0.2}
    base = np.linspace(0.3, 0.7, 30)

    def targets(values, keys=None):
        keys = keys or [f"t{i}" for i in range(len(values))]
        return {"s": {"keys": keys, "rows": {"1 reference": {"ref_id": list(values)}}}}

    up = targets(base + 0.05)
    assert decide(champ, None, g)[0]
    assert decide({**champ, "s/1 reference/psnr": 19.8}, champ, g, up, targets(base))[0]
    ok, why = decide({**champ, "s/1 reference/psnr": 19.5}, champ, g, up, targets(base))
    assert not ok and any("regresses by 0.5000 > 0.3" in w for w in why)
    # what refused it is named apart from the checks that passed (the stage's one-line summary)
    assert blocking(why) == [w for w in why if "s/1 reference/psnr" in w] and "above min_gain" in why[0]
    assert blocking(decide({**champ, "s/1 reference/psnr": 19.8}, champ, g, up, targets(base))[1]) == []
    ok, why = decide({**champ, "s/1 reference/copy_score": 0.3}, champ, g, up, targets(base))
    assert not ok and any("copy_score" in w and "regresses" in w for w in why)  # lower is better
    # LPIPS is a guard like any metric, lower is better (pipelines.quality)
    gl = Gate(g.primary, 0.0, {"s/1 reference/lpips": 0.01})
    ok, why = decide(
        {**champ, "s/1 reference/lpips": 0.25}, {**champ, "s/1 reference/lpips": 0.2}, gl, up, targets(base)
    )
    assert not ok and any("lpips" in w and "regresses by 0.0500" in w for w in why)
    assert decide(
        {**champ, "s/1 reference/lpips": 0.15}, {**champ, "s/1 reference/lpips": 0.2}, gl, up, targets(base)
    )[0]
    # inside the noise: the interval includes zero, so no promotion
    noisy = targets(base + np.where(np.arange(30) % 2, 0.05, -0.05))
    ok, why = decide(champ, champ, g, noisy, targets(base))
    assert not ok and "no demonstrated gain" in why[0] and "[" in why[0]
    assert not decide(champ, champ, g, targets(base - 0.05), targets(base))[0]
    # not comparable: other targets, or no per-target values
    ok, why = decide(champ, champ, g, targets(base + 0.05, [f"u{i}" for i in range(30)]), targets(base))
    assert not ok and "different targets" in why[0]
    assert not decide(champ, champ, g, None, targets(base))[0]


def test_bad_inputs_name_what_is_wrong(tmp_path):
    # grayscale photos are restored: replicated to three channels
    grey = check_image(np.full((64, 64), 7, np.uint8), "lq")
    assert grey.shape == (64, 64, 3) and (grey == 7).all()
    with pytest.raises(InputError, match="too small"):
        check_image(np.zeros((16, 16, 3), np.uint8), "lq")
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable image"):
        check_image(tmp_path / "x.png", "lq")
    with pytest.raises(InputError, match="does not exist"):
        check_image(tmp_path / "y.png", "lq")
    with pytest.raises(InputError, match="not a base64-encoded image"):
        decode_image("%%%", "row 0 lq")
    buf = io.BytesIO()
    Image.new("L", (64, 64), 9).save(buf, format="PNG")
    assert (decode_image(base64.b64encode(buf.getvalue()).decode(), "row 0 lq") == 9).all()


# ---- end to end -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(out: Path, seed: int, params: dict) -> None:
    from models.lora import save_trainable
    from pipelines.config import TrainConfig, build
    from pipelines.network import build_network

    cfg = build(TrainConfig, {**params["train"], "seed": seed, "front": None}, "train")
    net, _, _ = build_network(cfg, 512)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    save_trainable(net, out)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    shards = make_pair_shards(tmp / "shards", identities=(2, 1, 2))
    enc = write_encoders(tmp / "encoders")
    params = {
        "embed": {"encoder": "small_ir", "checkpoint": str(enc / "primary.safetensors")},
        "shards": {"resolution": 32},
        "train": {
            "backbone": "tiny",
            "pixel_patch": 4,
            "memory_tokens": 8,
            "train_backbone": True,
            "prediction": "x0_residual",
            "front_end": 8,  # a front end inside the bundle (its weights in model/, not train.front)
            "front": "/nonexistent/front.safetensors",
        },
        "evaluate": {"samples": 0, "steps": 2, "front_probe_steps": 1, "batch_size": 8, "grid_samples": 2},
        "register": {"model_name": "refface-test", "experiment": "refface-test"},
    }
    pp = tmp / "params.yaml"
    pp.write_text(yaml.safe_dump(params))
    env = {**os.environ, "REFFACE_PROGRESS": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.eval_sets",
            "--params",
            str(pp),
            "--shards",
            str(shards),
            "--out",
            str(tmp / "eval_sets"),
            "--metrics",
            str(tmp / "es.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    _tiny_model(tmp / "model", 0, params)
    return tmp, pp, params, env


def _run(env, cwd, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _evaluate(tmp, pp, env, model: Path, tag: str):
    r = _run(
        env,
        ROOT,
        "stages.evaluate",
        "--params",
        str(pp),
        "--eval-sets",
        str(tmp / "eval_sets"),
        "--shards",
        str(tmp / "shards"),
        "--model",
        str(model),
        "--encoders",
        str(tmp / "encoders"),
        "--out",
        str(tmp / f"ev_{tag}"),
        "--metrics",
        str(tmp / f"ev_{tag}.json"),
        "--report",
        str(tmp / f"ev_{tag}.md"),
        "--plot",
        str(tmp / f"ev_{tag}.csv"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / f"ev_{tag}.json").read_text())


def _register(tmp, pp, env, tag: str, metrics: Path):
    r = _run(
        env,
        tmp,
        "stages.register",
        "--params",
        str(pp),
        "--evaluate",
        str(tmp / f"ev_{tag}"),
        "--metrics-in",
        str(metrics),
        "--report",
        str(tmp / f"promo_{tag}.md"),
        "--metrics",
        str(tmp / f"reg_{tag}.json"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / f"reg_{tag}.json").read_text())


@pytest.mark.slow
def test_evaluate_register_gate_restore_and_serve(project):
    tmp, pp, params, env = project
    m = _evaluate(tmp, pp, env, tmp / "model", "a")
    # the reference gate, fitted on the validation split under both sets' presets (tests/test_reference_gate.py)
    gate = m["reference_gate"]
    assert set(gate["sets"]) == {"moderate", "severe"} and all(v["n"] > 0 for v in gate["sets"].values())
    bundle_gate = json.loads((tmp / "ev_a" / "bundle" / "bundle.json").read_text()).get("reference_gate")
    assert bundle_gate == gate["gate"]  # None: the fit found no gate, and the bundle has none
    open_rows = {"1 reference - gate open", "3 references - gate open"} if gate["gate"] else set()
    for name in ("moderate", "severe"):
        rows = m["sets"][name]
        assert set(rows) == open_rows | {
            "degraded input",
            "front end alone",  # the bundle's model has a front end
            "no reference",
            "no reference - 1 sampler step",  # evaluate.front_probe_steps: against the front end alone
            "1 reference",
            "2 references",
            "3 references",
            "3 references of another person",
        }
        n = rows["degraded input"]["n"]
        assert n >= 2 and all(r["n"] == n for r in rows.values())  # every row on the same targets
        assert rows["1 reference"]["copy_pairs"] > 0 and 0 <= rows["1 reference"]["copy_score"] <= 1
        assert -1 <= rows["1 reference"]["ref_id_evaluator"] <= 1 and rows["degraded input"]["psnr"] > 10
        # the front end was saved at its initialisation (the identity): its row equals the degraded input
        assert rows["front end alone"]["psnr"] == rows["degraded input"]["psnr"]
        d = m["paired"][name]["1 reference"]["gt_id"]
        assert (
            d["lo"] <= d["diff"] <= d["hi"]
            and d["n"] == n
            and d["verdict"]
            in (
                "higher",
                "lower",
                "no difference",
            )
        )
    assert set(m["not_computed"]) == {"lpips", "dists", "musiq", "clipiqa", "maniqa", "fid"}
    report = (tmp / "ev_a.md").read_text()
    assert "| degraded input |" in report and "## severe" in report
    assert "lpips: no local weights: set evaluate.weights.lpips to torchvision's AlexNet" in report
    assert "Paired differences to the blind mode" in report and "3 references of another person" in report
    assert "References are weighed by the reference gate" in report
    # the transformer against the front end alone, paired, at the report's steps and at front_probe_steps
    from pipelines.set_evaluation import BLIND_VS_FRONT

    vs_front = m["paired"]["severe"][BLIND_VS_FRONT]
    assert set(vs_front) == {"no reference", "no reference - 1 sampler step"}
    d = vs_front["no reference"]["psnr"]
    assert (
        d["diff"] == pytest.approx(rows["no reference"]["psnr"] - rows["front end alone"]["psnr"], abs=0.01)
        and d["lo"] <= d["diff"] <= d["hi"]
    )
    assert "The transformer against the front end alone" in report
    if gate["gate"]:  # the gate's own effect, paired: gated − gate open on the same targets
        from pipelines.set_evaluation import GATED_VS_OPEN

        assert set(m["paired"]["severe"][GATED_VS_OPEN]) == {"1 reference", "3 references"}
        assert "The gate's own effect" in report
    assert (tmp / "ev_a" / "grid_severe.png").is_file()
    targets = json.loads((tmp / "ev_a" / "per_target.json").read_text())
    primary = targets["severe"]["rows"]["1 reference"]["gt_id"]
    assert len(primary) == len(targets["severe"]["keys"]) == m["sets"]["severe"]["1 reference"]["n"]

    def with_primary(src: str, dst: str, shift) -> None:
        """A copy of evaluation `src` whose per-target primary metric is the champion's + shift."""
        if src != dst:
            shutil.copytree(tmp / f"ev_{src}", tmp / f"ev_{dst}", dirs_exist_ok=True)
        t = json.loads((tmp / f"ev_{src}" / "per_target.json").read_text())
        t["severe"]["rows"]["1 reference"]["gt_id"] = [v + shift(i) for i, v in enumerate(primary)]
        (tmp / f"ev_{dst}" / "per_target.json").write_text(json.dumps(t))

    # First model: champion. A worse one: challenger only. One inside the noise: refused (paired, the
    # interval includes zero). A better one: champion.
    assert _register(tmp, pp, env, "a", tmp / "ev_a.json")["decision"] == "promoted"
    _tiny_model(tmp / "model_b", 1, params)
    mb = _evaluate(tmp, pp, env, tmp / "model_b", "b0")
    with_primary("b0", "b", lambda i: -0.1)
    rb = _register(tmp, pp, env, "b", tmp / "ev_b0.json")
    assert rb["decision"] == "rejected" and rb["version"] == 2
    promo = (tmp / "promo_b.md").read_text()
    assert "REJECTED" in promo and "paired targets" in promo and "no demonstrated gain" in promo
    assert mb["sets"]["severe"]["1 reference"]["n"] == len(primary)
    shutil.copytree(tmp / "ev_a", tmp / "ev_n")
    _tiny_model(tmp / "ev_n" / "bundle" / "model", 3, params)
    with_primary("n", "n", lambda i: 0.05 if i % 2 else -0.05)
    rn = _register(tmp, pp, env, "n", tmp / "ev_a.json")
    assert rn["decision"] == "rejected" and "no demonstrated gain" in (tmp / "promo_n.md").read_text()
    shutil.copytree(tmp / "ev_a", tmp / "ev_c")
    _tiny_model(tmp / "ev_c" / "bundle" / "model", 2, params)  # another set of weights
    with_primary("c", "c", lambda i: 0.1)
    assert _register(tmp, pp, env, "c", tmp / "ev_a.json") == {
        **json.loads((tmp / "reg_c.json").read_text()),
        "decision": "promoted",
        "version": 4,
    }

    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        c = MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert str(c.get_model_version_by_alias("refface-test", "champion").version) == "4"
        assert str(c.get_model_version_by_alias("refface-test", "challenger").version) == "4"
        assert c.get_model_version("refface-test", "2").tags["gate_decision"] == "rejected"
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)

    # refface restore through the registry, with and without references.
    sample = next(
        iter(__import__("pipelines.refsel", fromlist=["iter_pairs"]).iter_pairs(tmp / "shards", "test"))
    )
    Image.fromarray(sample.gt).save(tmp / "lq.png")
    Image.fromarray(sample.ref).save(tmp / "ref.png")
    for refs in ([], ["--ref", str(tmp / "ref.png")]):
        r = _run(
            env,
            tmp,
            "stages.cli",
            "restore",
            "--aligned",  # these are aligned crops of the synthetic album
            str(tmp / "lq.png"),
            *refs,
            "--out",
            str(tmp / "out.png"),
            "--model",
            "models:/refface-test@champion",
            "--side-by-side",
            str(tmp / "sbs.png"),
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert Image.open(tmp / "out.png").size == (32, 32) and Image.open(tmp / "sbs.png").size[0] > 64
    r = _run(
        env,
        tmp,
        "stages.cli",
        "restore",
        "--aligned",
        str(tmp / "lq.png"),
        "--out",
        str(tmp / "o.png"),
        "--model",
        "models:/refface-test@nobody",
    )
    assert r.returncode == 2 and "alias nobody not found" in r.stderr
    r = _run(
        env,
        tmp,
        "stages.cli",
        "restore",
        "--aligned",
        str(tmp / "lq.png"),
        *["--ref", str(tmp / "ref.png")] * 4,
        "--out",
        str(tmp / "o.png"),
    )
    assert r.returncode == 2 and "at most 3" in r.stderr

    # Several photos in one call: a folder (one bad file among them) into an output folder, model loaded once.
    album = tmp / "album"
    album.mkdir()
    for i in range(3):
        Image.fromarray(sample.gt).save(album / f"p{i}.png")
    (album / "broken.png").write_bytes(b"not a png")
    r = _run(
        env,
        tmp,
        "stages.cli",
        "restore",
        "--aligned",
        str(album),
        "--ref",
        str(tmp / "ref.png"),
        "--out",
        str(tmp / "outs"),
        "--model",
        "models:/refface-test@champion",
    )
    assert r.returncode == 2 and "broken.png" in r.stderr  # named, and the others restored
    assert sorted(p.name for p in (tmp / "outs").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert "[4/4]" in r.stdout + r.stderr and "restored 3 of 4 photo(s)" in r.stdout
    # No tracking URI and no ./mlflow.db: a clear error naming the command, and no database created.
    bare = tmp / "bare"
    bare.mkdir()
    no_uri = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    r = _run(no_uri, bare, "stages.cli", "restore", str(tmp / "lq.png"), "--out", str(bare / "o.png"))
    assert r.returncode == 2 and "dvc repro" in r.stderr and not (bare / "mlflow.db").exists()
    r = _run(
        no_uri,
        bare,
        "stages.cli",
        "restore",
        str(tmp / "lq.png"),
        "--out",
        str(bare / "o.png"),
        "--model",
        str(bare / "missing_bundle"),
    )
    assert r.returncode == 2 and "no such bundle folder" in r.stderr and not (bare / "mlflow.db").exists()

    # The same model served over HTTP on loopback.
    port = _free_port()
    serve_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/refface-test@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=tmp,
        env=serve_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    import httpx

    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        lq, ref = (base64.b64encode((tmp / n).read_bytes()).decode() for n in ("lq.png", "ref.png"))
        body = {"dataframe_split": {"columns": ["lq", "ref1"], "data": [[lq, ref], [lq, ""]]}}
        resp = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert resp.status_code == 200, resp.text[-2000:]
        preds = resp.json()["predictions"]
        assert len(preds) == 2
        img = Image.open(io.BytesIO(base64.b64decode(preds[0]["restored"])))
        assert img.size == (32, 32) and img.mode == "RGB"
        bad = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_split": {"columns": ["lq"], "data": [["%%%"]]}},
            timeout=60,
        )
        assert bad.status_code >= 400 and "not a base64-encoded image" in bad.text
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_evaluate_with_weight_metrics(project):
    """LPIPS (alex) and DISTS from files written in their official formats: a column per row, paired
    intervals against the blind mode, the files named with their sha256; a truncated file is reported as
    not computed, naming it, and the evaluation goes on."""
    import torch
    from test_iqa import torchvision_file

    from pipelines import iqa

    tmp, pp, params, env = project
    w = tmp / "weights"
    w.mkdir(exist_ok=True)
    torch.manual_seed(0)
    alex = torchvision_file(w / "alexnet-owt-7be5be79.pth", iqa.AlexNetFeatures())
    vgg = torchvision_file(w / "vgg16-397923af.pth", iqa.VGG16Features())
    (w / "heads").mkdir(exist_ok=True)
    chans = (64, 192, 384, 256, 256)
    torch.save(
        {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(chans)},
        w / "heads" / "alex.pth",
    )
    torch.save({"alpha": torch.rand(1, 1475, 1, 1), "beta": torch.rand(1, 1475, 1, 1)}, w / "dists.pt")
    cut = w / "cut.pt"
    cut.write_bytes((w / "dists.pt").read_bytes()[:100])
    weights = {
        "lpips": str(alex),
        "lpips_heads": str(w / "heads"),
        "dists": str(vgg),
        "dists_weights": str(w / "dists.pt"),
    }
    pw = tmp / "params_w.yaml"
    pw.write_text(yaml.safe_dump({**params, "evaluate": {**params["evaluate"], "weights": weights}}))
    m = _evaluate(tmp, pw, env, tmp / "model", "w")
    rows = m["sets"]["severe"]
    assert all(0 <= r["lpips"] and 0 <= r["dists"] <= 1 for r in rows.values())
    d = m["paired"]["severe"]["1 reference"]["lpips"]
    assert d["lo"] <= d["diff"] <= d["hi"] and d["n"] == rows["1 reference"]["n"]
    assert set(m["not_computed"]) == {"musiq", "clipiqa", "maniqa", "fid"}
    assert {f["file"] for f in m["weights"]["lpips"]} == {"alexnet-owt-7be5be79.pth", "alex.pth"}
    report = (tmp / "ev_w.md").read_text()
    assert "LPIPS ↓" in report and "Δ DISTS" in report and "## Weights" in report
    assert iqa_sha(alex) in report
    # a truncated alpha/beta file: DISTS not computed, the file named; LPIPS still there
    pw.write_text(
        yaml.safe_dump(
            {**params, "evaluate": {**params["evaluate"], "weights": {**weights, "dists_weights": str(cut)}}}
        )
    )
    m = _evaluate(tmp, pw, env, tmp / "model", "w2")
    assert "cut.pt" in m["not_computed"]["dists"] and "lpips" in m["sets"]["severe"]["no reference"]


def iqa_sha(path) -> str:
    from pipelines.images import sha256_file

    return sha256_file(path)


@pytest.mark.slow
def test_the_gate_reevaluates_the_champion_when_the_evaluation_sets_change(project):
    """Promote a model; re-make the evaluation sets with another seed (same target keys, other pixels);
    a worse and then a better challenger: register restores with the champion's own bundle on the
    challenger's targets (once: the second decision reads the cached re-evaluation) and decides paired
    on them, with no store touched by hand."""
    tmp, _, params, env = project
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'gate.db'}"}
    gp = {**params, "register": {"model_name": "refface-gate", "experiment": "refface-gate"}}
    pp = tmp / "gate_params.yaml"
    pp.write_text(yaml.safe_dump(gp))

    def register(tag: str, eval_sets: Path | None) -> tuple[dict, str]:
        extra = ["--eval-sets", str(eval_sets), "--encoders", str(tmp / "encoders")] if eval_sets else []
        r = _run(
            env, tmp, "stages.register", "--params", str(pp), "--evaluate", str(tmp / f"ev_{tag}"),
            "--metrics-in", str(tmp / f"ev_{tag}.json"), "--report", str(tmp / f"promo_{tag}.md"),
            "--metrics", str(tmp / f"reg_{tag}.json"), *extra,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp / f"reg_{tag}.json").read_text()), (tmp / f"promo_{tag}.md").read_text()

    def shift_primary(tag: str, delta: float) -> None:
        f = tmp / f"ev_{tag}" / "per_target.json"
        t = json.loads(f.read_text())
        t["severe"]["rows"]["1 reference"]["gt_id"] = [
            v + delta for v in t["severe"]["rows"]["1 reference"]["gt_id"]
        ]
        f.write_text(json.dumps(t))

    _evaluate(tmp, pp, env, tmp / "model", "g_champ")
    assert register("g_champ", None)[0]["decision"] == "promoted"
    # the evaluation sets again, degraded with another seed: the same target keys, other pixels
    sets2 = tmp / "eval_sets_seed43"
    pp2 = tmp / "gate_params_43.yaml"
    pp2.write_text(yaml.safe_dump({**gp, "eval_sets": {"seed": 43}}))
    r = _run(
        env, ROOT, "stages.eval_sets", "--params", str(pp2), "--shards", str(tmp / "shards"), "--out",
        str(sets2), "--metrics", str(tmp / "es43.json"), timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((tmp / "ev_g_champ" / "per_target.json").read_text())["severe"]
    for tag, seed, delta in (("g_worse", 11, -0.5), ("g_better", 12, +0.5)):
        _tiny_model(tmp / f"model_{tag}", seed, params)
        _evaluate_on(tmp, pp, env, tmp / f"model_{tag}", tag, sets2)
        b = json.loads((tmp / f"ev_{tag}" / "per_target.json").read_text())["severe"]
        assert b["keys"] == a["keys"] and b["content"] != a["content"]  # same keys, other pixels
        shift_primary(tag, delta)
    # without the sets to re-evaluate on, no paired comparison is possible: refused, not compared
    refused, why = register("g_worse", None)
    assert refused["decision"] == "rejected" and "no --eval-sets" in why and "impossible" in why
    worse, why = register("g_worse", sets2)
    assert worse["decision"] == "rejected"
    assert "re-evaluated on the challenger's" in why and "(computed)" in why
    assert "no demonstrated gain" in why and "paired targets" in why
    better, why = register("g_better", sets2)
    assert better["decision"] == "promoted" and "(cached)" in why and "lies above min_gain" in why


def _evaluate_on(tmp, pp, env, model: Path, tag: str, eval_sets: Path) -> dict:
    r = _run(
        env, ROOT, "stages.evaluate", "--params", str(pp), "--eval-sets", str(eval_sets),
        "--shards", str(tmp / "shards"), "--model", str(model),
        "--encoders", str(tmp / "encoders"), "--out", str(tmp / f"ev_{tag}"), "--metrics",
        str(tmp / f"ev_{tag}.json"), "--report", str(tmp / f"ev_{tag}.md"), "--plot", str(tmp / f"ev_{tag}.csv"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / f"ev_{tag}.json").read_text())


def test_the_report_says_how_much_of_the_blind_modes_gap_fewer_steps_close():
    from pipelines.set_evaluation import blind_vs_front_lines

    def entry(diff, lo, hi, verdict):
        return {"diff": diff, "lo": lo, "hi": hi, "n": 62, "verdict": verdict}

    d = {
        "no reference": {
            "psnr": entry(-0.30, -0.32, -0.27, "lower"),
            "gt_id": entry(-0.0018, -0.0023, -0.0013, "lower"),
        },
        "no reference - 2 sampler steps": {
            "psnr": entry(-0.075, -0.08, -0.07, "lower"),
            "gt_id": entry(-0.0005, -0.0008, -0.0003, "lower"),
        },
    }
    text = "\n".join(blind_vs_front_lines(d, 8))
    assert "| no reference (8 sampler steps, the rows above) | -0.300 [-0.320, -0.270] | lower |" in text
    assert "does not earn its place" in text and "in PSNR and GT-ID" in text
    assert "-0.075 dB against -0.300 dB: 75% of it is the sampler's trajectory" in text
    same = {k: {m: entry(0.01, -0.02, 0.04, "no difference") for m in ("psnr", "gt_id")} for k in d}
    assert "at least as good as the front end alone" in "\n".join(blind_vs_front_lines(same, 8))
    assert blind_vs_front_lines(None, 8) == [] and blind_vs_front_lines({}, 8) == []
