"""Stage `embed`: raw identity embeddings for every manifest image.

    python -m stages.embed --ingest data/ingest --out data/embeddings

Writes `embeddings.npy` (N, D) float32 raw vectors (unit direction times the encoder's norm, the
quality proxy) in manifest order, and `embeddings.json` with the image ids, the encoder's name and
the sha256 of its checkpoint. With `embed.grouping: dlib_resnet` (real photos) also `grouping.npy`:
dlib's 128-d face descriptors, which `pairs` links by Euclidean distance (its authors' 0.6).
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
    grouping = None
    if cfg.grouping == "dlib_resnet":
        from tqdm import tqdm

        from pipelines.faces import DlibResNet
        from pipelines.images import load_rgb, sha256_file

        net = DlibResNet(cfg.face_models)
        vecs = [
            net.describe(load_rgb(r["path"])[0])
            for r in tqdm(manifest, desc="dlib descriptors", unit="img", disable=not progress_enabled())
        ]
        buf = io.BytesIO()
        np.save(buf, np.stack(vecs) if vecs else np.zeros((0, 128), np.float32))
        write_bytes(out / "grouping.npy", buf.getvalue())
        grouping = {"encoder": "dlib_resnet", "metric": "euclidean", "sha256": sha256_file(net.path)}
    elif (out / "grouping.npy").exists():
        (out / "grouping.npy").unlink()
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
            # only when it is not the primary encoder's (the default's file stays as it was)
            **({"grouping": grouping} if cfg.grouping != "primary" else {}),
        },
    )
    print(
        f"embed: {len(emb)} images with {name} (sha256 {sha[:12]}), norm median {np.median(norms):.2f} "
        f"[{norms.min():.2f}, {norms.max():.2f}]"
    )


if __name__ == "__main__":
    main()
