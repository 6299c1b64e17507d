"""Stage `tune`: an Optuna study over what the recipe leaves open; each trial a short train+evaluate.

    python -m stages.tune --shards data/shards --encoders data/encoders --out data/tune --metrics metrics/tune.json

* Search space: params `tune.space` (LR, λ_id, λ_h, T, LoRA rank, memory tokens by default); TPE sampler
  seeded by `tune.seed`; median pruner on the intermediate validation score (restored identity
  similarity, reported every `report_every` steps).
* Storage: `tune.storage` (sqlite `data/optuna/tune.db` by default, outside the DVC output `data/tune`; any SQLAlchemy URL for a shared study).
  `tune.resume: false` (default): every run starts the study afresh, so the outputs are a function of
  the inputs and a fresh clone reproduces them; `true`: continue the study up to `n_trials` finished or
  pruned trials (a shared study; the outputs then depend on its history).
* MLflow: one `tune` run, each trial a nested run (parent tag) with its parameters, curve and score.
* `tune.parallel > 1`: trials run as Ray tasks (local Ray, or the cluster in RAY_ADDRESS), sharing the
  study through the storage.
* Outputs: `best_params.yaml` (a `train:` fragment to review and merge into params.yaml),
  `history.png` and `importance.png` (Optuna's plots), `trials.csv`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from pathlib import Path

import yaml

from pipelines.config import TuneConfig
from pipelines.io import write_bytes, write_json
from stages._common import load_params, parser, setup_logging


def suggest(trial, space: dict) -> dict:
    out = {}
    for name, spec in sorted(space.items()):
        kind = spec[0]
        if kind == "log":
            out[name] = trial.suggest_float(name, float(spec[1]), float(spec[2]), log=True)
        elif kind == "float":
            out[name] = trial.suggest_float(name, float(spec[1]), float(spec[2]))
        elif kind == "int":
            out[name] = trial.suggest_int(name, int(spec[1]), int(spec[2]))
        else:
            out[name] = trial.suggest_categorical(name, list(spec[1:]))
    return out


def run_trials(n: int, params_path: str, shards: str, encoders: str, parent_run: str, storage: str) -> None:
    """Run up to n trials of the study in this process (also the body of a Ray task)."""
    import optuna
    import torch
    from mlflow import MlflowClient

    from pipelines.embedding import load_encoders
    from pipelines.fit import SCORE, fit
    from pipelines.tracking import tracking_uri
    from pipelines.validation import validation_batch

    cfgs = load_params(params_path, "tune", "train", "degrade", "embed")
    cfg, tcfg, dcfg, ecfg = cfgs["tune"], cfgs["train"], cfgs["degrade"], cfgs["embed"]
    threads = max(1, tcfg.threads // max(cfg.parallel, 1))
    torch.set_num_threads(threads)
    enc = load_encoders(ecfg, encoders)
    base = replace(
        tcfg,
        val_samples=cfg.val_samples,
        batch_size=cfg.batch_size,
        accumulate=1,
        seed=cfg.seed,
        threads=threads,
    )
    val = validation_batch(shards, base, base.max_refs)
    client = MlflowClient(tracking_uri())
    exp_id = client.get_run(parent_run).info.experiment_id
    study = optuna.load_study(
        study_name=cfg.study_name, storage=storage, sampler=optuna.samplers.TPESampler(seed=cfg.seed)
    )

    def objective(trial):
        chosen = suggest(trial, cfg.space)
        run = client.create_run(
            exp_id,
            run_name=f"trial {trial.number}",
            tags={"mlflow.parentRunId": parent_run, "optuna.trial": str(trial.number)},
        )
        rid = run.info.run_id
        for k, v in chosen.items():
            client.log_param(rid, k, v)

        def report(step: int, value: float) -> None:
            client.log_metric(rid, f"val/{SCORE}", value, step=step)
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({SCORE} {value:.4f})")

        try:
            r = fit(
                replace(base, **chosen),
                dcfg,
                shards,
                enc,
                val,
                steps=cfg.steps,
                report_every=cfg.report_every,
                report=report,
                val_steps=cfg.val_steps,
                inline=True,
            )
        except optuna.TrialPruned:
            client.set_terminated(rid, "KILLED")
            raise
        m = r.metrics
        for k, v in {**m, **r.timing}.items():
            if isinstance(v, int | float):
                client.log_metric(rid, k, float(v))
        client.set_terminated(rid, "FINISHED")
        return m[SCORE]

    def budget_left(study, _trial):
        done = [t for t in study.trials if t.state.is_finished()]
        if len(done) >= cfg.n_trials:
            study.stop()

    study.optimize(objective, n_trials=n, callbacks=[budget_left])


def open_study(cfg: TuneConfig):
    """Create (or, with `tune.resume`, load) the study in `tune.storage`; without resume an existing study
    of that name is deleted first."""
    import optuna

    from pipelines.tracking import sqlite_path

    storage = cfg.storage
    if (db := sqlite_path(storage)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)  # outside the stage's DVC output: a database's bytes
        # change with every run (timestamps), the outputs must not
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.report_every
    )
    if not cfg.resume:
        # A DVC run of this stage starts the study afresh: trials left in the storage by earlier code or
        # params must not decide today's best (a fresh clone would get another best_value).
        try:
            optuna.delete_study(study_name=cfg.study_name, storage=storage)
        except KeyError:
            pass
    return optuna.create_study(
        study_name=cfg.study_name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=pruner,
    )


def run_trials_on_ray(
    left: int, cfg: TuneConfig, params: str, shards: str, encoders: str, parent_run: str
) -> None:
    """Split `left` trials over `tune.parallel` Ray tasks, each running `run_trials`."""
    from pipelines.stream import connect
    from pipelines.tracking import DEFAULT_DB

    connect(None)
    import ray

    task = ray.remote(num_cpus=1)(run_trials)
    per = [left // cfg.parallel + (1 if i < left % cfg.parallel else 0) for i in range(cfg.parallel)]
    env = {
        "env_vars": {
            "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")
            or "sqlite:///" + str(Path(DEFAULT_DB).resolve())
        }
    }
    ray.get(
        [
            task.options(runtime_env=env).remote(
                k,
                str(Path(params).resolve()),
                str(Path(shards).resolve()),
                str(Path(encoders).resolve()),
                parent_run,
                cfg.storage,
            )
            for k in per
            if k
        ]
    )


def write_best_and_trials(out: Path, cfg: TuneConfig, study, best, n_complete: int) -> None:
    """Write `best_params.yaml` (the best trial's parameters as a commented `train:` fragment) and
    `trials.csv` (one row per trial)."""
    fragment = {
        "train": {k: (float(v) if isinstance(v, float) else v) for k, v in sorted(best.params.items())}
    }
    header = (
        f"# Best of study {cfg.study_name} (trial {best.number}, restored_id_sim {best.value:.4f}, "
        f"{n_complete} complete of {len(study.trials)} trials).\n# Review, then merge into params.yaml's train section.\n"
    )
    write_bytes(out / "best_params.yaml", (header + yaml.safe_dump(fragment, sort_keys=True)).encode())
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        names = sorted(cfg.space)
        w.writerow(["number", "state", "value", *names])
        for t in study.trials:
            w.writerow([t.number, t.state.name, t.value, *[t.params.get(n) for n in names]])


def plot_study(out: Path, study, n_complete: int, seed: int) -> None:
    """Save Optuna's optimisation history as `history.png` and, from two complete trials on, the
    parameter importances (seeded fANOVA) as `importance.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_optimization_history(study)
    ax.figure.tight_layout()
    ax.figure.savefig(out / "history.png", dpi=100)
    plt.close("all")
    if n_complete >= 2:
        try:
            # fANOVA fits a random forest: seeded, or the plot differs between identical studies
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            ax = ovm.plot_param_importances(study, evaluator=evaluator)
            ax.figure.tight_layout()
            ax.figure.savefig(out / "importance.png", dpi=100)
        except (RuntimeError, ValueError) as exc:  # e.g. all trials with the same score
            print(f"tune: no importance plot ({exc})")
        plt.close("all")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--shards", "--encoders", "--out", "--metrics"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "tune", "train")
    cfg, tcfg = cfgs["tune"], cfgs["train"]
    import mlflow
    import optuna

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage
    study = open_study(cfg)
    left = cfg.n_trials - len([t for t in study.trials if t.state.is_finished()])
    from pipelines.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(tcfg.experiment)
    with mlflow.start_run(run_name="tune") as parent:
        mlflow.log_params(
            {"study": cfg.study_name, "storage": storage, "n_trials": cfg.n_trials, "steps": cfg.steps}
        )
        if left > 0:
            if cfg.parallel > 1:
                run_trials_on_ray(left, cfg, args.params, args.shards, args.encoders, parent.info.run_id)
            else:
                run_trials(left, args.params, args.shards, args.encoders, parent.info.run_id, storage)
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise SystemExit(f"error: study {cfg.study_name} has no complete trial (all pruned or failed)")
        best = study.best_trial
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.log_metric("best_value", best.value)
        write_best_and_trials(out, cfg, study, best, len(complete))
        plot_study(out, study, len(complete), cfg.seed)
        for f in ("history.png", "importance.png", "best_params.yaml", "trials.csv"):
            if (out / f).is_file():
                mlflow.log_artifact(str(out / f))
    write_json(
        args.metrics,
        {
            "trials": len(study.trials),
            "complete": len(complete),
            "pruned": len([t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]),
            "best_value": round(best.value, 4),
            "best_params": best.params,
        },
    )
    from pipelines.tracking import mark_run

    mark_run(mlflow.MlflowClient(), parent.info.run_id, "tune", args.metrics)
    print(
        f"tune: {len(complete)}/{len(study.trials)} trials complete; best restored_id_sim {best.value:.4f} with {best.params}"
    )


if __name__ == "__main__":
    main()
