"""Stage `mlflow_sync`: the MLflow side effects of the pipeline follow its DVC outputs.

    python -m stages.mlflow_sync

Why: `train`, `ablate`, `tune` and `register` write to MLflow (runs, the registered model version and
its aliases), but MLflow's store (`mlflow.db` by default) is not in git. On a fresh clone DVC finds those
stages up to date and skips them, so the runs and the registry would never exist there, and
`refface restore` (which loads `models:/refface@champion`) would fail after `make repro`.

Design: each of those stages tags its run with `refface_dvc_output = <stage>:<sha256 of its metrics
file>` (pipelines.tracking.mark_run). This stage is `always_changed` in dvc.yaml: it runs on every
`dvc repro` as one cheap check (no training, about a second when in sync) and, for each stage, looks
for a run with that tag in the tracking store (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). What is
missing is rebuilt from the DVC-tracked outputs, tagged `refface_restored_from: dvc outputs`:

* `train`: a run with the params of params.yaml, the validation metrics of metrics/train.json, the
  loss history of plots/train_loss.csv and the sample grid;
* `ablate`: the parent run and one nested run per variant (metrics/ablate.json);
* `tune`: the parent run, one nested run per trial (data/tune/trials.csv) and the study's plots;
* `register`: the pyfunc model of data/evaluate/bundle registered under `register.model_name` (unless
  a version with the same bundle sha256 exists), alias `challenger`, and `champion` when
  metrics/register.json says the gate promoted it.

It writes no file: a second `dvc repro` reports this one stage and "in sync", nothing else.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipelines.config import flat_dict
from pipelines.io import read_json
from pipelines.tracking import OUTPUT_TAG, output_key, registry_uri, tracking_uri
from stages._common import load_params, parser, setup_logging

RESTORED = {"refface_restored_from": "dvc outputs"}


def _find_run(client, experiment_id: str, key: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.{OUTPUT_TAG} = '{key}'", max_results=1)
    return runs[0] if runs else None


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}{k}": float(v)
        for k, v in d.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _run(client, exp_id: str, name: str, key: str | None, parent: str | None = None) -> str:
    tags = dict(RESTORED)
    if key:
        tags[OUTPUT_TAG] = key
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def _start(client, exp_id: str, stage: str, root: Path) -> tuple[str | None, str | None]:
    """(message, None) when `stage` needs nothing (not run, or its run exists), else (None, new run id)."""
    metrics_file = root / f"metrics/{stage}.json"
    if not metrics_file.is_file():
        return f"{stage}: no metrics/{stage}.json (stage not run); nothing to restore", None
    key = output_key(stage, metrics_file)
    if _find_run(client, exp_id, key):
        return f"{stage}: in sync", None
    return None, _run(client, exp_id, stage, key)


def sync_train(client, exp_id, cfgs, root: Path) -> str:
    done, rid = _start(client, exp_id, "train", root)
    if done:
        return done
    metrics_file = root / "metrics/train.json"
    for section in ("train", "degrade", "embed"):
        for k, v in flat_dict(cfgs[section]).items():
            client.log_param(rid, f"{section}.{k}", str(v)[:500])
    for k, v in _numbers(read_json(metrics_file), "val/").items():
        client.log_metric(rid, k, v)
    plot = root / "plots/train_loss.csv"
    if plot.is_file():
        for row in csv.DictReader(open(plot)):
            for term in ("loss", "fm", "id"):
                client.log_metric(rid, f"train/{term}", float(row[term]), step=int(row["step"]))
    if (root / "data/train/samples.png").is_file():
        client.log_artifact(rid, str(root / "data/train/samples.png"), "grids")
    client.set_terminated(rid, "FINISHED")
    return f"train: restored run {rid}"


def sync_ablate(client, exp_id, root: Path) -> str:
    done, rid = _start(client, exp_id, "ablate", root)
    if done:
        return done
    results = read_json(root / "metrics/ablate.json")
    client.log_param(rid, "variants", ",".join(results))
    for variant, m in results.items():
        child = _run(client, exp_id, f"ablate/{variant}", None, rid)
        client.log_param(child, "variant", variant)
        for k, v in _numbers(m).items():
            client.log_metric(child, k, v)
        client.set_terminated(child, "FINISHED")
    if (root / "reports/ablation.md").is_file():
        client.log_artifact(rid, str(root / "reports/ablation.md"))
    client.set_terminated(rid, "FINISHED")
    return f"ablate: restored run {rid} with {len(results)} nested runs"


def sync_tune(client, exp_id, root: Path) -> str:
    done, rid = _start(client, exp_id, "tune", root)
    if done:
        return done
    m = read_json(root / "metrics/tune.json")
    client.log_metric(rid, "best_value", float(m["best_value"]))
    for k, v in m.get("best_params", {}).items():
        client.log_param(rid, f"best.{k}", v)
    trials = root / "data/tune/trials.csv"
    n = 0
    if trials.is_file():
        for row in csv.DictReader(open(trials)):
            child = _run(client, exp_id, f"trial {row['number']}", None, rid)
            for k, v in row.items():
                if k not in ("number", "state", "value") and v != "":
                    client.log_param(child, k, v)
            if row["value"] not in ("", "None"):
                client.log_metric(child, "restored_id_sim", float(row["value"]))
            client.set_terminated(child, "FINISHED" if row["state"] == "COMPLETE" else "KILLED")
            n += 1
    for f in ("history.png", "importance.png", "best_params.yaml", "trials.csv"):
        if (root / "data/tune" / f).is_file():
            client.log_artifact(rid, str(root / "data/tune" / f))
    client.set_terminated(rid, "FINISHED")
    return f"tune: restored run {rid} with {n} trials"


def sync_register(client, exp_id, cfg, root: Path) -> str:
    from mlflow.exceptions import MlflowException

    from pipelines.registry import bundle_sha, find_version, log_model_version
    from stages.register import CODE_PATHS

    metrics_file, bundle = root / "metrics/register.json", root / "data/evaluate/bundle"
    if not metrics_file.is_file() or not (bundle / "bundle.json").is_file():
        return "register: no metrics/register.json or bundle (stage not run); nothing to restore"
    reg = read_json(metrics_file)
    name, sha = cfg.model_name, bundle_sha(bundle)
    if reg.get("bundle_sha") not in (None, sha):
        return (
            f"register: metrics/register.json was made for bundle {reg['bundle_sha'][:12]}…, the bundle in "
            f"data/evaluate is {sha[:12]}…; run `dvc repro register`"
        )
    done = []
    mv = find_version(client, name, sha)
    if mv is None:
        import mlflow

        with mlflow.start_run(experiment_id=exp_id, run_name="register", tags={**RESTORED}) as run:
            mlflow.log_params({"model_name": name, "bundle_sha": sha, "primary": cfg.primary})
            evaluation = root / "metrics/evaluate.json"
            if evaluation.is_file():
                mlflow.log_dict(read_json(evaluation), "evaluation.json")
            targets = root / "data/evaluate/per_target.json"
            if targets.is_file():
                mlflow.log_dict(read_json(targets), "per_target.json")
            version = log_model_version(bundle, name, CODE_PATHS)
            mlflow.set_tags({"gate_decision": reg["decision"], "model_version": version})
        mv = client.get_model_version(name, version)
        client.set_tag(run.info.run_id, OUTPUT_TAG, output_key("register", metrics_file))
        client.set_model_version_tag(name, version, "gate_decision", reg["decision"])
        client.set_model_version_tag(name, version, "restored_from", "dvc outputs")
        if evaluation.is_file():
            from pipelines.registry import evaluation_tag, flatten

            flat = flatten(read_json(evaluation))
            client.set_model_version_tag(name, version, "evaluation", evaluation_tag(flat))
        done.append(f"registered version {version} (committed as version {reg['version']})")
    version = str(mv.version)

    def alias(a: str):
        try:
            return str(client.get_model_version_by_alias(name, a).version)
        except MlflowException:
            return None

    if alias("challenger") is None:
        client.set_registered_model_alias(name, "challenger", version)
        done.append(f"challenger -> {version}")
    if reg["decision"] == "promoted" and alias("champion") is None:
        client.set_registered_model_alias(name, "champion", version)
        done.append(f"champion -> {version}")
    if alias("champion") is None:
        done.append(
            "no champion in this store: the committed gate decision was 'rejected' and the earlier "
            "champion's bundle is not among the DVC outputs; `dvc repro -f register` re-gates the evaluated "
            "bundle (with no champion it is promoted)"
        )
    return "register: " + ("; ".join(done) if done else f"in sync ({name} v{version})")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--root", default=".", help="the project folder holding the DVC outputs")
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "register", "train", "degrade", "embed")
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(registry_uri())
    client = MlflowClient()
    root = Path(args.root)
    exp_train = mlflow.set_experiment(cfgs["train"].experiment).experiment_id
    exp_reg = mlflow.set_experiment(cfgs["register"].experiment).experiment_id
    lines = [
        sync_train(client, exp_train, cfgs, root),
        sync_ablate(client, exp_train, root),
        sync_tune(client, exp_train, root),
        sync_register(client, exp_reg, cfgs["register"], root),
    ]
    for line in lines:
        print(f"  {line}")
    restored = [x for x in lines if "restored" in x or "registered" in x or "->" in x]
    print(
        f"mlflow_sync: {tracking_uri()} "
        + ("in sync" if not restored else f"restored {len(restored)} stage(s)")
    )


if __name__ == "__main__":
    main()
