"""`dvc repro` end to end on a shrunken embedded default, in a scratch git repository.

Checks the Foundation's promises: every stage runs and writes its outputs; a second `dvc repro`
does nothing; changing one param reruns only what depends on it; shards are byte-identical when
rebuilt.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

STAGES = (
    "synthesize",
    "ingest",
    "train_id_encoder",
    "embed",
    "pairs",
    "shards",
    "annotate",
    "refsel",
    "eval_sets",
    "train_front",
    "train",
    "evaluate",
    "ablate",
    "register",
    "tune",
    "mlflow_sync",
)
SMALL = {
    "synthesize": {
        "album_identities": 30,
        "album_images_per_identity": [2, 4],
        "encoder_identities": 24,
        "encoder_images_per_identity": 4,
        "grid_identities": 3,
        "grid_images": 3,
    },
    "train_id_encoder": {"epochs": 2, "batch_size": 32},
    "shards": {"samples_per_shard": 16, "preview_samples": 2},
    "degrade": {"batch_size": 4, "num_cpus": 1, "max_in_flight": 2},
    "train_front": {"steps": 3, "batch_size": 4, "width": 8, "val_samples": 2, "log_every": 1},
    "train": {
        "front_end": 8,
        "max_steps": 4,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "grid_every": 0,
        "val_samples": 2,
        "val_steps": 2,
        "memory_tokens": 8,
    },
    "annotate": {"pool": 20},
    "refsel": {"epochs": 3, "widths": [8, 16, 32], "review_max": 3},
    "evaluate": {
        "samples": 0,
        "modes": [0, 1],
        "steps": 2,
        "front_probe_steps": 1,
        "batch_size": 4,
        "grid_samples": 2,
    },
    "ablate": {
        "variants": ["concat", "full"],
        "steps": 2,
        "warmup_steps": 1,
        "batch_size": 4,
        "val_samples": 2,
    },
    "tune": {"n_trials": 2, "steps": 2, "report_every": 1, "val_samples": 2, "batch_size": 4},
}


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    for d in ("stages", "pipelines", "models", "annotation", "configs"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "REFFACE_PROGRESS": "0",
        "PYTHONPATH": str(root),
    }
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    first = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env, first


def test_repro_builds_every_output(project):
    root, env, first = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    for path in (
        "data/synthetic/grid.png",
        "data/ingest/manifest.jsonl",
        "data/encoders/primary.safetensors",
        "data/encoders/evaluator.safetensors",
        "data/embeddings/embeddings.npy",
        "data/pairs/pairs.jsonl",
        "data/shards/index.json",
        "data/shards/preview.png",
        "metrics/ingest.json",
        "metrics/pairs.json",
        "data/annotate/annotations.jsonl",
        "data/refsel/report.md",
        "data/refsel/shards/index.json",
        "reports/evaluation.md",
        "reports/ablation.md",
        "reports/promotion.md",
    ):
        assert (root / path).is_file(), path
    index = json.loads((root / "data/shards/index.json").read_text())
    assert index["splits"]["train"]["samples"] > 20
    ingest = json.loads((root / "metrics/ingest.json").read_text())
    assert ingest["quarantined"] == 0 and ingest["identities"] == 30
    enc = json.loads((root / "metrics/train_id_encoder.json").read_text())
    assert 0.5 < enc["primary"]["verification_accuracy"] <= 1.0
    reg = json.loads((root / "metrics/register.json").read_text())
    assert reg["decision"] == "promoted" and reg["version"] == 1  # the first model becomes champion
    assert "PROMOTED" in (root / "reports/promotion.md").read_text()
    assert (root / "data/tune/best_params.yaml").is_file()


def test_second_repro_does_nothing(project):
    """Only the one cheap check runs again (mlflow_sync, always_changed), and it finds MLflow in sync."""
    root, env, _ = project
    out = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    ran = [line for line in out.splitlines() if "Running stage" in line]
    assert ran == ["Running stage 'mlflow_sync':"] and "mlflow_sync: sqlite:///mlflow.db in sync" in out
    for stage in STAGES[:-1]:
        assert f"Stage '{stage}' didn't change, skipping" in out


def test_fresh_clone_restores_mlflow_and_the_champion_without_retraining(project, tmp_path):
    """A clone with the committed outputs (DVC cache shared, as after `dvc pull`) and no mlflow.db:
    `dvc repro` runs only mlflow_sync, which rebuilds every stage's run and the registry from the DVC
    outputs; then the README's restore command works through models:/refface@champion."""
    root, env, _ = project
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\nmlartifacts/\ndata/optuna/\n__pycache__/\n")
    git = {
        **env,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    _run(["git", "add", "-A"], root, git)
    _run(["git", "commit", "-qm", "pipeline"], root, git)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(root), str(clone)], tmp_path, git)
    assert not (clone / "mlflow.db").exists()
    cenv = {**env, "PYTHONPATH": str(clone)}
    _run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(root / ".dvc" / "cache")], clone, cenv)
    _run([sys.executable, "-m", "dvc", "checkout", "-q"], clone, cenv)
    out = _run([sys.executable, "-m", "dvc", "repro"], clone, cenv)
    ran = [line for line in out.splitlines() if "Running stage" in line]
    assert ran == ["Running stage 'mlflow_sync':"], out[-3000:]
    assert "train: restored run" in out and "ablate: restored run" in out and "tune: restored run" in out
    assert "champion -> " in out
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    exp = c.get_experiment_by_name("refface")
    names = {r.info.run_name for r in c.search_runs([exp.experiment_id])}
    assert {"train", "ablate", "tune", "register"} <= names
    assert c.get_model_version_by_alias("refface", "champion").tags["restored_from"] == "dvc outputs"
    # a second repro: in sync, nothing restored twice
    out = _run([sys.executable, "-m", "dvc", "repro"], clone, cenv)
    assert "mlflow_sync: sqlite:///mlflow.db in sync" in out
    # the README's command
    person = sorted((clone / "data/synthetic/album").iterdir())[0]
    photos = sorted(p for p in person.rglob("*.png"))
    _run(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "restore",
            "--aligned",
            str(photos[0]),
            "--ref",
            str(photos[1]),
            "--out",
            str(tmp_path / "out.png"),
        ],
        clone,
        cenv,
    )
    from PIL import Image

    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_one_param_reruns_only_its_dependents_and_shards_rebuild_identically(project):
    root, env, _ = project
    before = json.loads((root / "data/shards/index.json").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pairs"]["seed"] = 43
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    ran = {
        s
        for s in ("synthesize", "ingest", "train_id_encoder", "embed", "pairs", "shards")
        if f"Running stage '{s}'" in out
    }
    assert ran == {"pairs", "shards"}
    # back to the original seed: forcing the shards stage reproduces the original bytes
    params["pairs"]["seed"] = 42
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([sys.executable, "-m", "dvc", "repro", "pairs"], root, env)
    _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "shards"], root, env)
    after = json.loads((root / "data/shards/index.json").read_text())
    assert after == before
    # evaluation sets are frozen: rebuilding them gives the same bytes
    _run([sys.executable, "-m", "dvc", "repro"], root, env)
    sets_before = json.loads((root / "data/eval_sets/index.json").read_text())
    _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "eval_sets"], root, env)
    assert json.loads((root / "data/eval_sets/index.json").read_text()) == sets_before
    assert sets_before["splits"]["severe"]["samples"] == sets_before["splits"]["moderate"]["samples"] > 0
