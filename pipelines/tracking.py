"""Where MLflow state lives: one place for the tracking and registry URIs.

`MLFLOW_TRACKING_URI` (and `MLFLOW_REGISTRY_URI`) from the environment, else the project's sqlite file
`mlflow.db` in the working folder (the repository root for `dvc repro`). Credentials for a remote
server come from MLflow's own environment variables, never from git.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DB = "mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


def registry_uri() -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def user_set() -> bool:
    """Whether the user chose a tracking URI (else the default sqlite file is meant)."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_REGISTRY_URI"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def absolute_uri(uri: str) -> str:
    """A relative `sqlite:///` URI made absolute: the same file for a process that runs in another
    folder (a Ray Train worker). Other URIs are returned unchanged."""
    db = sqlite_path(uri)
    return uri if db is None or db.is_absolute() else f"sqlite:///{db.resolve()}"


OUTPUT_TAG = "refface_dvc_output"


def output_key(stage: str, path) -> str:
    """`<stage>:<sha256 of the stage's DVC metrics file>`: what an MLflow run was made from."""
    import hashlib

    return f"{stage}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


def mark_run(client, run_id: str, stage: str, metrics_path) -> None:
    """Tag a stage's MLflow run with the DVC output it produced (mlflow_sync finds it by this tag)."""
    client.set_tag(run_id, OUTPUT_TAG, output_key(stage, metrics_path))
