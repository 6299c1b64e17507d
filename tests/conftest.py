"""Shared fixtures: small images of every kind the ingest must handle."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("REFFACE_PROGRESS", "0")

REPO = Path(__file__).resolve().parents[1]


def face_png(seed: int = 0, size: int = 64) -> bytes:
    """A small synthetic face as PNG bytes."""
    from pipelines.images import png_bytes
    from pipelines.synthetic import face_spec, render

    return png_bytes(render(face_spec(seed, "album", seed, 0), 128, size))


def save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rgb(seed: int, size: int = 64) -> Image.Image:
    return Image.open(io.BytesIO(face_png(seed, size))).convert("RGB")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
