"""Short train-and-evaluate runs: one ablation variant or one Optuna trial.

A short run trains a fresh network with Lightning on the same online degradations as `train` (the
stream runs inline in the process, so that a run can itself be a Ray task on a cluster), reports a
validation metric every `report_every` steps (an Optuna trial prunes on it) and ends with the
validation metrics of `pipelines.training.evaluate`. The score is the restored identity similarity to
the target (evaluator encoder) with references — the quantity IConFace optimises — and PSNR is kept
beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from pipelines.shards import shard_paths
from pipelines.training import (
    IConFaceModule,
    StreamDataModule,
    build_network,
    evaluate,
)

SCORE = "restored_id_sim"


def short_run(
    cfg,
    dcfg,
    shards: str,
    id_encoder,
    evaluator,
    val: dict,
    steps: int,
    report_every: int = 0,
    report: Callable[[int, float], None] | None = None,
    val_steps: int = 2,
    progress: bool = False,
) -> dict:
    """Train `cfg` for `steps` optimiser steps and evaluate; `report(step, score)` may raise to stop."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    cfg = replace(cfg, max_steps=steps)
    torch.manual_seed(cfg.seed)
    net, codec, text = build_network(cfg, id_encoder.cfg.embedding_dim)
    module = IConFaceModule.from_config(net, codec, id_encoder, text, cfg)
    dm = StreamDataModule(
        shard_paths(shards, "train"),
        dcfg.preset,
        dcfg.seed,
        cfg.batch_size,
        dcfg.max_in_flight,
        tuple(cfg.ref_schedule),
        cfg.max_refs,
        dcfg.shuffle,
        inline=True,
    )
    curve: list[tuple[int, float]] = []

    class Report(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if report_every and step % report_every == 0 and step < steps:
                value = evaluate(pl_module, val, evaluator, val_steps, cfg.val_guidance)[0][SCORE]
                curve.append((step, value))
                if report is not None:
                    report(step, value)

    trainer = L.Trainer(
        max_steps=steps,
        accelerator=cfg.accelerator,
        devices=1,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate,
        callbacks=[Report()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    metrics, _ = evaluate(module, val, evaluator, val_steps, cfg.val_guidance)
    metrics["train_s"] = round(time.perf_counter() - t0, 1)
    metrics["final_loss"] = round(
        sum(h["loss"] for h in module.history[-10:]) / max(len(module.history[-10:]), 1), 5
    )
    metrics["trainable_parameters"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    metrics["curve"] = curve
    return metrics
