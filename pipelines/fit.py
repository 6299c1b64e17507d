"""The one training entry point: `fit(cfg, dcfg, shards, encoders, val)` → metrics.

In the spirit of lightning-hydra-template's `train(cfg)`: it builds the network from the typed `train`
config, the module, the Ray degradation stream and the Lightning `Trainer`, trains, validates and returns
a `FitResult`. The `train` stage (checkpoints, resume, MLflow logger, grids), `ablate` (one call per
Table 3 variant), `tune` (one call per Optuna trial, pruned through `report`) and
`benchmarks/bench_train.py` are thin callers; a fix here reaches all of them.

`FitResult.metrics` holds only what is a function of the inputs (validation metrics, steps, final loss,
the realised reference mix and shortfall, the parameter count): it may go into DVC metrics.
`FitResult.timing` holds the wall-clock figures (train seconds, samples/s, data wait): they go to MLflow
and to the benchmark's printout, never into a DVC-tracked file (a rerun would differ).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from pipelines.batches import Batch
from pipelines.config import DegradeConfig, TrainConfig
from pipelines.embedding import Encoders
from pipelines.shards import shard_paths
from pipelines.trainer import SCORE, FitResult, build_module, make_trainer, stream_data, summarise
from pipelines.validation import evaluate

__all__ = ["SCORE", "FitResult", "fit"]


def _validation_report(
    cfg: TrainConfig,
    encoders: Encoders,
    val: Batch | None,
    val_steps: int,
    steps: int,
    report_every: int,
    report: Callable[[int, float], None] | None,
    curve: list[tuple[int, float]],
):
    """A Lightning callback that validates every `report_every` optimiser steps (strictly inside the
    run), appends (step, SCORE) to `curve` and passes it to `report`."""
    from lightning.pytorch.callbacks import Callback

    class Report(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if (
                report_every
                and val is not None
                and step % report_every == 0
                and 0 < step < steps
                and batch_idx % trainer.accumulate_grad_batches == 0
            ):
                value = evaluate(pl_module, val, encoders.evaluator, val_steps, cfg.val_guidance)[0][SCORE]
                curve.append((step, value))
                if report is not None:
                    report(step, value)

    return Report()


def _start_from(module, init: str | None) -> dict | None:
    """Load the model folder `init` into `module.net` (None: nothing); returns the pathway modules left
    out of it and those that start fresh, by top-level name with their weight counts."""
    if init is None:
        return None
    from models.lora import load_shared

    names = load_shared(module.net, init)

    def by_module(ns: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in ns:
            out[n.split(".")[0]] = out.get(n.split(".")[0], 0) + 1
        return dict(sorted(out.items()))

    return {"from": str(init), "left_out": by_module(names["left_out"]), "fresh": by_module(names["fresh"])}


def _restore_as_loaded(module, val: Batch, val_steps: int, guidance: float) -> torch.Tensor:
    """`val` restored with references by the module as it starts (a fine-tune's knock-out before any
    step); every submodule's train/eval mode is put back as it was, so training is unchanged."""
    modes = [(m, m.training) for m in module.modules()]
    out = module.restore(val, steps=val_steps, guidance=guidance)
    for m, training in modes:
        m.training = training
    return out


def training_degradations(cfg: TrainConfig, dcfg: DegradeConfig) -> DegradeConfig:
    """The `degrade` settings the transformer trains on: `train.degrade_preset` in place of
    `degrade.preset` where it is set (the front end keeps `degrade.preset`)."""
    return dcfg if cfg.degrade_preset is None else replace(dcfg, preset=cfg.degrade_preset)


def fit(
    cfg: TrainConfig,
    dcfg: DegradeConfig,
    shards: str | Sequence[str],
    encoders: Encoders,
    val: Batch | None,
    *,
    steps: int | None = None,
    val_steps: int | None = None,
    report_every: int = 0,
    report: Callable[[int, float], None] | None = None,
    callbacks: Sequence = (),
    logger=False,
    checkpoint=None,
    resume: str | None = None,
    inline: bool = False,
    ray_cpus: int | None = None,
    progress: bool = False,
    init: str | None = None,
) -> FitResult:
    """Train `cfg` (for `steps` optimiser steps, default cfg.max_steps) and validate on `val`.

    `shards`: a shard folder (its `train` split) or a list of shard files; folders and files may be URLs
    (`s3://bucket/prefix`, credentials from the environment: `pipelines.storage`). `report(step, score)` is
    called every `report_every` steps with the validation SCORE and may raise to stop (Optuna pruning).
    `checkpoint`: a Lightning ModelCheckpoint (the train stage); `resume`: a `last.ckpt` to continue.
    `inline`: degrade in this process instead of Ray tasks (a short run that is itself a Ray task).
    `init`: a model folder of the train stage to start from (a fine-tune: `models.lora.load_shared`; the
    pathways it has that `cfg`'s variant lacks are left out, those it lacks start fresh); `metrics["init"]`
    then names both, by module, and `outputs["ref_as_loaded"]` holds `val` restored before the first step.
    Returns on every rank; only rank 0 validates (the others return empty metrics).

    `cfg.launcher: ray` trains on Ray Train workers instead (`pipelines.ray_fit.fit_ray`, same arguments):
    this process is the driver, and validates the final weights itself.
    """
    steps = cfg.max_steps if steps is None else steps
    val_steps = cfg.val_steps if val_steps is None else val_steps
    cfg = replace(cfg, max_steps=steps)
    dcfg = training_degradations(cfg, dcfg)
    run = dict(
        report_every=report_every,
        report=report,
        callbacks=callbacks,
        logger=logger,
        checkpoint=checkpoint,
        resume=resume,
        inline=inline,
        ray_cpus=ray_cpus,
        progress=progress,
    )
    if cfg.launcher == "ray":
        from pipelines.ray_fit import fit_ray

        if init is not None:
            raise ValueError("fit: a fine-tune (init) runs on the local launcher, not train.launcher: ray")
        return fit_ray(cfg, dcfg, shards, encoders, val, val_steps=val_steps, **run)
    torch.set_num_threads(cfg.threads)
    module = build_module(cfg, encoders.primary, encoders.crop_border)
    started = _start_from(module, init)
    as_loaded = (
        _restore_as_loaded(module, val, val_steps, cfg.val_guidance)
        if started is not None and val is not None
        else None
    )
    world = cfg.devices * cfg.num_nodes
    paths = shard_paths(shards, "train") if isinstance(shards, str) else list(shards)
    dm = stream_data(cfg, dcfg, paths, world, inline, ray_cpus)
    curve: list[tuple[int, float]] = []
    validation = _validation_report(cfg, encoders, val, val_steps, steps, report_every, report, curve)

    trainer = make_trainer(
        cfg,
        callbacks=[*([checkpoint] if checkpoint is not None else []), validation, *callbacks],
        logger=logger,
        progress=progress,
        enable_checkpointing=checkpoint is not None,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    fit_s = time.perf_counter() - t0
    wait = dm.dataset.wait_s if dm.dataset else 0.0
    timing = {
        "train_s": round(fit_s, 1),
        "samples_per_s": round(module.samples / max(fit_s, 1e-9), 3),
        "data_wait_fraction": round(wait / max(fit_s, 1e-9), 4),
        "samples_seen_this_run": int(module.samples),
    }
    if trainer.global_rank != 0:
        return FitResult({}, timing, module)
    metrics, outputs = summarise(module, int(trainer.global_step), cfg, encoders, val, val_steps)
    if started is not None:
        metrics["init"] = started
    if as_loaded is not None:
        outputs["ref_as_loaded"] = as_loaded
    return FitResult(metrics, timing, module, outputs, curve)
