"""The champion on the challenger's targets: paired promotion decisions after the evaluation sets change.

`register` compares the challenger with the champion paired on the same targets. When the evaluation
sets have changed since the champion was evaluated (another seed, another split, new data), the two
`per_target.json` files name different targets; then the champion's own bundle (downloaded from the
registry, the version that holds the alias) restores the challenger's evaluation sets under the same
`evaluate` settings, and the decision is taken on that paired comparison.

The champion's re-evaluation is cached in the tracking store, keyed by (champion bundle sha256, digest of
the challenger's targets): an MLflow run tagged `refface.reeval_bundle` / `refface.reeval_targets` holds
`evaluation.json` and `per_target.json`, so a team's shared registry pays for it once per data change.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from pipelines.config import EmbedConfig, EvaluateConfig

TAG_BUNDLE, TAG_TARGETS = "refface.reeval_bundle", "refface.reeval_targets"


def targets_digest(per_target: dict, sets: list[str]) -> str:
    """sha256 of the targets of `sets` (keys and content digest): what the champion must be evaluated on."""
    keys = {s: [per_target.get(s, {}).get(k) for k in ("keys", "content")] for s in sorted(sets)}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def same_targets(a: dict | None, b: dict | None, sets: list[str]) -> bool:
    """Both evaluated on the same targets of `sets`: the same keys and the same pixels (an evaluation
    written before the content digest existed counts as other targets)."""
    if a is None or b is None:
        return False
    for s in sets:
        x, y = a.get(s, {}), b.get(s, {})
        if x.get("keys") != y.get("keys") or x.get("content") is None or x.get("content") != y.get("content"):
            return False
    return True


def evaluate_bundle(
    bundle: str | Path,
    eval_sets: str,
    sets: list[str],
    cfg: EvaluateConfig,
    ecfg: EmbedConfig,
    encoders_dir: str | None,
) -> tuple[dict, dict]:
    """(evaluation metrics {"sets": ...}, per-target values) of `bundle` on `sets` of `eval_sets`, exactly
    as stage `evaluate` computes them (pipelines.set_evaluation)."""
    from pipelines.embedding import load_encoders
    from pipelines.quality import load_weight_metrics
    from pipelines.restorer import Restorer
    from pipelines.set_evaluation import evaluate_set, row_means, targets_record

    restorer = Restorer(bundle, threads=cfg.threads)
    encoders = load_encoders(ecfg, encoders_dir)
    wm = load_weight_metrics(cfg.weights)
    results, targets = {}, {}
    for name in sorted(sets):
        res = evaluate_set(
            restorer, eval_sets, name, cfg, restorer.encoder, encoders.evaluator, ecfg.crop_border, wm
        )
        results[name] = {row: row_means(v) for row, v in res.values.items()}
        targets[name] = targets_record(res)
    return {"sets": results}, targets


def champion_on_targets(
    client,
    model_name: str,
    champion,
    challenger_targets: dict,
    sets: list[str],
    eval_sets: str,
    cfg: EvaluateConfig,
    ecfg: EmbedConfig,
    encoders_dir: str | None,
    experiment: str,
) -> tuple[dict, dict, str]:
    """(champion's evaluation metrics, its per-target values, "cached" | "computed") on the challenger's
    targets. Raises ValueError when the re-evaluation does not land on the challenger's targets."""
    import mlflow

    sha = champion.tags.get("bundle_sha", "")
    digest = targets_digest(challenger_targets, sets)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        runs = client.search_runs(
            [exp.experiment_id],
            f"tags.`{TAG_BUNDLE}` = '{sha}' and tags.`{TAG_TARGETS}` = '{digest}'",
            max_results=1,
        )
        if runs:
            with tempfile.TemporaryDirectory() as d:
                ev = json.loads(
                    Path(client.download_artifacts(runs[0].info.run_id, "evaluation.json", d)).read_text()
                )
                pt = json.loads(
                    Path(client.download_artifacts(runs[0].info.run_id, "per_target.json", d)).read_text()
                )
            return ev, pt, "cached"
    with tempfile.TemporaryDirectory() as d:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{champion.version}", dst_path=d
        )
        found = sorted(Path(local).rglob("bundle.json"))
        if not found:
            raise ValueError(
                f"champion version {champion.version}: no restorer bundle in its model artifacts"
            )
        ev, pt = evaluate_bundle(found[0].parent, eval_sets, sets, cfg, ecfg, encoders_dir)
    if not same_targets(pt, challenger_targets, sets):
        raise ValueError(
            "the champion's re-evaluation did not land on the challenger's targets (evaluate settings "
            "changed between the challenger's evaluation and register?)"
        )
    active = mlflow.active_run()
    with mlflow.start_run(run_name=f"reevaluate champion v{champion.version}", nested=active is not None):
        mlflow.set_tags({TAG_BUNDLE: sha, TAG_TARGETS: digest, "champion_version": str(champion.version)})
        mlflow.log_dict(ev, "evaluation.json")
        mlflow.log_dict(pt, "per_target.json")
    return ev, pt, "computed"
