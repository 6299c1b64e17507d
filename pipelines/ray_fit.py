"""`train.launcher: ray`: the same training on Ray Train workers, one DDP rank each, on any Ray cluster.

    cfg = with_overrides(cfg, {"launcher": "ray", "ray.workers": 2})
    result = fit(cfg, dcfg, "data/shards", encoders, val)   # pipelines.fit dispatches here

This process is the driver. `fit_ray` starts local Ray (or joins RAY_ADDRESS, `pipelines.stream.connect`)
and runs a `TorchTrainer` whose workers each build the network, `IConFaceModule` and `StreamDataModule`
exactly as `fit` does and run a Lightning `Trainer` with `RayDDPStrategy`, `RayLightningEnvironment` and
`prepare_trainer` (gloo on CPUs, NCCL on GPUs; Ray Train sets up the process group). Each worker's data
module takes its rank and world size from the trainer, that is from Ray Train's context, so every rank
streams its own equal, disjoint share of the degradations (`pipelines.stream.epoch_order`); it degrades
them itself (`train.ray.degrade: inline`, the default: a worker needs no CPU beyond its own) or in Ray tasks
(`tasks`: they need free CPUs beyond the workers', or they wait for ever).

Checkpoints and faults. Every `checkpoint_every` optimiser steps and at the last one, `RayReport` saves
the Lightning checkpoint and hands it to `ray.train.report` (rank 0 writes it; every rank reports, as Ray
requires); Ray Train keeps the latest under `storage/<run name>`. When a worker dies, Ray Train
restarts the whole group (`FailureConfig(max_failures=train.ray.max_failures)`) and each new worker resumes
from `ray.train.get_checkpoint()`: weights, optimiser, step, reference counters and the stream's
position (the data module skips the batches already consumed). Ray Train takes a report in when its
controller next polls the workers (every couple of seconds): a group that dies before that restarts from
the checkpoint before. A caller's `resume` (the train stage's `last.ckpt`) is used when Ray Train has no
checkpoint of this run yet, so a killed driver resumes as with the local launcher; each `fit_ray` call is
its own Ray Train run, and the storage it owns is removed once the driver has read the final checkpoint.
The caller's `ModelCheckpoint`, logger and callbacks run inside the workers (on every rank, as in
Lightning DDP; MLflow's logger writes from rank 0 only, into the run the driver made).

Results. At the last step rank 0 adds the trainable weights (safetensors) and a summary (loss history,
reference counters, timing) to the final checkpoint; the driver reads them, loads the weights into a
module of its own and validates it (`pipelines.fit.summarise`), so `fit`'s callers get the same
`FitResult`. `report(step, score)` (Optuna's pruning) is replayed on the driver after training: rank 0
records the curve, and a pruned trial stops then instead of mid-run.

Paths. Ray Train runs each worker in its own working folder, so the driver turns every path it ships
(shards, checkpoint folder, resume file, model files) into an absolute one; the caller's own callbacks
and loggers must hold absolute paths and URIs too. On a cluster all of them must be on storage every node
reads at the same path (a shared filesystem), or `train.ray.storage` a URI (s3://...) for Ray Train's
checkpoints; MLflow needs a tracking server (MLFLOW_TRACKING_URI) that the workers reach.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from pipelines.batches import Batch
from pipelines.config import DegradeConfig, TrainConfig
from pipelines.embedding import Encoders
from pipelines.module import IConFaceModule
from pipelines.shards import shard_paths
from pipelines.trainer import SCORE, FitResult, build_module, make_trainer, stream_data, summarise
from pipelines.validation import evaluate

CKPT_NAME = "checkpoint.ckpt"  # the Lightning checkpoint in a Ray Train checkpoint (RayTrainReportCallback)
WEIGHTS_NAME = "trainable.safetensors"  # final checkpoint only: the trainable weights, for the driver
SUMMARY_NAME = "summary.json"  # final checkpoint only: history, counters, timing of rank 0


def _absolute(path: str | None) -> str | None:
    """An absolute local path (URIs such as s3://... unchanged); workers run in another folder."""
    if path is None or "://" in str(path):
        return path
    return str(Path(path).resolve())


def use_gpu(cfg: TrainConfig) -> bool:
    """GPU workers for accelerator gpu/cuda, and for auto when the cluster has GPUs."""
    import ray

    if cfg.accelerator in ("gpu", "cuda"):
        return True
    return cfg.accelerator == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def check_resources(cfg: TrainConfig, gpu: bool, inline: bool) -> None:
    """Fail before launching when the cluster cannot hold the workers (Ray Train would wait for ever)."""
    import ray

    res = ray.cluster_resources()
    cpus, need = res.get("CPU", 0), cfg.ray.workers * cfg.ray.cpus_per_worker
    if need > cpus:
        raise RuntimeError(
            f"train.ray.workers {cfg.ray.workers} x cpus_per_worker {cfg.ray.cpus_per_worker} = {need} CPUs, "
            f"but the Ray cluster has {cpus:g}: lower them, raise degrade.num_cpus (local Ray) or add nodes"
        )
    if not inline and need >= cpus:
        raise RuntimeError(
            f"train.ray.degrade tasks needs CPUs beyond the workers' {need} (the cluster has {cpus:g}): the "
            "degradation tasks would wait for ever. Use train.ray.degrade: inline or fewer/smaller workers"
        )
    if gpu and res.get("GPU", 0) < cfg.ray.workers:
        raise RuntimeError(
            f"train.ray.workers {cfg.ray.workers} GPU workers, but the Ray cluster has {res.get('GPU', 0):g} GPUs"
        )


# ==================================================================================================
# The worker side
# ==================================================================================================


def _trainable(module: IConFaceModule) -> dict[str, torch.Tensor]:
    """The trainable weights under their module keys (`net.…`), as the checkpoints hold them."""
    return {
        f"net.{n}": p.detach().cpu().clone().contiguous()
        for n, p in module.net.named_parameters()
        if p.requires_grad
    }


def _report_callback(every: int, val: Batch | None, evaluator, val_steps: int, report_every: int, guidance):
    from lightning.pytorch.callbacks import Checkpoint

    class RayReport(Checkpoint):
        """Ray Train's report, step-based (ours: RayTrainReportCallback reports once per epoch, and this
        stream's epochs are endless): every `every` optimiser steps and at the last step, the Lightning
        checkpoint goes to `ray.train.report` (rank 0's file; every rank reports, as Ray requires). The
        last one also carries the trainable weights and rank 0's summary for the driver. With
        `report_every`, rank 0 records the validation SCORE curve (replayed on the driver).

        A `Checkpoint` subclass so that Lightning runs it after the caller's ModelCheckpoint (checkpoint
        callbacks go last, in their order): the state it saves already knows that step's `last.ckpt`."""

        def on_train_start(self, trainer, pl_module):
            self.start_step = self.seen = int(trainer.global_step)
            self.t0 = time.perf_counter()
            self.curve: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = int(trainer.global_step)
            if step == self.seen:  # inside an accumulation, or this step is done
                return
            self.seen = step
            if report_every and val is not None and step % report_every == 0 and step < trainer.max_steps:
                if trainer.global_rank == 0:
                    score = evaluate(pl_module, val, evaluator, val_steps, guidance)[0][SCORE]
                    self.curve.append((step, float(score)))
            final = step >= trainer.max_steps
            if final or (every and step % every == 0):
                self._report(trainer, pl_module, step, final)

        def _report(self, trainer, pl_module, step: int, final: bool) -> None:
            import ray.train

            from models.safetensors_io import save_file

            rank0 = trainer.global_rank == 0
            with tempfile.TemporaryDirectory(prefix="refface-ckpt-", ignore_cleanup_errors=True) as d:
                trainer.save_checkpoint(os.path.join(d, CKPT_NAME))  # every rank (a barrier); rank 0 writes
                if rank0 and final:
                    save_file(_trainable(pl_module), os.path.join(d, WEIGHTS_NAME))
                    train_s = time.perf_counter() - self.t0
                    dm = trainer.datamodule
                    summary = {
                        "steps": step,
                        "start_step": self.start_step,
                        "world_size": trainer.world_size,
                        "history": pl_module.history,
                        "mix": {str(k): int(v) for k, v in sorted(pl_module.mix.items())},
                        "shortfall": int(pl_module.shortfall),
                        "samples": int(pl_module.samples),
                        "train_s": train_s,
                        "wait_s": dm.dataset.wait_s if dm is not None and dm.dataset is not None else 0.0,
                        "curve": self.curve,
                    }
                    Path(d, SUMMARY_NAME).write_text(json.dumps(summary))
                metrics = {
                    "step": step,
                    "loss": float(pl_module.history[-1]["loss"]) if pl_module.history else 0.0,
                }
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(d) if rank0 else None,
                    delete_local_checkpoint_after_upload=False,
                )

    return RayReport()


def train_worker(config: dict) -> None:
    """`TorchTrainer`'s train_loop_per_worker: one DDP rank (the marked lines are Ray Train's)."""
    import ray
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    cfg: TrainConfig = config["cfg"]
    dcfg: DegradeConfig = config["dcfg"]
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    module = build_module(cfg, ray.get(config["primary"]), config["crop_border"])
    world = ray.train.get_context().get_world_size()  # Ray Train
    # its rank and world size come from the trainer, i.e. from Ray Train's context
    dm = stream_data(cfg, dcfg, config["paths"], world, config["inline"])
    evaluator = ray.get(config["evaluator"]) if config["evaluator"] is not None else None
    report = _report_callback(
        cfg.checkpoint_every,
        config["val"],
        evaluator,
        config["val_steps"],
        config["report_every"],
        cfg.val_guidance,
    )
    checkpoint = config["checkpoint"]
    trainer = make_trainer(
        cfg,
        callbacks=[*([checkpoint] if checkpoint is not None else []), report, *config["callbacks"]],
        logger=config["logger"],
        progress=config["progress"],
        enable_checkpointing=True,  # RayReport is a checkpoint callback
        accelerator="gpu" if config["use_gpu"] else "cpu",
        devices="auto",
        strategy=RayDDPStrategy(),  # Ray Train
        plugins=[RayLightningEnvironment()],  # Ray Train
    )
    trainer = prepare_trainer(trainer)  # Ray Train
    restart = ray.train.get_checkpoint()  # Ray Train: set when the group restarts after a failure
    if restart is not None:
        with restart.as_directory() as d:
            trainer.fit(module, datamodule=dm, ckpt_path=os.path.join(d, CKPT_NAME))
    else:
        trainer.fit(module, datamodule=dm, ckpt_path=config["resume"])


# ==================================================================================================
# The driver side
# ==================================================================================================


def _open_logger_run(logger) -> None:
    """An MLflow logger's run is created here, by the driver (every worker and restart logs into it);
    its tracking URI must be absolute, since the workers run in another folder."""
    from pipelines.tracking import absolute_uri

    uri = getattr(logger, "_tracking_uri", None)  # Lightning's MLFlowLogger
    if isinstance(uri, str) and absolute_uri(uri) != uri:
        raise ValueError(
            f"the MLflow logger's tracking URI {uri} is relative: Ray Train workers run in another folder; "
            f"pass {absolute_uri(uri)} (pipelines.tracking.absolute_uri) or a tracking server's URI"
        )
    if uri is not None:
        logger.run_id  # noqa: B018 (creates the MLflow run here: every worker and restart logs into it)


def _storage(cfg: TrainConfig, checkpoint) -> str:
    """Where Ray Train keeps this run's checkpoints: `train.ray.storage`, else beside the Lightning
    checkpoints, else a fresh temporary folder (absolute)."""
    storage = cfg.ray.storage
    if storage is None:
        if checkpoint is not None and checkpoint.dirpath is not None:
            storage = os.path.join(checkpoint.dirpath, "ray")
        else:
            storage = tempfile.mkdtemp(prefix="refface-ray-train-")
    return _absolute(storage)


def _final_checkpoint(result, name: str, storage: str) -> tuple[dict, dict]:
    """(the workers' summary, their final weights) from the run's last checkpoint, which must be the
    final one."""
    from safetensors.torch import load_file

    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} ended without a checkpoint (storage {storage})")
    with result.checkpoint.as_directory() as d:
        summary_file = Path(d, SUMMARY_NAME)
        if not summary_file.is_file():
            raise RuntimeError(
                f"Ray Train run {name}: the last checkpoint ({result.checkpoint.path}) is not the final one; "
                "the run stopped before max_steps"
            )
        summary = json.loads(summary_file.read_text())
        state = load_file(str(Path(d, WEIGHTS_NAME)))
    return summary, state


def _driver_module(cfg: TrainConfig, encoders: Encoders, state: dict, summary: dict, name: str):
    """The driver's module: the same network, the workers' final weights and counters."""
    torch.set_num_threads(cfg.threads)
    module = build_module(cfg, encoders.primary, encoders.crop_border, train=False)
    net = module.net
    missing, unexpected = module.load_state_dict(state, strict=False)
    wanted = {f"net.{n}" for n, p in net.named_parameters() if p.requires_grad}
    if unexpected or wanted & set(missing):
        raise RuntimeError(
            f"Ray Train run {name}: the final weights do not fit the driver's network "
            f"(missing {sorted(wanted & set(missing))[:5]}, unexpected {unexpected[:5]})"
        )
    module.history = summary["history"]
    module.mix = Counter({int(k): v for k, v in summary["mix"].items()})
    module.shortfall, module.samples = summary["shortfall"], summary["samples"]
    return module


def _timing(summary: dict, launch_s: float) -> dict:
    """The run's timing figures from the workers' summary and the driver's wall time."""
    train_s = summary["train_s"]
    return {
        "train_s": round(train_s, 1),
        "samples_per_s": round(summary["samples"] * summary["world_size"] / max(train_s, 1e-9), 3),
        "data_wait_fraction": round(summary["wait_s"] / max(train_s, 1e-9), 4),
        "samples_seen_this_run": int(summary["samples"]),
        "launch_s": round(launch_s, 1),  # the driver's wall time: start-up, restarts, training
        "resumed_from_step": int(summary["start_step"]),
    }


def fit_ray(
    cfg: TrainConfig,
    dcfg: DegradeConfig,
    shards: str | Sequence[str],
    encoders: Encoders,
    val: Batch | None,
    *,
    val_steps: int,
    report_every: int = 0,
    report: Callable[[int, float], None] | None = None,
    callbacks: Sequence = (),
    logger=False,
    checkpoint=None,
    resume: str | None = None,
    inline: bool = False,
    ray_cpus: int | None = None,
    progress: bool = False,
) -> FitResult:
    """`fit` on Ray Train workers (see the module docstring); `cfg.max_steps` is the step budget."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.stream import connect

    _open_logger_run(logger)
    connect(dcfg.num_cpus if ray_cpus is None else ray_cpus)
    gpu = use_gpu(cfg)
    inline = inline or cfg.ray.degrade == "inline"
    check_resources(cfg, gpu, inline)
    paths = shard_paths(shards, "train") if isinstance(shards, str) else list(shards)
    paths = [_absolute(p) for p in paths]
    cfg = replace(cfg, **{k: _absolute(getattr(cfg, k)) for k in ("weights", "vae", "prompt_cache", "front")})
    if resume is not None:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"resume: {resume} does not exist")
        resume = _absolute(resume)
    if checkpoint is not None and checkpoint.dirpath is not None:
        checkpoint.dirpath = _absolute(checkpoint.dirpath)
    storage = _storage(cfg, checkpoint)
    name = f"fit-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"  # one per call: restarts only
    config = {
        "cfg": cfg,
        "dcfg": dcfg,
        "paths": paths,
        "primary": ray.put(encoders.primary),
        "crop_border": encoders.crop_border,
        "inline": inline,
        "use_gpu": gpu,
        "checkpoint": checkpoint,
        "resume": resume,
        "callbacks": list(callbacks),
        "logger": logger,
        "progress": progress,
        "report_every": report_every,
        "val": val if report_every else None,
        "evaluator": ray.put(encoders.evaluator) if report_every and val is not None else None,
        "val_steps": val_steps,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    launch_s = time.perf_counter() - t0
    summary, state = _final_checkpoint(result, name, storage)
    # The checkpoints are read: remove this run's folder, or the whole storage when it is ours (the
    # default; it may also hold the runs of drivers that were killed, whose work `resume` carried on).
    if cfg.ray.storage is None:
        shutil.rmtree(storage, ignore_errors=True)
    elif "://" not in storage:
        shutil.rmtree(os.path.join(storage, name), ignore_errors=True)

    module = _driver_module(cfg, encoders, state, summary, name)
    curve = [(int(s), float(v)) for s, v in summary["curve"]]
    if report is not None:
        for step, value in curve:  # may raise (Optuna's pruning), as it would mid-run
            report(step, value)
    timing = _timing(summary, launch_s)
    metrics, outputs = summarise(module, summary["steps"], cfg, encoders, val, val_steps)
    return FitResult(metrics, timing, module, outputs, curve)
