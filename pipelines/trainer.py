"""What `fit` (pipelines.fit) and every Ray Train worker (pipelines.ray_fit) build in the same way: the
module, the data module and the Lightning `Trainer`, and the `FitResult` both return.

The two launchers differ only in where the trainer runs and how its ranks are set up: `fit` passes the
configured accelerator, devices, nodes and strategy; a Ray worker passes Ray Train's strategy and
environment plugin. Everything else (seeded network, frozen-weight dtype, compiled blocks, the stream's
share per rank, precision, accumulation, logging) is built here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.batches import Batch, StreamDataModule
from pipelines.config import DegradeConfig, TrainConfig
from pipelines.embedding import Encoders
from pipelines.module import IConFaceModule, prepare_for_training
from pipelines.network import build_network
from pipelines.validation import evaluate

SCORE = "restored_id_sim"  # what ablate ranks and tune maximises: GT-ID (evaluator) with references


@dataclass
class FitResult:
    metrics: dict
    timing: dict
    module: IConFaceModule
    outputs: dict = field(default_factory=dict)  # the validation restorations {"ref", "none"}
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, SCORE) every report_every


def build_module(cfg: TrainConfig, primary, crop_border: float, train: bool = True) -> IConFaceModule:
    """The network (seeded: identical on every rank and on resume) in its `IConFaceModule`; `train`:
    prepared for training as well (frozen weights' dtype, compiled blocks)."""
    net, codec, text = build_network(cfg, primary.cfg.embedding_dim)
    module = IConFaceModule.from_config(net, codec, primary, text, cfg, crop_border)
    if train:
        prepare_for_training(module, cfg)
    return module


def stream_data(
    cfg: TrainConfig,
    dcfg: DegradeConfig,
    paths: list[str],
    world: int,
    inline: bool,
    ray_cpus: int | None = None,
) -> StreamDataModule:
    """This rank's share of the degradation stream (its rank and world size come from the trainer)."""
    return StreamDataModule(
        paths,
        dcfg.preset,
        dcfg.seed,
        cfg.batch_size // world,
        dcfg.max_in_flight,
        tuple(cfg.ref_schedule),
        cfg.max_refs,
        dcfg.shuffle,
        dcfg.num_cpus if ray_cpus is None else ray_cpus,
        inline=inline,
    )


def make_trainer(
    cfg: TrainConfig,
    *,
    callbacks: Sequence,
    logger,
    progress: bool,
    enable_checkpointing: bool,
    **placement,
):
    """The Lightning `Trainer` of a `train` config; `placement` says where it runs (accelerator, devices,
    num_nodes, strategy, plugins)."""
    import lightning as L

    return L.Trainer(
        max_steps=cfg.max_steps,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate,
        callbacks=list(callbacks),
        logger=logger,
        log_every_n_steps=cfg.log_every,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **placement,
    )


def summarise(
    module: IConFaceModule,
    steps: int,
    cfg: TrainConfig,
    encoders: Encoders,
    val: Batch | None,
    val_steps: int,
) -> tuple[dict, dict]:
    """(metrics, validation outputs) of a trained module: validation on `val`, the steps done, the final
    loss, the realised reference mix and shortfall, the parameter count."""
    net = module.net
    metrics, outputs = {}, {}
    if val is not None:
        metrics, outputs = evaluate(module, val, encoders.evaluator, val_steps, cfg.val_guidance)
    total = max(sum(module.mix.values()), 1)
    metrics.update(
        {
            "steps": int(steps),
            "final_loss": round(
                float(np.mean([h["loss"] for h in module.history[-20:]])) if module.history else float("nan"),
                5,
            ),
            "ref_mix": {str(k): round(v / total, 4) for k, v in sorted(module.mix.items())},
            "ref_draws": int(sum(module.mix.values())),  # samples counted since step 0, resumes included
            "ref_shortfall": int(module.shortfall),
            "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
        }
    )
    return metrics, outputs
