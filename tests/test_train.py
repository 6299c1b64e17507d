"""Training: bad configuration fails first; collate applies the schedule; a short run tracks to MLflow;
SIGKILL mid-run resumes from the last checkpoint in the same MLflow run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_shards, write_encoders

from pipelines.batches import collate
from pipelines.config import ConfigError, TrainConfig, build
from pipelines.network import build_network


@pytest.mark.parametrize(
    "override,message",
    [
        ({"backbone": "klein_9b"}, "unknown backbone 'klein_9b'; valid: tiny, small, klein_base_4b"),
        ({"weights": "/nonexistent/flux2"}, "train.weights: /nonexistent/flux2 does not exist"),
        ({"lora_rank": 0}, "lora_rank must be at least 1"),
        ({"max_refs": 4, "ref_schedule": [0.2, 0.2, 0.2, 0.2, 0.2]}, "the model accepts 0-3 references"),
        ({"batch_size": 3, "devices": 2}, "batch_size 3 is not divisible by 2 ranks"),
        ({"backbone": "klein_base_4b"}, "klein_base_4b needs weights, vae and prompt_cache"),
        (
            {"degrade_preset": "refldm_hard"},
            "degrade_preset: unknown preset 'refldm_hard'; valid: realesrgan",
        ),
    ],
)
def test_bad_configuration_fails_with_what_to_change(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(TrainConfig, override, "train")


def test_the_transformer_trains_on_its_own_degradations_where_set():
    from pipelines.config import DegradeConfig
    from pipelines.fit import training_degradations

    dcfg = DegradeConfig(preset="iconface_mixed", seed=3)
    front = build(TrainConfig, {"degrade_preset": None}, "train")
    assert training_degradations(front, dcfg) is dcfg  # null: the front end's
    own = training_degradations(build(TrainConfig, {}, "train"), dcfg)  # the default: the mix
    assert own == DegradeConfig(preset="iconface_refldm", seed=3)


@pytest.mark.parametrize("prediction,readout", [("x0_residual", True), ("velocity", False)])
def test_random_backbones_read_out_the_degraded_tokens_only_with_x0_residual(prediction, readout):
    cfg = build(
        TrainConfig,
        {"backbone": "tiny", "pixel_patch": 4, "prediction": prediction, "front_end": 0, "front": None},
        "train",
    )
    net, _, _ = build_network(cfg, 512)
    assert net.cfg.deg_readout is readout
    head = net.transformer.proj_out.weight
    assert bool(head.abs().sum() == 0) is readout  # x0_residual starts at the degraded image


def test_collate_applies_the_schedule_without_duplicates():
    rng = np.random.default_rng(0)
    b, h = 64, 8
    batch = {
        "keys": [f"k{i}" for i in range(b)],
        "lq": rng.integers(0, 255, (b, h, h, 3), dtype=np.uint8),
        "gt": rng.integers(0, 255, (b, h, h, 3), dtype=np.uint8),
        "refs": [[np.full((h, h, 3), 10 * j, np.uint8) for j in range(1 + i % 4)] for i in range(b)],
        "ref_emb": [np.arange(1 + i % 4, dtype=np.float32)[:, None].repeat(5, 1) for i in range(b)],
        "gt_emb": np.zeros((b, 5), np.float32),
    }
    out = collate(batch, (0.3, 0.3, 0.2, 0.2), 3, seed=0, epoch=0)
    r = out["refs"].shape[1]
    assert out["lq"].shape == (b, 3, h, h) and out["refs"].shape == (b, r, 3, h, h) and r <= 3
    for i in range(b):
        n = int(out["ref_mask"][i].sum())
        assert n == out["got"][i] <= len(batch["refs"][i])
        ids = out["z_refs"][i, :n, 0].tolist()
        assert len(set(ids)) == n  # distinct references
        assert not out["ref_mask"][i, n:].any() and torch.all(out["z_refs"][i, n:] == 0)


def _project(tmp: Path) -> tuple[Path, dict]:
    """Shards (train + val) of 32 px faces with 512-d embeddings, and two small encoders."""
    from pipelines.shards import INDEX_NAME, write_split  # noqa: F401

    shards = tmp / "shards"
    idx = {"format_version": 1, "splits": {}}
    for split, n in (("train", 96), ("val", 8), ("test", 0)):
        paths = make_shards(shards, n, refs=3, per_shard=32, split=split, emb_dim=512) if n else []
        idx["splits"][split] = {
            "samples": n,
            "shards": [
                {
                    "name": Path(p_).name,
                    "samples": min(32, n - 32 * k),
                    "bytes": Path(p_).stat().st_size,
                    "sha256": __import__("hashlib").sha256(Path(p_).read_bytes()).hexdigest(),
                }
                for k, p_ in enumerate(paths)
            ],
        }
    (shards / INDEX_NAME).write_text(json.dumps(idx))
    enc = write_encoders(tmp / "encoders")
    from models.pathways import FrontEnd, save_front

    torch.manual_seed(0)
    save_front(FrontEnd(8), tmp / "front.safetensors")  # as the train_front stage writes it
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["embed"]["checkpoint"] = str(enc / "primary.safetensors")
    params["train"].update(
        {
            "max_steps": 30,
            "batch_size": 4,
            "checkpoint_every": 2,
            "log_every": 1,
            "grid_every": 10,
            "val_samples": 4,
            "val_steps": 2,
            "memory_tokens": 8,
            "pixel_patch": 8,
            "front_end": 8,
            "front": str(tmp / "front.safetensors"),
        }
    )
    params["degrade"].update({"batch_size": 4, "num_cpus": 1, "max_in_flight": 2})
    return shards, params


def _cmd(tmp, params_path):
    return [
        sys.executable,
        "-m",
        "stages.train",
        "--params",
        str(params_path),
        "--shards",
        str(tmp / "shards"),
        "--encoders",
        str(tmp / "encoders"),
        "--out",
        str(tmp / "out"),
        "--metrics",
        str(tmp / "m.json"),
        "--plot",
        str(tmp / "loss.csv"),
    ]


@pytest.mark.slow
def test_train_tracks_to_mlflow_and_resumes_after_sigkill(tmp_path):
    _, params = _project(tmp_path)
    pp = tmp_path / "params.yaml"
    pp.write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "REFFACE_PROGRESS": "0"}
    proc = subprocess.Popen(
        _cmd(tmp_path, pp),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ckpt = tmp_path / "out" / "ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        hist = ckpt / "history.csv"
        if (ckpt / "last.ckpt").is_file() and hist.is_file() and len(hist.read_text().splitlines()) > 8:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its Ray workers, mid-run
    proc.wait()
    first = json.loads((ckpt / "run.json").read_text())
    assert not first["finished"]
    out = subprocess.run(_cmd(tmp_path, pp), cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming MLflow run {first['run_id']}" in out.stdout
    final = json.loads((ckpt / "run.json").read_text())
    assert final["run_id"] == first["run_id"] and final["finished"]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 30
    for k in ("lq_psnr", "restored_psnr", "restored_id_sim", "ref_mix", "ref_shortfall"):
        assert k in metrics
    # The counters survive the resume like the weights: every one of the 30 x 4 samples is counted.
    assert metrics["ref_draws"] == 30 * 4
    # Wall-clock figures are MLflow's, never in a DVC metrics file (a rerun would differ).
    assert not {"samples_per_s", "data_wait_fraction", "train_s", "samples_seen_this_run"} & set(metrics)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(first["run_id"])
    seen = client.get_metric_history(first["run_id"], "timing/samples_seen_this_run")
    assert seen and seen[-1].value < 30 * 4  # resumed, not restarted
    assert run.info.status == "FINISHED" and run.data.tags["git_commit"] and "shards_hash" in run.data.tags
    steps = [m.step for m in client.get_metric_history(first["run_id"], "train/loss")]
    assert max(steps) >= 28 and min(steps) <= 2
    for term in ("train/fm", "train/id", "train/lr", "train/samples_per_s", "train/ref_mix_0"):
        assert client.get_metric_history(first["run_id"], term), term
    arts = [a.path for a in client.list_artifacts(first["run_id"], "grids")]
    assert "grids/final.png" in arts and "grids/step_000010.png" in arts
    assert "grids/step_000030.png" not in arts  # the last step's grid is final.png, not restored twice
    model_dir = tmp_path / "out" / "model"
    assert (model_dir / "pytorch_lora_weights.safetensors").is_file() and (
        model_dir / "iconface_pathways.safetensors"
    ).is_file()
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,fm,id" and len(rows) > 20


def test_noise_is_drawn_per_rank_and_reproducible():
    """σ and ε depend on (seed, step, rank, batch index): two DDP ranks draw different noise for their
    different samples; a rerun of a rank draws the same."""
    from models.losses import draw_sigma_noise, noise_generator

    def draw(rank, step=5, batch_idx=0, seed=0):
        return draw_sigma_noise((4, 3, 8, 8), "uniform", 1.0, noise_generator(seed, step, rank, batch_idx))

    s0, n0 = draw(0)
    s1, n1 = draw(1)
    assert not torch.equal(n0, n1) and not torch.equal(s0, s1)
    s0b, n0b = draw(0)
    assert torch.equal(n0, n0b) and torch.equal(s0, s0b)
    assert not torch.equal(draw(0, step=6)[1], n0) and not torch.equal(draw(0, batch_idx=1)[1], n0)
    assert not torch.equal(draw(0, seed=1)[1], n0)


def test_training_step_uses_the_rank(monkeypatch):
    """The module draws through noise_generator with its global rank (the bug: every rank drew alike)."""
    import models.losses
    import pipelines.module as tr

    seen = []
    real = models.losses.noise_generator
    monkeypatch.setattr(tr, "noise_generator", lambda *a: seen.append(a) or real(*a))
    module = _tiny_module()
    batch = _tiny_batch()
    module.training_step(batch, 3)
    assert seen == [(0, 0, 0, 3)]  # (seed, global step, rank, batch index)


def _tiny_module(crop_border: float = 0.0, temperature: float = 1.0, front_end: int = 0):
    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.module import IConFaceModule

    cfg = build(
        TrainConfig,
        {
            "backbone": "tiny",
            "pixel_patch": 4,
            "memory_tokens": 4,
            "temperature": temperature,
            "front_end": front_end,
            "front": None,
        },
        "train",
    )
    torch.manual_seed(0)
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 8, 16, 16), 16, stem_stride=2)).eval()
    net, codec, text = build_network(cfg, 16)
    module = IConFaceModule.from_config(net, codec, enc, text, cfg, crop_border)
    # training_step outside a Trainer: logging and the optimiser are the Trainer's
    module.log = module.log_dict = lambda *a, **k: None
    module.optimizers = lambda: None
    return module


def _tiny_batch(b: int = 2, r: int = 2):
    from pipelines.batches import make_batch

    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    out = make_batch(
        [img() for _ in range(b)],
        [[img() for _ in range(r)] for _ in range(b)],
        [[rng.normal(size=16).astype(np.float32) for _ in range(r)] for _ in range(b)],
        gt=[img() for _ in range(b)],
        z_gt=[rng.normal(size=16).astype(np.float32) for _ in range(b)],
    )
    out["wanted"], out["got"] = [r] * b, [r] * b
    return out


def test_the_crop_is_applied_wherever_the_module_embeds():
    """embed.crop_border reaches the module's identity embedding (loss, conditioning, restorer): it equals
    the encoder on the cropped image, as the shard embeddings were made."""
    from models.id_encoder import raw_embedding

    x = _tiny_batch()["gt"]
    plain, cropped = _tiny_module(0.0), _tiny_module(0.125)
    unit = (x + 1) / 2
    assert torch.allclose(plain.identity(x), raw_embedding(plain.id_encoder, unit, 0.0))
    assert torch.allclose(cropped.identity(x), raw_embedding(cropped.id_encoder, unit[..., 2:14, 2:14], 0.0))
    assert not torch.allclose(plain.identity(x), cropped.identity(x))


def test_the_loss_anchor_uses_the_temperature(monkeypatch):
    """The identity loss aggregates the references with train.temperature, like the model (eq. 4)."""
    import pipelines.module as tr

    temps = []
    real = tr.identity_anchor
    monkeypatch.setattr(tr, "identity_anchor", lambda *a: temps.append(a[3]) or real(*a))
    _tiny_module(temperature=0.5).training_step(_tiny_batch(), 0)
    assert temps == [0.5]


def test_lr_schedule_warms_up_then_decays():
    from pipelines.module import lr_factor

    assert lr_factor(50, "constant", 10, 100) == 1.0
    assert lr_factor(0, "cosine", 10, 100) == 0.1 and lr_factor(9, "cosine", 10, 100) == 1.0
    assert abs(lr_factor(55, "cosine", 10, 100) - 0.5) < 1e-9 and lr_factor(100, "cosine", 10, 100) == 0.0


def test_front_end_passes_through_at_init_and_loads_by_width(tmp_path):
    """The front end starts as the identity (zero last layer); its file round-trips; a missing file or
    another width is an error naming the file."""
    from models.pathways import FrontEnd, load_front, save_front

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(FrontEnd(8)(x), x)
    f = FrontEnd(8)
    torch.nn.init.normal_(f.out.weight, std=0.1)
    save_front(f, tmp_path / "front.safetensors")
    g = FrontEnd(8)
    load_front(g, tmp_path / "front.safetensors")
    assert torch.equal(g(x), f(x)) and not torch.equal(g(x), x)
    with pytest.raises(ValueError, match=r"front.safetensors: not a front end of width 16"):
        load_front(FrontEnd(16), tmp_path / "front.safetensors")
    with pytest.raises(
        FileNotFoundError, match=r"missing.safetensors not found \(run `dvc repro train_front`\)"
    ):
        load_front(FrontEnd(8), tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="front is set but front_end is 0"):
        build(TrainConfig, {"front_end": 0, "front": "x.safetensors"}, "train")


def test_the_model_conditions_on_the_frozen_front_end(tmp_path):
    """build_network loads train.front into a frozen front end; the module's conditioning (degraded
    tokens, blind identity fallback) uses its output; the saved trainable weights carry it, so a bundle
    rebuilds it without train.front."""
    from models.lora import load_trainable, save_trainable
    from models.pathways import FrontEnd, save_front
    from pipelines.module import IConFaceModule

    f = FrontEnd(8)
    torch.nn.init.normal_(f.out.weight, std=0.1)
    save_front(f, tmp_path / "front.safetensors")
    over = {"backbone": "tiny", "pixel_patch": 4, "memory_tokens": 4, "front_end": 8}
    cfg = build(TrainConfig, {**over, "front": str(tmp_path / "front.safetensors")}, "train")
    net, codec, text = build_network(cfg, 16)
    assert not any(p.requires_grad for p in net.front.parameters())
    batch = _tiny_batch()
    assert torch.equal(net.front(batch["lq"]), f(batch["lq"]))
    ref = _tiny_module()  # the same encoder and init, no front end
    module = IConFaceModule.from_config(net, codec, ref.id_encoder, text, cfg)
    cond = module.conditioning(batch)
    cleaned = f(batch["lq"]).clamp(-1, 1)
    assert torch.allclose(cond.deg, codec.encode(cleaned), atol=1e-6)
    assert torch.allclose(cond.z_deg, module.identity(cleaned), atol=1e-5)
    save_trainable(net, tmp_path / "model")
    rebuilt, _, _ = build_network(build(TrainConfig, {**over, "front": None}, "train"), 16)
    load_trainable(rebuilt, tmp_path / "model")
    assert torch.equal(rebuilt.front(batch["lq"]), f(batch["lq"]))
