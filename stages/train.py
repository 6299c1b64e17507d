"""Stage `train`: IConFace with Lightning on Ray-fed batches, tracked in MLflow, resumable.

    python -m stages.train --shards data/shards --encoders data/encoders --out data/train \
        --metrics metrics/train.json --plot plots/train_loss.csv

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
import time
from pathlib import Path

import numpy as np
import torch

from models.lora import save_trainable
from pipelines.config import as_dict
from pipelines.embedding import load_identity_encoder
from pipelines.io import write_bytes, write_json
from pipelines.shards import shard_paths, validate_shards
from pipelines.training import (
    IConFaceModule,
    StreamDataModule,
    build_network,
    evaluate,
    to_uint8,
    validation_batch,
)
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

        for out in (
            (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("shards", {}).get("outs", [])
        ):
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
    torch.set_num_threads(cfg.threads)
    validate_shards(args.shards)
    id_encoder, enc_name, _ = load_identity_encoder(ecfg.encoder, ecfg.checkpoint)
    evaluator = (
        load_identity_encoder("small_ir", str(Path(args.encoders) / "evaluator.safetensors"))[0]
        if (Path(args.encoders) / "evaluator.safetensors").is_file()
        else id_encoder
    )
    try:
        net, codec, text = build_network(cfg, id_encoder.cfg.embedding_dim)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc

    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    out = Path(args.out)
    ckpt_dir = out / "ckpt"
    run_file = ckpt_dir / "run.json"
    chash = config_hash(cfg, dcfg, ecfg)
    resume, run_id = None, None
    if run_file.is_file():
        state = json.loads(run_file.read_text())
        if state.get("config") == chash and not state.get("finished") and (ckpt_dir / "last.ckpt").is_file():
            resume, run_id = str(ckpt_dir / "last.ckpt"), state["run_id"]
    if resume is None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a finished run or another configuration: start afresh
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    logger = MLFlowLogger(
        experiment_name=cfg.experiment, run_name="train", tracking_uri=uri, run_id=run_id, log_model=False
    )
    run_id = logger.run_id
    write_json(run_file, {"run_id": run_id, "config": chash, "finished": False})
    client = logger.experiment
    if resume is None:
        params = {f"train.{k}": v for k, v in as_dict(cfg).items()} | {
            f"degrade.{k}": v for k, v in as_dict(dcfg).items()
        }
        params |= {
            "embed.encoder": enc_name,
            "trainable_parameters": sum(p_.numel() for p_ in net.parameters() if p_.requires_grad),
        }
        for k, v in params.items():
            client.log_param(run_id, k, str(v)[:500])
        client.set_tag(run_id, "git_commit", git_commit())
        client.set_tag(run_id, "shards_hash", shards_hash(args.shards))
        client.set_tag(run_id, "hardware", json.dumps(hardware()))
    else:
        print(f"train: resuming MLflow run {run_id} from {resume}")

    world = cfg.devices * cfg.num_nodes
    dm = StreamDataModule(
        shard_paths(args.shards, "train"),
        dcfg.preset,
        dcfg.seed,
        cfg.batch_size // world,
        dcfg.max_in_flight,
        tuple(cfg.ref_schedule),
        cfg.max_refs,
        dcfg.shuffle,
        dcfg.num_cpus,
    )
    module = IConFaceModule.from_config(net, codec, id_encoder, text, cfg)
    try:
        val = validation_batch(args.shards, cfg, cfg.max_refs)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    history_file = ckpt_dir / "history.csv"

    class Track(Callback):
        """Loss history (kept across resumes), sample grids every grid_every steps."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % cfg.log_every == 0 and pl_module.history:
                h = pl_module.history[-1]
                new = not history_file.exists()
                with open(history_file, "a", newline="") as f:
                    wr = csv.writer(f)
                    if new:
                        wr.writerow(["step", "loss", "fm", "id"])
                    wr.writerow([h["step"], round(h["loss"], 6), round(h["fm"], 6), round(h["id"], 6)])
            if (
                cfg.grid_every
                and step > 0
                and step % cfg.grid_every == 0
                and batch_idx % trainer.accumulate_grad_batches == 0
            ):
                _, outs = evaluate(pl_module, val, evaluator, cfg.val_steps, cfg.val_guidance)
                _log_grid(client, run_id, sample_grid(val, outs), f"grids/step_{step:06d}.png")

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
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate,
        callbacks=[ckpt, Track()],
        logger=logger,
        log_every_n_steps=cfg.log_every,
        enable_progress_bar=progress_enabled(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    fit_s = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return

    save_trainable(net, out / "model")
    metrics, outs = evaluate(module, val, evaluator, cfg.val_steps, cfg.val_guidance)
    grid = sample_grid(val, outs)
    _log_grid(client, run_id, grid, "grids/final.png")
    from pipelines.images import png_bytes

    write_bytes(out / "samples.png", png_bytes(grid))
    wait = dm.dataset.wait_s if dm.dataset else 0.0
    metrics.update(
        {
            "steps": int(trainer.global_step),
            "samples_seen_this_run": int(module.samples),
            "samples_per_s": round(module.samples / max(fit_s, 1e-9), 3),
            "data_wait_fraction": round(wait / max(fit_s, 1e-9), 4),
            "final_loss": round(
                float(np.mean([h["loss"] for h in module.history[-20:]])) if module.history else float("nan"),
                5,
            ),
            "ref_mix": {
                str(k): round(v / max(sum(module.mix.values()), 1), 4) for k, v in sorted(module.mix.items())
            },
            "ref_shortfall": int(module.shortfall),
            "mlflow_run_id": run_id,
        }
    )
    for k, v in metrics.items():
        if isinstance(v, int | float):
            client.log_metric(run_id, f"val/{k}", float(v))
    write_json(args.metrics, {k: v for k, v in metrics.items() if k != "mlflow_run_id"})
    _write_plot(history_file, args.plot)
    client.log_artifact(run_id, str(history_file))
    write_json(run_file, {"run_id": run_id, "config": chash, "finished": True})
    client.set_terminated(run_id, "FINISHED")
    print(
        f"train: {metrics['steps']} steps, {metrics['samples_per_s']} samples/s, data wait {metrics['data_wait_fraction']:.1%}; "
        f"val PSNR {metrics['lq_psnr']:.2f} (degraded) -> {metrics['restored_psnr']:.2f} dB, identity "
        f"{metrics['lq_id_sim']:.3f} -> {metrics['restored_id_sim']:.3f}; MLflow run {run_id}"
    )


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
