"""Stage `register`: log the evaluated model as an MLflow pyfunc, register it as `challenger`, and
promote it to `champion` only when the gate passes.

    python -m stages.register --evaluate data/evaluate --metrics-in metrics/evaluate.json \
        --report reports/promotion.md --metrics metrics/register.json

MLflow: `MLFLOW_TRACKING_URI` or `sqlite:///mlflow.db`. One run `register` per stage run with the
evaluation metrics; the model (pipelines/registry.py: rebuilds the network from the bundle) with a
signature and an input example; a new version of `register.model_name` (unless a version with the same
bundle hash exists: then that version is re-gated), alias `challenger`; the gate's decision and reasons
as version tags and in the report. The first model ever becomes champion. The gate compares the
primary metric paired on the same targets (`data/evaluate/per_target.json`) with a 95 % interval.
The report and metrics hold nothing machine-specific (no run ids, no URIs), so that they are the
same wherever the stage runs; `mlflow_sync` rebuilds the registry from them on a fresh clone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.champion import champion_on_targets, same_targets
from pipelines.io import read_json, write_bytes, write_json
from pipelines.registry import (
    Gate,
    blocking,
    bundle_sha,
    decide,
    evaluation_tag,
    find_version,
    flatten,
    log_model_version,
)
from pipelines.tracking import mark_run, registry_uri, tracking_uri
from stages._common import load_params, parser, setup_logging

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = [str(ROOT / "pipelines"), str(ROOT / "models")]


def logged_json(client, mv, name: str) -> dict | None:
    """A JSON file the register run of model version `mv` logged (`per_target.json`, `evaluation.json`),
    or None."""
    import tempfile

    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as d:
            path = client.download_artifacts(mv.run_id, name, d)
            return json.loads(Path(path).read_text())
    except (MlflowException, OSError):
        return None


def champion_targets(client, mv) -> dict | None:
    """The champion's per-target values (the `per_target.json` its register run logged), or None."""
    return logged_json(client, mv, "per_target.json")


def champion_metrics(client, mv) -> dict | None:
    """The champion's flat evaluation metrics: the `evaluation.json` its register run logged. The
    `evaluation` tag holds only what fits MLflow's tag limit (`evaluation_tag`); it is read only for a
    version whose run logged no file."""
    evaluation = logged_json(client, mv, "evaluation.json")
    if evaluation is not None:
        return flatten(evaluation)
    try:
        return json.loads(mv.tags.get("evaluation", "{}")) or None
    except json.JSONDecodeError:  # a tag cut at the limit by an earlier version of this stage
        return None


def champion_evidence(client, name: str, champ, targets, gate: Gate, cfgs: dict, args) -> tuple:
    """(champion's flat metrics, its per-target values, a note or None) to decide against: its own
    evaluation, or, when the challenger was evaluated on other targets, its bundle re-evaluated on the
    challenger's (pipelines.champion; cached per bundle and targets)."""
    if champ is None:
        return None, None, None
    metrics = champion_metrics(client, champ)
    own = champion_targets(client, champ)
    sets = gate_sets(gate)
    if targets is None or same_targets(targets, own, sets):
        return metrics, own, None
    if not args.eval_sets:  # decide then refuses: no paired comparison is possible
        return (
            metrics,
            None,
            (
                f"the challenger was evaluated on other targets than champion version {champ.version}, and "
                "register was given no --eval-sets to re-evaluate the champion on"
            ),
        )
    try:
        ev, pt, how = champion_on_targets(
            client, name, champ, targets, sets, args.eval_sets, cfgs["evaluate"], cfgs["embed"], args.encoders,
            cfgs["register"].experiment,
        )  # fmt: skip
    except ValueError as exc:
        return metrics, own, f"champion version {champ.version} could not be re-evaluated: {exc}"
    n = len(pt[sets[0]]["keys"]) if sets else 0
    note = (
        f"the evaluation sets changed since champion version {champ.version} was evaluated: its own bundle "
        f"was re-evaluated on the challenger's {n} targets of {', '.join(sets)} ({how}), and the decision "
        "below is paired on those"
    )
    return flatten(ev), pt, note


def gate_sets(gate: Gate) -> list[str]:
    """The evaluation sets the gate's primary metric and guards read."""
    return sorted({k.split("/")[0] for k in (gate.primary, *gate.guards)})


def gate_challenger(
    client: MlflowClient,
    name: str,
    version: str,
    flat: dict,
    targets: dict | None,
    gate: Gate,
    cfgs: dict,
    args: argparse.Namespace,
) -> tuple[ModelVersion | None, bool, list[str]]:
    """(champion version before or None, promote, reasons): the gate's decision on `version` against the
    champion (a version that already holds champion is promoted as it is)."""
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    if champ is not None and str(champ.version) == version:
        promote, reasons = True, [f"version {version} already holds champion"]
    else:
        champ_metrics, champ_targets, note = champion_evidence(client, name, champ, targets, gate, cfgs, args)
        promote, reasons = decide(flat, champ_metrics, gate, targets, champ_targets)
        reasons = [note, *reasons] if note else reasons
    return champ, promote, reasons


def promotion_report(
    name: str,
    version: str,
    decision: str,
    sha: str,
    existing: bool,
    champ: ModelVersion | None,
    champion_now: str,
    gate: Gate,
    reasons: list[str],
) -> str:
    """The promotion report (Markdown): decision, bundle, champion before and after, gate, reasons."""
    lines = [
        f"# Promotion decision: {name} version {version} — {decision.upper()}",
        "",
        f"- bundle sha256 `{sha[:16]}…`",
        f"- challenger: version {version}" + (" (re-gated: same bundle as before)" if existing else " (new)"),
        f"- champion before: {'version ' + str(champ.version) if champ else 'none'}; champion now: version "
        f"{champion_now}",
        f"- primary: `{gate.primary}`, compared paired on the same targets with a 95 % bootstrap interval "
        f"(min gain {gate.min_gain}); guards: "
        + (", ".join(f"`{k}` ±{v}" for k, v in sorted(gate.guards.items())) or "none"),
        "",
        "## Reasons",
        "",
        *[f"- {r}" for r in reasons],
        "",
        f"Load it: `refface restore LQ.png --ref R1.png --out OUT.png --model models:/{name}@champion`. The MLflow run "
        "and the registry state are restored from these DVC outputs by the `mlflow_sync` stage on any machine.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--evaluate", "--metrics-in", "--report", "--metrics"):
        p.add_argument(a, required=True)
    p.add_argument(
        "--eval-sets", help="the evaluation sets: the champion is re-evaluated on them when needed"
    )
    p.add_argument("--encoders", help="the evaluator encoder's folder (with --eval-sets)")
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "register", "evaluate", "embed")
    cfg = cfgs["register"]
    import mlflow
    from mlflow import MlflowClient

    bundle = Path(args.evaluate) / "bundle"
    if not (bundle / "bundle.json").is_file():
        raise SystemExit(f"error: {bundle} is not a model bundle; run `dvc repro evaluate` first")
    evaluation = read_json(args.metrics_in)
    targets_file = Path(args.evaluate) / "per_target.json"
    targets = read_json(targets_file) if targets_file.is_file() else None
    flat = flatten(evaluation)
    gate = Gate(cfg.primary, cfg.min_gain, dict(cfg.guards))
    if gate.primary not in flat:
        raise SystemExit(
            f"error: register.primary {gate.primary!r} is not in {args.metrics_in}; valid names look like "
            f"{sorted(flat)[:3]}"
        )
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri())
    client = MlflowClient()
    sha = bundle_sha(bundle)
    name = cfg.model_name
    existing = find_version(client, name, sha)

    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name="register") as run:
        mlflow.log_params(
            {"model_name": name, "bundle_sha": sha, "primary": gate.primary, "min_gain": gate.min_gain}
        )
        mlflow.log_metrics({k.replace(" ", "_"): v for k, v in flat.items()})
        mlflow.log_dict(evaluation, "evaluation.json")
        if targets is not None:
            mlflow.log_dict(targets, "per_target.json")
        version = (
            str(existing.version) if existing is not None else log_model_version(bundle, name, CODE_PATHS)
        )
        client.set_model_version_tag(name, version, "evaluation", evaluation_tag(flat))
        client.set_registered_model_alias(name, "challenger", version)

        champ, promote, reasons = gate_challenger(client, name, version, flat, targets, gate, cfgs, args)
        if promote:
            client.set_registered_model_alias(name, "champion", version)
        decision = "promoted" if promote else "rejected"
        client.set_model_version_tag(name, version, "gate_decision", decision)
        client.set_model_version_tag(name, version, "gate_reasons", " | ".join(reasons)[:5000])
        mlflow.set_tags({"gate_decision": decision, "model_version": version})

    champion_now = str(client.get_model_version_by_alias(name, "champion").version)
    report = promotion_report(
        name, version, decision, sha, existing is not None, champ, champion_now, gate, reasons
    )
    write_bytes(args.report, report.encode())
    write_json(
        args.metrics,
        {
            "model_name": name,
            "version": int(version),
            "decision": decision,
            "primary": flat[gate.primary],
            "bundle_sha": sha,
        },
    )
    mark_run(client, run.info.run_id, "register", args.metrics)
    shown = reasons[:1] if promote else (blocking(reasons) or reasons[:1])  # a refusal names what refused it
    print(f"register: {name} v{version} {decision} ({'; '.join(shown[:2])})")


if __name__ == "__main__":
    main()
