"""Simulated annotators: what a person would paint, derived from the synthetic ground-truth masks.

Realistic noise, per annotator and pair (seeded by both, so reruns are identical):
* the brush edge wanders: each region is dilated or eroded by 0–`edge_px` pixels;
* a small conflict region (< `small_px` pixels) is missed with probability `p_miss`;
* a stray dab of conflict (a disc of radius 1–2 px) lands on the face with probability `p_stray`.
Used by the `annotate` stage's synthetic backend (so `dvc repro` needs no server) and by the
scripted-annotator test against the real server.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from models.refsel import MASK_CONFLICT, MASK_CONSISTENT, MASK_IGNORE


@dataclass(frozen=True)
class AnnotatorNoise:
    edge_px: int = 1
    p_miss: float = 0.1
    small_px: int = 12
    p_stray: float = 0.15


def _shift_or(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= r * r:
                out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


def _morph(m: np.ndarray, step: int) -> np.ndarray:
    """Dilate (step > 0) or erode (step < 0) a boolean mask by |step| pixels (disc element)."""
    if step == 0:
        return m
    return _shift_or(m, step) if step > 0 else ~_shift_or(~m, -step)


def _components(m: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (small masks: a plain flood fill)."""
    seen = np.zeros_like(m)
    comps = []
    h, w = m.shape
    for y0, x0 in zip(*np.nonzero(m)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and m[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        c = np.zeros_like(m)
        ys, xs = zip(*comp)
        c[list(ys), list(xs)] = True
        comps.append(c)
    return comps


def annotator_rng(seed: int, annotator: str, pair_key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(annotator.encode()), zlib.crc32(pair_key.encode())])


def simulate(
    truth: np.ndarray, rng: np.random.Generator, noise: AnnotatorNoise = AnnotatorNoise()
) -> np.ndarray:
    """A noisy human-like copy of a contract mask (H, W) uint8 {0, 1, 255}."""
    conflict = truth == MASK_CONFLICT
    ignore = truth == MASK_IGNORE
    kept = np.zeros_like(conflict)
    for c in _components(conflict):
        if c.sum() < noise.small_px and rng.random() < noise.p_miss:
            continue
        kept |= c
    conflict = _morph(kept, int(rng.integers(-noise.edge_px, noise.edge_px + 1))) if kept.any() else kept
    ignore = _morph(ignore, int(rng.integers(-noise.edge_px, noise.edge_px + 1)))
    if rng.random() < noise.p_stray:
        face = np.argwhere(truth == MASK_CONSISTENT)
        if len(face):
            y, x = face[rng.integers(len(face))]
            r = int(rng.integers(1, 3))
            yy, xx = np.ogrid[: truth.shape[0], : truth.shape[1]]
            conflict |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    out = np.full(truth.shape, MASK_CONSISTENT, np.uint8)
    out[ignore] = MASK_IGNORE
    out[conflict] = MASK_CONFLICT
    return out
