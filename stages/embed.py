"""Stage `embed`: raw identity embeddings for every manifest image.

    python -m stages.embed --ingest data/ingest --out data/embeddings

Writes `embeddings.npy` (N, D) float32 raw vectors (unit direction times the encoder's norm, the
quality proxy) in manifest order, and `embeddings.json` with the image ids, the encoder's name and
the sha256 of its checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipelines.embedding import embed_paths, load_identity_encoder
from pipelines.io import read_jsonl, write_bytes, write_json
from stages._common import load_params, parser, progress_enabled, setup_logging


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--ingest", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, "embed")["embed"]
    manifest = read_jsonl(Path(args.ingest) / "manifest.jsonl")
    try:
        model, name, sha = load_identity_encoder(cfg.encoder, cfg.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: embed.checkpoint: {exc}") from exc
    emb = embed_paths(model, [r["path"] for r in manifest], cfg, progress=progress_enabled())
    out = Path(args.out)
    buf = io.BytesIO()
    np.save(buf, emb)
    write_bytes(out / "embeddings.npy", buf.getvalue())
    norms = np.linalg.norm(emb, axis=1)
    write_json(
        out / "embeddings.json",
        {
            "image_ids": [r["image_id"] for r in manifest],
            "encoder": name,
            "encoder_kind": cfg.encoder,
            "checkpoint": cfg.checkpoint,
            "checkpoint_sha256": sha,
            "dim": int(emb.shape[1]),
            "crop_border": cfg.crop_border,
        },
    )
    print(
        f"embed: {len(emb)} images with {name} (sha256 {sha[:12]}), norm median {np.median(norms):.2f} "
        f"[{norms.min():.2f}, {norms.max():.2f}]"
    )


if __name__ == "__main__":
    main()
