"""Pictures for people: image grids with labels, and conflict masks drawn over references.

PIL only (no matplotlib state), fixed fonts and no metadata, so the PNG bytes are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.images import png_bytes
from pipelines.io import write_bytes


def mask_overlay(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference image with its conflict mask drawn on it: conflict red, ignore dimmed, consistent as is.

    `mask` may have another size than `img`; it is resized with nearest neighbour.
    """
    if mask.shape[:2] != img.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(img.shape[1::-1], Image.Resampling.NEAREST))
    out = img.astype(np.float32).copy()
    out[mask == 255] *= 0.35
    red = np.array([255.0, 0.0, 0.0])
    out[mask == 1] = out[mask == 1] * 0.35 + red * 0.65
    return np.round(out).astype(np.uint8)


def change_map(a: np.ndarray, b: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """Where two (H, W, 3) uint8 images differ: |a - b| averaged over channels, times `gain`, as a
    black-red-yellow-white heat map (uint8 RGB). Used to show what references changed in an output
    that looks, at a glance, like the blind one."""
    if a.shape != b.shape:
        raise ValueError(f"change_map: shapes differ, {a.shape} vs {b.shape}")
    d = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=2) * gain / 255.0
    d = np.clip(d, 0.0, 1.0)
    rgb = np.stack([np.clip(3 * d, 0, 1), np.clip(3 * d - 1, 0, 1), np.clip(3 * d - 2, 0, 1)], axis=2)
    return np.round(rgb * 255.0).astype(np.uint8)


def grid_image(
    rows: Sequence[Sequence[np.ndarray | None]],
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: int | None = None,
    pad: int = 4,
) -> np.ndarray:
    """Compose rows of (H, W, 3) uint8 images (None = empty cell) into one labelled RGB image."""
    cells = [c for r in rows for c in r if c is not None]
    if not cells:
        raise ValueError("grid_image: no images")
    size = cell or max(max(c.shape[0], c.shape[1]) for c in cells)
    ncol = max(len(r) for r in rows)
    left = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = (14 if title else 0) + (12 if col_labels else 0)
    w = left + ncol * (size + pad) + pad
    h = top + len(rows) * (size + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0))
    if col_labels:
        for j, lab in enumerate(col_labels):
            draw.text((left + pad + j * (size + pad), top - 12), lab, fill=(0, 0, 0))
    for i, r in enumerate(rows):
        y = top + pad + i * (size + pad)
        if row_labels:
            draw.text((2, y + size // 2 - 5), row_labels[i], fill=(0, 0, 0))
        for j, c in enumerate(r):
            if c is None:
                continue
            im = Image.fromarray(c)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(im, (left + pad + j * (size + pad), y))
    return np.asarray(canvas)


def save_grid(path: str | Path, rows, **kwargs) -> None:
    write_bytes(path, png_bytes(grid_image(rows, **kwargs)))
