"""What every stage shares: reading params.yaml into typed sections, argv, logging."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, load_sections, read_params

log = logging.getLogger("refface")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def load_params(path: str | Path, *sections: str) -> dict[str, Any]:
    """Parse params.yaml strictly (its `overlay` merged over it) and return the named sections as frozen
    dataclasses; a problem exits with a message naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: params file {path} not found")
    try:
        return load_sections(read_params(path), sections or None)
    except ConfigError as exc:
        raise SystemExit(f"error: {path}: {exc}") from exc


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("REFFACE_LOG", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def progress_enabled() -> bool:
    """tqdm bars on unless REFFACE_PROGRESS=0 (tests and CI logs)."""
    return os.environ.get("REFFACE_PROGRESS", "1") != "0"
