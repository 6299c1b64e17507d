"""Shared fixtures: small images of every kind the ingest must handle."""

from __future__ import annotations

import io
import os
from pathlib import Path

# Before numpy (and torch, cv2) load: the CPU pins act only then, so the tests run pinned (pipelines.cpu_pins).
from pipelines.cpu_pins import pin_cpu_numerics  # isort: skip
from pipelines.malloc import keep_freed_memory  # isort: skip

pin_cpu_numerics()
keep_freed_memory()  # freed memory stays in the process (pipelines.malloc), as in the stages

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

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


def make_shards(
    root: Path,
    n: int,
    refs: int = 2,
    per_shard: int = 64,
    corrupt_key: str | None = None,
    split: str = "train",
    emb_dim: int = 4,
) -> list[str]:
    """Write `n` train samples (target + `refs` references + masks + embeddings) as shards under root.

    With `corrupt_key`, that sample's gt.png holds garbage bytes (a sample that fails to decode).
    """
    import json as _json

    from pipelines.images import png_bytes
    from pipelines.shards import npy_bytes, write_split
    from pipelines.synthetic import conflict_mask, face_spec, render

    pngs = [png_bytes(render(face_spec(3, "album", i, j), 128, 32)) for i in range(8) for j in range(4)]
    spec0, spec1 = face_spec(3, "album", 0, 0), face_spec(3, "album", 0, 1)
    mask = png_bytes(conflict_mask(spec0, spec1, 32))

    def samples():
        for i in range(n):
            key = f"s{i:05d}"
            s = {"__key__": key, "gt.png": b"garbage" if key == corrupt_key else pngs[i % len(pngs)]}
            for k in range(refs):
                s[f"ref{k}.png"] = pngs[(i + k + 1) % len(pngs)]
                s[f"refmask{k}.png"] = mask
            s["meta.json"] = _json.dumps({"ref_count": refs, "target": key}).encode()
            s["gt_emb.npy"] = npy_bytes(np.full(emb_dim, i, np.float32))
            s["ref_emb.npy"] = npy_bytes(np.ones((refs, emb_dim), np.float32))
            yield s

    entries = write_split(Path(root), split, samples(), per_shard)
    return [str(Path(root) / e["name"]) for e in entries]


def make_pair_shards(
    root: Path,
    identities: tuple[int, int, int] = (6, 2, 3),
    images: int = 4,
    size: int = 32,
    seed: int = 3,
    emb_dim: int = 4,
) -> Path:
    """Shards by the contract (index.json, meta with refs, synthetic ground-truth masks, conflict types)
    for identities split (train, val, test): each image of an identity is a target, the others its refs."""
    import json as _json

    from pipelines.images import png_bytes
    from pipelines.shards import FORMAT_VERSION, INDEX_NAME, npy_bytes, write_split
    from pipelines.synthetic import conflict_kinds, conflict_mask, face_spec, render

    root = Path(root)
    index = {
        "format_version": FORMAT_VERSION,
        "config": {"samples_per_shard": 16, "resolution": size},
        "encoder": "test",
        "splits": {},
    }
    start = 0
    for split, n_id in zip(("train", "val", "test"), identities):

        def samples(lo=start, n_id=n_id, split=split):
            for i in range(lo, lo + n_id):
                specs = [face_spec(seed, "album", i, j) for j in range(images)]
                pngs = [png_bytes(render(s, 2 * size, size)) for s in specs]
                for t in range(images):
                    refs = [j for j in range(images) if j != t]
                    key = f"id{i:03d}img{t}"
                    s = {"__key__": key, "gt.png": pngs[t]}
                    for k, j in enumerate(refs):
                        s[f"ref{k}.png"] = pngs[j]
                        s[f"refmask{k}.png"] = png_bytes(conflict_mask(specs[t], specs[j], size))
                    meta = {
                        "target": key,
                        "identity": f"id{i:03d}",
                        "refs": [f"id{i:03d}img{j}" for j in refs],
                        "ref_count": len(refs),
                        "split": split,
                        "mask_provenance": ["synthetic"] * len(refs),
                        "conflict_types": [conflict_kinds(specs[t], specs[j]) for j in refs],
                    }
                    s["meta.json"] = _json.dumps(meta, sort_keys=True).encode()
                    s["gt_emb.npy"] = npy_bytes(np.full(emb_dim, i, np.float32))
                    s["ref_emb.npy"] = npy_bytes(np.ones((len(refs), emb_dim), np.float32))
                    yield s

        entries = write_split(root, split, samples(), 16)
        index["splits"][split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
        start += n_id
    (root / INDEX_NAME).write_text(_json.dumps(index, indent=2, sort_keys=True))
    return root


def write_encoders(folder: Path) -> Path:
    """Two small 512-d identity encoders (`primary`, `evaluator`) for 32 px faces, seeded."""
    import torch

    from models.id_encoder import IRBackbone, IRConfig, save_encoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in ("primary", "evaluator"):
        save_encoder(
            IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 16, 16, 32), 512)).eval(),
            folder / f"{name}.safetensors",
            name,
        )
    return folder


def write_tiny_bundle(tmp: Path, **train_overrides) -> Path:
    """A tiny restorer bundle (tiny backbone, 32 px, random pathways) written as `evaluate` writes one;
    `train_overrides`: train config keys on top of the tiny one."""
    import torch

    from models.lora import save_trainable
    from pipelines.config import TrainConfig, build
    from pipelines.network import build_network
    from pipelines.restorer import write_bundle

    enc = write_encoders(tmp / "encoders")
    train = {"backbone": "tiny", "pixel_patch": 4, "memory_tokens": 8, "train_backbone": True}
    cfg = build(TrainConfig, {**train, "front_end": 0, "front": None, **train_overrides}, "train")
    net, _, _ = build_network(cfg, 512)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    save_trainable(net, tmp / "model")
    return write_bundle(
        tmp / "bundle", cfg, tmp / "model", "small_ir", enc / "primary.safetensors", 32, steps=2
    )
