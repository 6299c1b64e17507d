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
