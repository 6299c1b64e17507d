"""Byte-reproducible safetensors files.

`safetensors.torch.save_file` keeps the header's `__metadata__` in a Rust HashMap, so a file with two
or more metadata entries lists them in a per-process random order: the same weights give different
bytes (and a different DVC hash / model version) from one run to the next. `save_file` here writes the
same tensors and metadata with the metadata keys sorted; the header keeps its length, so every data
offset — and any reader — is unaffected.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors encoding of `tensors` with `metadata`, identical for identical inputs."""
    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen: reordering keys keeps the length; guard the offsets anyway
        raise RuntimeError(f"safetensors header grew from {n} to {len(text)} bytes while sorting metadata")
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :]


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` (see the module docstring); a drop-in for safetensors' save_file."""
    Path(path).write_bytes(to_bytes(tensors, metadata))
