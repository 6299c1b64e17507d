"""Image loading with validation: one function turns any file into 8-bit RGB, or says why it can't.

`load_rgb` is used by `ingest` (to validate and record conversions) and by every later stage (to read
the same pixels again), so the conversions are defined once.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

RESIZE_METHODS = {
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


class ImageProblem(ValueError):
    """An image that cannot be used; `reason` is a short code, the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadInfo:
    mode: str  # the file's original PIL mode
    format: str | None
    conversions: list[str] = field(default_factory=list)  # what was done to reach 8-bit RGB


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def stable_message(exc: BaseException) -> str:
    """The decoder's message as a function of the file only: Pillow names the in-memory buffer by its
    object address (`<_io.BytesIO object at 0x7f…>`), which differs on every run."""
    return _ADDRESS.sub("the file's bytes", str(exc))


def load_rgb(
    path: str | Path, alpha: str = "composite", data: bytes | None = None
) -> tuple[np.ndarray, LoadInfo]:
    """Decode `path` fully to an (H, W, 3) uint8 RGB array with EXIF orientation applied.

    Conversions (each recorded in `LoadInfo.conversions`): EXIF transpose; CMYK/YCbCr/LAB → RGB;
    16-bit and 32-bit integer → 8-bit by scaling; float → 8-bit; grayscale → RGB; palette → RGB(A);
    alpha composited over white (or refused with `alpha="quarantine"`).

    Raises `ImageProblem` with reason ``empty``, ``unreadable``, ``truncated`` or ``alpha``.
    """
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageProblem("unreadable", f"{path}: cannot read file ({exc})") from exc
    if len(data) == 0:
        raise ImageProblem("empty", f"{path}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            im.load()  # full decode: raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
    except OSError as exc:
        msg = stable_message(exc)
        reason = "truncated" if "truncated" in msg.lower() or "broken data" in msg.lower() else "unreadable"
        raise ImageProblem(reason, f"{path}: cannot decode image ({msg})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, ValueError, SyntaxError) as exc:
        raise ImageProblem("unreadable", f"{path}: cannot decode image ({stable_message(exc)})") from exc

    info = LoadInfo(mode=im.mode, format=fmt)
    transposed = ImageOps.exif_transpose(im)
    if transposed is not None and transposed is not im:
        orientation = im.getexif().get(0x0112)
        if orientation not in (None, 1):
            info.conversions.append(f"exif_orientation_{orientation}")
        im = transposed

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16)
        im = Image.fromarray((arr >> 8).astype(np.uint8), "L")
        info.conversions.append(f"{mode}->L (16-bit scaled to 8-bit)")
    elif mode == "I":
        arr = np.asarray(im, dtype=np.int64)
        top = 65535 if arr.max(initial=0) > 255 else 255
        im = Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), "L")
        info.conversions.append("I->L (32-bit integer scaled to 8-bit)")
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
        info.conversions.append("F->L (float scaled to 8-bit)")
    elif mode == "1":
        im = im.convert("L")
        info.conversions.append("1->L")

    if im.mode == "P":
        has_alpha = "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        info.conversions.append(f"P->{im.mode}")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if alpha == "quarantine":
            raise ImageProblem(
                "alpha", f"{path}: has an alpha channel ({im.mode}) and ingest.alpha is 'quarantine'"
            )
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
        info.conversions.append(f"{mode}->RGB (alpha over white)")
    if im.mode == "L":
        im = im.convert("RGB")
        info.conversions.append("L->RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        m = im.mode
        im = im.convert("RGB")
        info.conversions.append(f"{m}->RGB")
    elif im.mode != "RGB":
        m = im.mode
        try:
            im = im.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ImageProblem("unreadable", f"{path}: cannot convert mode {m} to RGB ({exc})") from exc
        info.conversions.append(f"{m}->RGB")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageProblem("not_rgb", f"{path}: not RGB after conversion (shape {arr.shape})")
    return arr, info


def resize(img: np.ndarray, size: int, method: str) -> np.ndarray:
    """Resize a square-ish (H, W, 3) uint8 image to (size, size) with a named method (no-op when equal)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; valid: {', '.join(sorted(RESIZE_METHODS))}")
    return np.asarray(Image.fromarray(img).resize((size, size), RESIZE_METHODS[method]))


def png_bytes(arr: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
