"""Stage `register`: log the evaluated model as an MLflow pyfunc, register it as `challenger`, and
promote it to `champion` only when the gate passes.

    python -m stages.register --evaluate data/evaluate --metrics-in metrics/evaluate.json \
        --report reports/promotion.md --metrics metrics/register.json

MLflow: `MLFLOW_TRACKING_URI` or `sqlite:///mlflow.db`. One run `register` per stage run with the
evaluation metrics; the model (pipelines/registry.py: rebuilds the network from the bundle) with a
signature and an input example; a new version of `register.model_name` (unless a version with the same
bundle hash exists: then that version is re-gated), alias `challenger`; the gate's decision and reasons
as version tags and in the report. The first model ever becomes champion.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipelines.io import read_json, write_bytes, write_json
from pipelines.registry import REF_COLUMNS, Gate, RestorerModel, decide, encode_image, flatten
from stages._common import load_params, parser, setup_logging

ROOT = Path(__file__).resolve().parents[1]


def bundle_sha(bundle: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        h.update(f.relative_to(bundle).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def example_input(resolution: int):
    import pandas as pd

    from pipelines.synthetic import face_spec, render

    imgs = [render(face_spec(11, "album", 0, j), 2 * resolution, resolution) for j in range(2)]
    lq = np.asarray(imgs[0][::2, ::2].repeat(2, 0).repeat(2, 1))  # a blocky stand-in for a degraded face
    return pd.DataFrame(
        {"lq": [encode_image(lq)], "ref1": [encode_image(imgs[1])], "ref2": [""], "ref3": [""]}
    )


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    for a in ("--evaluate", "--metrics-in", "--report", "--metrics"):
        p.add_argument(a, required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "register")
    cfg = cfgs["register"]
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    bundle = Path(args.evaluate) / "bundle"
    if not (bundle / "bundle.json").is_file():
        raise SystemExit(f"error: {bundle} is not a model bundle; run `dvc repro evaluate` first")
    evaluation = read_json(args.metrics_in)
    flat = flatten(evaluation)
    gate = Gate(cfg.primary, cfg.min_gain, dict(cfg.guards))
    if gate.primary not in flat:
        raise SystemExit(
            f"error: register.primary {gate.primary!r} is not in {args.metrics_in}; valid names look like "
            f"{sorted(flat)[:3]}"
        )
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", uri))
    client = MlflowClient()
    sha = bundle_sha(bundle)
    name = cfg.model_name

    existing = None
    try:
        for mv in client.search_model_versions(f"name='{name}'"):
            if mv.tags.get("bundle_sha") == sha:
                existing = mv
                break
    except MlflowException:
        existing = None

    resolution = json.loads((bundle / "bundle.json").read_text())["resolution"]
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name="register") as run:
        mlflow.log_params(
            {"model_name": name, "bundle_sha": sha, "primary": gate.primary, "min_gain": gate.min_gain}
        )
        mlflow.log_metrics({k.replace(" ", "_"): v for k, v in flat.items()})
        mlflow.log_dict(evaluation, "evaluation.json")
        if existing is None:
            example = example_input(resolution)
            from pandas import DataFrame

            signature = infer_signature(example, DataFrame({"restored": ["x"]}))
            signature.inputs = Schema(
                [ColSpec("string", "lq")] + [ColSpec("string", c, required=False) for c in REF_COLUMNS]
            )
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=RestorerModel(),
                artifacts={"bundle": str(bundle)},
                code_paths=[str(ROOT / "pipelines"), str(ROOT / "models")],
                signature=signature,
                input_example=example,
                registered_model_name=name,
                pip_requirements=[],
            )
            version = str(info.registered_model_version)
            client.set_model_version_tag(name, version, "bundle_sha", sha)
        else:
            version = str(existing.version)
        mv = client.get_model_version(name, version)
        client.set_model_version_tag(name, version, "evaluation", json.dumps(flat, sort_keys=True)[:5000])
        client.set_registered_model_alias(name, "challenger", version)

        try:
            champ = client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            champ = None
        champ_metrics = None
        if champ is not None and str(champ.version) != version:
            champ_metrics = json.loads(champ.tags.get("evaluation", "{}")) or None
        if champ is not None and str(champ.version) == version:
            promote, reasons = True, [f"version {version} already holds champion"]
        else:
            promote, reasons = decide(flat, champ_metrics, gate)
        if promote:
            client.set_registered_model_alias(name, "champion", version)
        decision = "promoted" if promote else "rejected"
        client.set_model_version_tag(name, version, "gate_decision", decision)
        client.set_model_version_tag(name, version, "gate_reasons", " | ".join(reasons)[:5000])
        mlflow.set_tags({"gate_decision": decision, "model_version": version})

    lines = [
        f"# Promotion decision: {name} version {version} — {decision.upper()}",
        "",
        f"- tracking URI: `{uri}`; run `{run.info.run_id}`; bundle sha256 `{sha[:16]}…`",
        f"- challenger: version {version}" + (" (re-gated: same bundle as before)" if existing else " (new)"),
        f"- champion before: {'version ' + str(champ.version) if champ else 'none'}; champion now: version "
        f"{client.get_model_version_by_alias(name, 'champion').version}",
        f"- primary: `{gate.primary}` (min gain {gate.min_gain}); guards: "
        + (", ".join(f"`{k}` ±{v}" for k, v in sorted(gate.guards.items())) or "none"),
        "",
        "## Reasons",
        "",
        *[f"- {r}" for r in reasons],
        "",
        f"Load it: `refface restore LQ.png --ref R1.png --out OUT.png --model models:/{name}@champion`",
        "",
    ]
    write_bytes(args.report, "\n".join(lines).encode())
    write_json(
        args.metrics,
        {
            "model_name": name,
            "version": int(version),
            "decision": decision,
            "primary": flat[gate.primary],
            "uri": uri,
        },
    )
    print(f"register: {name} v{version} {decision} ({reasons[0]})")
    del mv


if __name__ == "__main__":
    main()
