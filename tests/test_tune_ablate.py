"""The Optuna `tune` stage (nested MLflow runs, RDB storage, resumable, parallel trials on Ray) and the
`ablate` stage (one table of the paper's variants), on tiny shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import _project

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(tmp: Path, params: dict, *args: str) -> subprocess.CompletedProcess:
    pp = tmp / "params.yaml"
    pp.write_text(yaml.safe_dump(params))
    env = {**os.environ, "REFFACE_PROGRESS": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", *args[:1], "--params", str(pp), *args[1:]],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_tune_study_nested_runs_resume_and_ray(tmp_path):
    shards, params = _project(tmp_path)
    params["tune"] = {
        "storage": f"sqlite:///{tmp_path / 'optuna' / 'optuna.db'}",
        "n_trials": 3,
        "steps": 4,
        "report_every": 2,
        "val_samples": 4,
        "batch_size": 4,
        "parallel": 1,
        "space": {"lr": ["log", 1e-4, 1e-3], "memory_tokens": ["choice", 4, 8]},
    }
    args = (
        "stages.tune",
        "--shards",
        str(shards),
        "--encoders",
        str(tmp_path / "encoders"),
        "--out",
        str(tmp_path / "tune"),
        "--metrics",
        str(tmp_path / "t.json"),
    )
    r = _run(tmp_path, params, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "t.json").read_text())
    assert m["trials"] == 3 and m["complete"] + m["pruned"] == 3 and m["complete"] >= 1
    best = yaml.safe_load((tmp_path / "tune" / "best_params.yaml").read_text())
    assert set(best["train"]) == {"lr", "memory_tokens"} and 1e-4 <= best["train"]["lr"] <= 1e-3
    assert (tmp_path / "tune" / "history.png").is_file()
    first = {f.name: f.read_bytes() for f in sorted((tmp_path / "tune").iterdir())}
    first_metrics = (tmp_path / "t.json").read_bytes()
    # A second run (tune.resume false: the study starts afresh) reproduces the outputs byte for byte.
    r = _run(tmp_path, params, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in sorted((tmp_path / "tune").iterdir())} == first
    assert (tmp_path / "t.json").read_bytes() == first_metrics
    # resume: more trials continue the same study (RDB storage), as Ray tasks: only the missing one runs.
    params["tune"] |= {"n_trials": 4, "parallel": 2, "resume": True}
    r = _run(tmp_path, params, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "t.json").read_text())["trials"] == 4

    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name(params["train"]["experiment"])
    runs = c.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.info.run_name == "tune"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    assert len(parents) == 3 and len(children) == 3 + 3 + 1
    assert all("lr" in x.data.params for x in children)
    assert {x.info.status for x in children} <= {"FINISHED", "KILLED"}


def write_default(tmp: Path, params: dict) -> Path:
    """The trained default's folder as the train stage writes it (models.lora.save_trainable): the `full`
    variant of the test's train section, its LoRA and pathways perturbed off their initialisation."""
    import torch

    from models.lora import save_trainable
    from pipelines.config import EmbedConfig, TrainConfig
    from pipelines.config_base import build
    from pipelines.embedding import load_encoders
    from pipelines.trainer import build_module

    tcfg = build(TrainConfig, params["train"], "train")
    enc = load_encoders(build(EmbedConfig, params["embed"], "embed"), tmp / "encoders")
    net = build_module(tcfg, enc.primary, enc.crop_border).net
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad and ("lora_B" in n or not n.startswith("transformer.")):
                p.add_(0.01 * torch.randn_like(p))
    save_trainable(net, tmp / "model")
    return tmp / "model"


def test_ablate_table(tmp_path):
    """The fine-tune protocol: every row starts from the default's folder, Table 3's rows leave parts of it
    out, the seed systems' rows add theirs and are paired against `full`; one verdict per claim."""
    shards, params = _project(tmp_path)
    model = write_default(tmp_path, params)
    params["ablate"] = {
        "variants": ["concat", "full", "default", "composite", "composite_ensemble"],
        "steps": 3,
        "warmup_steps": 1,
        "batch_size": 4,
        "val_samples": 4,
    }
    args = [
        "stages.ablate",
        "--shards",
        str(shards),
        "--encoders",
        str(tmp_path / "encoders"),
        "--report",
        str(tmp_path / "ablation.md"),
        "--metrics",
        str(tmp_path / "a.json"),
    ]
    missing = _run(tmp_path, params, *args)  # finetune needs the default's folder: said before any work
    assert (
        missing.returncode != 0
        and "ablate.protocol finetune starts from the train stage's model" in missing.stderr
    )
    r = _run(tmp_path, params, *args, "--init", str(model))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "a.json").read_text())
    assert sorted(m) == sorted(["concat", "full", "default", "composite", "composite_ensemble"])
    assert m["full"]["trainable_parameters"] > m["concat"]["trainable_parameters"]
    # every row starts from the default: concat leaves its parts out, composite adds its context; Table 3's
    # rows leave the default's reference readout out too (ablate.table3_readout: off, the paper's head),
    # `default` is the default as it is
    from pipelines.config import TrainConfig
    from pipelines.config_base import build
    from pipelines.network import reference_readout

    assert reference_readout(build(TrainConfig, params["train"], "train")), (
        "the test's default has the readout"
    )
    assert set(m["full"]["init"]["left_out"]) == {"ref_fuse"} and m["full"]["init"]["fresh"] == {}
    assert m["default"]["init"]["left_out"] == {} and m["default"]["init"]["fresh"] == {}
    assert m["full"]["trainable_parameters"] < m["default"]["trainable_parameters"]  # two trainings
    assert {"identity", "xattn", "residual", "ref_fuse"} <= set(m["concat"]["init"]["left_out"])
    assert "ref_fuse" not in m["composite"]["init"]["left_out"]
    assert "composite" in m["composite"]["init"]["fresh"]
    # one training for the composite rows; the ensemble row is its own sampling of that model
    assert m["composite_ensemble"]["trainable_parameters"] == m["composite"]["trainable_parameters"]
    assert m["composite_ensemble"]["final_loss"] == m["composite"]["final_loss"]
    # each row against its baseline; the seed system's rows carry their claim's verdict
    assert m["concat"]["paired"] is None and m["full"]["paired"]["vs"] == "concat"
    assert m["default"]["paired"] is None
    assert (
        m["composite"]["paired"]["vs"] == "default" and m["composite_ensemble"]["paired"]["vs"] == "composite"
    )
    claim = m["composite"]["claim"]  # the verdict follows from its interval and the claimed direction
    assert claim["measure"] == "ref" and claim["direction"] == "higher" and claim["n"] == 4
    v = claim["verdict"]
    assert v in ("shown", "not shown: no difference", "not shown: lower")
    if v == "shown":
        assert claim["lo"] >= 0 and claim["diff"] > 0
    elif v.endswith("lower"):
        assert claim["hi"] <= 0 and claim["diff"] < 0
    else:
        assert claim["lo"] <= 0 <= claim["hi"] or abs(claim["diff"]) <= 1e-4
    assert "claim" not in m["full"] and "claim" not in m["default"]
    # the knock-out before any step: a row restored as loaded, paired with its baseline's
    assert m["full"]["paired"]["id_gt_as_loaded"]["n"] == 4
    assert "id_gt_as_loaded" not in m["composite_ensemble"]["paired"]  # its own sampler: no such restoration
    for row in m.values():  # one protocol: reference gain, wrong-person control, copy in conflict regions
        p = row["protocol"]
        assert p["ref_minus_blind"]["n"] == p["true_minus_other"]["n"] == 4
        assert p["copy_pairs"] > 0 and 0.0 <= p["copy_score"] <= 1.0
        assert p["copy_minus_blind"]["n"] == p["copy_pairs"]
    table = (tmp_path / "ablation.md").read_text()
    assert "| concat |" in table and "| full |" in table and "Table 3" in table
    assert "| composite_ensemble |" in table and "true − other person" in table
    assert "Protocol `finetune`" in table and "each claim against its baseline" in table
    assert "reference readout on (off in Table 3's rows)" in table and "in the paper's head" in table
