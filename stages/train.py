"""Stage `train`: IConFace with Lightning on Ray-fed batches, tracked in MLflow, resumable.

    python -m stages.train --shards data/shards --encoders data/encoders --out data/train \
        --metrics metrics/train.json --plot plots/train_loss.csv

dvc.yaml passes `--shards ${train.shards}` (and depends on that folder): RefSTAR's masks
(`train.refstar.reference_masks: refsel`) read the refsel stage's shards, `train.shards:
data/refsel/shards`; the stage checks that the shards hold the masks asked for and records their
provenance (metrics `reference_masks`, MLflow params `masks.*`). MLflow params: every key of `train`
(`train.<key>`, a nested section's as `train.<section>.<key>`), `degrade` and the encoder.

Writes `data/train/model/` (LoRA in diffusers' format + pathway weights, safetensors),
`data/train/ckpt/` (the full resume state, kept between runs: a killed run resumes from `last.ckpt`
and continues the same MLflow run), the metrics file and the loss curve. MLflow: `MLFLOW_TRACKING_URI`
or `sqlite:///mlflow.db`; one run per stage run, with params, per-step loss terms, learning rate,
throughput, the realised reference-count mix, sample grids, the git commit, the DVC hash of the shards
and the hardware.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from models.lora import save_trainable
from pipelines.batches import to_uint8
from pipelines.config import as_dict, flat_dict
from pipelines.embedding import load_encoders
from pipelines.fit import fit
from pipelines.io import write_bytes, write_json
from pipelines.network import build_network
from pipelines.shards import validate_shards
from pipelines.tracking import absolute_uri, mark_run, tracking_uri
from pipelines.validation import evaluate, validation_batch
from pipelines.viz import grid_image
from stages._common import load_params, parser, progress_enabled, setup_logging

# ==================================================================================================
# Building
# ==================================================================================================


def sample_grid(batch: dict, outputs: dict, n: int = 4) -> np.ndarray:
    lq, gt = to_uint8(batch["lq"][:n]), to_uint8(batch["gt"][:n])
    out_r, out_n = to_uint8(outputs["ref"][:n]), to_uint8(outputs["none"][:n])
    rows = []
    for i in range(len(lq)):
        refs = [
            to_uint8(batch["refs"][i, j : j + 1])[0] if batch["ref_mask"][i, j] else None
            for j in range(batch["refs"].shape[1])
        ]
        rows.append([lq[i], *refs, out_r[i], out_n[i], gt[i]])
    labels = (
        ["degraded"]
        + [f"ref{j}" for j in range(batch["refs"].shape[1])]
        + ["output", "output (no ref)", "target"]
    )
    return grid_image(
        rows,
        title="degraded | references | restored (refs) | restored (no refs) | target",
        col_labels=labels,
        cell=96,
    )


# ==================================================================================================
# Provenance
# ==================================================================================================


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shards_hash(shards: str) -> str:
    """The DVC hash of the shards output (dvc.lock), or the sha256 of their index when not under DVC."""
    lock = Path("dvc.lock")
    if lock.is_file():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for name in ("shards", "refsel"):  # data/shards, or data/refsel/shards (RefSTAR's masks)
            for out in stages.get(name, {}).get("outs", []):
                if out.get("path") == shards:
                    return f"md5:{out.get('md5')}"
    return "sha256:" + hashlib.sha256((Path(shards) / "index.json").read_bytes()).hexdigest()


def hardware() -> dict:
    import psutil

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def config_hash(*cfgs) -> str:
    return hashlib.sha256(json.dumps([as_dict(c) for c in cfgs], sort_keys=True).encode()).hexdigest()[:16]


# ==================================================================================================
# Main
# ==================================================================================================


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--encoders", "--out", "--metrics", "--plot"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "train", "degrade", "embed")
    cfg, dcfg, ecfg = cfgs["train"], cfgs["degrade"], cfgs["embed"]
    validate_shards(args.shards)
    encoders = load_encoders(ecfg, args.encoders)
    masks, val = check_before_start(cfg, args.shards, encoders)

    from lightning.pytorch.callbacks import ModelCheckpoint

    out = Path(args.out)
    ckpt_dir = out / "ckpt"
    run_file = ckpt_dir / "run.json"
    chash = config_hash(cfg, dcfg, ecfg)
    resume, run_id = resume_state(ckpt_dir, chash)
    logger, client, run_id = start_run(cfg, dcfg, ecfg, encoders, args.shards, masks, run_id, resume)
    write_json(run_file, {"run_id": run_id, "config": chash, "finished": False})
    history_file = (ckpt_dir / "history.csv").resolve()  # absolute: Ray Train workers run elsewhere
    ckpt = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step:06d}",
        every_n_train_steps=cfg.checkpoint_every,
        save_last=True,
        save_top_k=1,
        monitor="step",
        mode="max",
        auto_insert_metric_name=False,
    )
    track = Track(cfg, val, encoders.evaluator, history_file, client, run_id)
    result = fit(
        cfg, dcfg, args.shards, encoders, val, callbacks=[track], logger=logger, checkpoint=ckpt,
        resume=resume, progress=progress_enabled(),
    )  # fmt: skip
    if result.module.global_rank != 0:
        return

    save_trainable(result.module.net, out / "model")
    metrics = result.metrics
    if masks is not None:
        metrics["reference_masks"] = masks
    grid = sample_grid(val, result.outputs)
    _log_grid(client, run_id, grid, "grids/final.png")
    from pipelines.images import png_bytes

    write_bytes(out / "samples.png", png_bytes(grid))
    for k, v in {**metrics, **result.timing}.items():
        if isinstance(v, int | float):
            client.log_metric(run_id, f"val/{k}" if k in metrics else f"timing/{k}", float(v))
    # DVC metrics: only what a rerun reproduces (wall-clock figures are in MLflow, `timing/*`).
    write_json(args.metrics, metrics)
    mark_run(client, run_id, "train", args.metrics)
    _write_plot(history_file, args.plot)
    client.log_artifact(run_id, str(history_file))
    write_json(run_file, {"run_id": run_id, "config": chash, "finished": True})
    client.set_terminated(run_id, "FINISHED")
    t = result.timing
    print(
        f"train: {metrics['steps']} steps, {t['samples_per_s']} samples/s, data wait {t['data_wait_fraction']:.1%}; "
        f"val PSNR {metrics['lq_psnr']:.2f} (degraded) -> {metrics['restored_psnr']:.2f} dB, identity "
        f"{metrics['lq_id_sim']:.3f} -> {metrics['restored_id_sim']:.3f}; MLflow run {run_id}"
    )


def check_before_start(cfg, shards: str, encoders) -> tuple[dict | None, dict]:
    """(RefSTAR's mask provenance or None, the validation batch); a bad backbone, missing masks or
    weights exit with the reason before anything starts."""
    masks = None
    try:
        build_network(cfg, encoders.primary.cfg.embedding_dim)  # fails on a bad backbone before any start
        if cfg.refstar.reference_masks != "none":  # RefSTAR: the shards must hold the masks asked for
            from pipelines.refstar import mask_provenance

            option = cfg.refstar.reference_masks
            masks = {"option": option, **mask_provenance(shards, option)}
            print(f"train: reference masks {option} from {shards}: {masks['provenance']}")
        if cfg.refstar.cycle_loss:
            from pipelines.refstar import load_perceptual

            print(f"train: cycle loss (RefSTAR eq. 5), perceptual term {load_perceptual(cfg)[1]}")
        val = validation_batch(shards, cfg, cfg.max_refs)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    return masks, val


def resume_state(ckpt_dir: Path, chash: str) -> tuple[str | None, str | None]:
    """(last.ckpt, MLflow run id) of an unfinished run of the same configuration, else (None, None) with
    the checkpoint folder cleared (a finished run or another configuration starts afresh)."""
    run_file = ckpt_dir / "run.json"
    resume, run_id = None, None
    if run_file.is_file():
        state = json.loads(run_file.read_text())
        if state.get("config") == chash and not state.get("finished") and (ckpt_dir / "last.ckpt").is_file():
            resume, run_id = str(ckpt_dir / "last.ckpt"), state["run_id"]
    if resume is None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return resume, run_id


def start_run(cfg, dcfg, ecfg, encoders, shards: str, masks, run_id: str | None, resume: str | None):
    """(MLflow logger, client, run id): a new run with the params, commit, shards hash and hardware, or the
    unfinished run being resumed."""
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(
        experiment_name=cfg.experiment,
        run_name="train",
        tracking_uri=absolute_uri(tracking_uri()),  # the same store from a Ray Train worker's folder
        run_id=run_id,
        log_model=False,
    )
    run_id = logger.run_id
    client = logger.experiment
    if resume is not None:
        print(f"train: resuming MLflow run {run_id} from {resume}")
        return logger, client, run_id
    params = {f"train.{k}": v for k, v in flat_dict(cfg).items()} | {
        f"degrade.{k}": v for k, v in flat_dict(dcfg).items()
    }
    params |= {"embed.encoder": encoders.name, "embed.crop_border": ecfg.crop_border}
    for k, v in params.items():
        client.log_param(run_id, k, str(v)[:500])
    client.set_tag(run_id, "git_commit", git_commit())
    client.set_tag(run_id, "shards_hash", shards_hash(shards))
    client.set_tag(run_id, "hardware", json.dumps(hardware()))
    if masks is not None:  # RefSTAR: where the masks came from
        client.log_param(run_id, "masks.mask_model", str(masks["mask_model"]))
        for kind, n in masks["provenance"].items():
            client.log_param(run_id, f"masks.{kind}", n)
    return logger, client, run_id


class Track(Callback):
    """Loss history (kept across resumes), sample grids every grid_every steps before the last (whose grid
    is the summary's `grids/final.png`); rank 0 only."""

    def __init__(self, cfg, val, evaluator, history_file: Path, client, run_id: str):
        super().__init__()
        self.cfg, self.val, self.evaluator = cfg, val, evaluator
        self.history_file, self.client, self.run_id = history_file, client, run_id

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank != 0:
            return
        cfg, step = self.cfg, trainer.global_step
        if step % cfg.log_every == 0 and pl_module.history:
            h = pl_module.history[-1]
            new = not self.history_file.exists()
            with open(self.history_file, "a", newline="") as f:
                wr = csv.writer(f)
                if new:
                    wr.writerow(["step", "loss", "fm", "id"])
                wr.writerow([h["step"], round(h["loss"], 6), round(h["fm"], 6), round(h["id"], 6)])
        # the last step's grid is the run's summary (`grids/final.png`, the same restorations): not twice
        if (
            cfg.grid_every
            and step > 0
            and step % cfg.grid_every == 0
            and step < trainer.max_steps
            and batch_idx % trainer.accumulate_grad_batches == 0
        ):
            _, outs = evaluate(pl_module, self.val, self.evaluator, cfg.val_steps, cfg.val_guidance)
            _log_grid(self.client, self.run_id, sample_grid(self.val, outs), f"grids/step_{step:06d}.png")


def _log_grid(client, run_id: str, grid: np.ndarray, name: str) -> None:
    import tempfile

    from pipelines.images import png_bytes

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / Path(name).name
        path.write_bytes(png_bytes(grid))
        client.log_artifact(run_id, str(path), artifact_path=str(Path(name).parent))


def _write_plot(history: Path, plot: str) -> None:
    rows = list(csv.DictReader(open(history))) if history.is_file() else []
    latest: dict[int, dict] = {}
    for r in rows:  # a resumed run may have logged a step twice: keep the last
        latest[int(r["step"])] = r
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss", "fm", "id"], lineterminator="\n")
    w.writeheader()
    w.writerows(latest[k] for k in sorted(latest))
    write_bytes(plot, buf.getvalue().encode())


if __name__ == "__main__":
    main()
