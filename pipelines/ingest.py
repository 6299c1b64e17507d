"""Validate every source image: the manifest, the quarantine and counts per reason.

Every listed image ends in exactly one of two files: the manifest (usable, with what was done to
reach 8-bit RGB) or the quarantine (with a reason and a message naming the file). One bad image
never stops the run. Every reason and message is a function of the file's bytes and name only (no
object addresses, no timestamps), so a second run writes the same bytes. A photo found under two
identities is quarantined as `identity_conflict`, naming both.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipelines.config import IngestConfig
from pipelines.faces import FaceError
from pipelines.images import ImageProblem, load_rgb, png_bytes
from pipelines.io import write_bytes
from pipelines.sources import SourceListing


@dataclass
class IngestResult:
    manifest: list[dict]
    quarantine: list[dict]
    metrics: dict


def _duplicate(item, first_id: str, first_identity: str | None, how: str) -> dict:
    """A repeated photo: a plain duplicate, or an identity conflict when the two copies are filed under
    different identities (one of the two labels is wrong; both are named)."""
    if item.identity is not None and first_identity is not None and item.identity != first_identity:
        return {
            "reason": "identity_conflict",
            "detail": f"{item.path}: {how} {first_id}, but filed under identity {item.identity!r} "
            f"while {first_id} is filed under {first_identity!r}; check both labels",
        }
    return {"reason": "duplicate", "detail": f"{item.path}: {how} {first_id}"}


def ingest(
    listing: SourceListing,
    cfg: IngestConfig,
    progress: bool = True,
    aligner=None,
    aligned_dir: str | Path | None = None,
    face_policy: str = "one",
) -> IngestResult:
    """Validate every listed image. With an `aligner` (pipelines.faces.FaceAligner; `source.align:
    ffhq`), every photo that passes is detected and aligned, the crop written to `aligned_dir/<image
    id>.png` and used downstream (`path`); the original stays in `source_path`, the landmarks and the
    transform in `face`. No face, several faces (policy `one`) or a face below the aligner's minimum
    are quarantined with that reason."""
    manifest, quarantine = [], []
    for p in listing.problems:
        quarantine.append({"image_id": None, **p})
    by_bytes: dict[str, tuple[str, str | None]] = {}  # sha256 -> (first image id, its identity)
    by_pixels: dict[str, tuple[str, str | None]] = {}
    for item in tqdm(listing.items, desc="ingest", unit="img", disable=not progress):
        base = {"image_id": item.image_id, "item": item.path}
        try:
            data = open(item.path, "rb").read()
        except OSError as exc:
            quarantine.append({**base, "reason": "unreadable", "detail": f"{item.path}: {exc}"})
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha in by_bytes:
            quarantine.append({**base, **_duplicate(item, *by_bytes[sha], "same bytes as")})
            continue
        try:
            arr, info = load_rgb(item.path, alpha=cfg.alpha, data=data)
        except ImageProblem as exc:
            quarantine.append({**base, "reason": exc.reason, "detail": str(exc)})
            continue
        h, w = arr.shape[:2]
        if min(h, w) < cfg.min_size:
            quarantine.append(
                {
                    **base,
                    "reason": "too_small",
                    "detail": f"{item.path}: {w}x{h} is below ingest.min_size={cfg.min_size}",
                }
            )
            continue
        psha = hashlib.sha256(arr.tobytes() + f"{h}x{w}".encode()).hexdigest()
        if psha in by_pixels:
            quarantine.append(
                {**base, **_duplicate(item, *by_pixels[psha], "same pixels (other encoding) as")}
            )
            continue
        by_bytes[sha] = (item.image_id, item.identity)
        by_pixels[psha] = (item.image_id, item.identity)
        extra, path = {}, item.path
        if aligner is not None:
            try:
                face = aligner.one_face(arr, item.path, face_policy)
            except FaceError as exc:
                quarantine.append({**base, "reason": exc.reason, "detail": str(exc)})
                continue
            crop = aligner.align(arr, face)
            path = str(Path(aligned_dir) / f"{item.image_id}.png")
            write_bytes(path, png_bytes(crop))
            extra = {"source_path": item.path, "face": face.record()}
            h, w = crop.shape[:2]
        manifest.append(
            {
                "image_id": item.image_id,
                "path": path,
                "relpath": item.relpath,
                "identity": item.identity,
                "split": item.split,
                "width": w,
                "height": h,
                "sha256": sha,
                "pixel_sha256": psha,
                "mode": info.mode,
                "format": info.format,
                "conversions": info.conversions,
                "status": "ok",
                **extra,
            }
        )
    manifest.sort(key=lambda r: r["image_id"])
    quarantine.sort(key=lambda r: (str(r["item"]), r["reason"], r["detail"]))
    reasons = Counter(q["reason"] for q in quarantine)
    converted = Counter(c.split(" ")[0] for r in manifest for c in r["conversions"])
    metrics = {
        "listed": len(listing.items),
        "accepted": len(manifest),
        "quarantined": len(quarantine),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "conversions": dict(sorted(converted.items())),
        "identities": len({r["identity"] for r in manifest if r["identity"] is not None}),
    }
    return IngestResult(manifest, quarantine, metrics)
