"""Stage `train_id_encoder`: the identity encoders of the embedded default (AdaFace loss).

    python -m stages.train_id_encoder --pool data/synthetic/encoder_pool --out data/encoders \
        --metrics metrics/train_id_encoder.json --plot plots/train_id_encoder.csv

Two encoders, trained on the encoder pool (identities disjoint from the album): `primary` stands in
for AdaFace IR-50 (embeddings, identity loss) and `evaluator` — another seed and width — stands in for
an independent evaluation encoder (ArcFace), so that evaluation does not grade with the training
encoder. Verification accuracy on identities held out of training is reported for both.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from models.id_encoder import save_encoder
from pipelines.id_training import embed, load_pool, split_identities, train_encoder, verification
from pipelines.io import read_jsonl, write_bytes, write_json
from stages._common import load_params, parser, progress_enabled, setup_logging


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--pool", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--plot", required=True, help="CSV of the per-epoch loss (a DVC plot)")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, "train_id_encoder")["train_id_encoder"]
    torch.set_num_threads(cfg.threads)
    pool = Path(args.pool)
    rows = read_jsonl(pool / "states.jsonl")
    data = load_pool([str(pool / r["relpath"]) for r in rows], [r["identity"] for r in rows])
    train_mask, hold_mask = split_identities(data.labels, cfg.holdout_fraction, seed=0)
    from pipelines.id_training import FaceSet

    train = FaceSet(data.images[train_mask], data.labels[train_mask])
    held = FaceSet(data.images[hold_mask], data.labels[hold_mask])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics, curve = {}, []
    for name, arch in (("primary", cfg.primary), ("evaluator", cfg.evaluator)):
        model, losses = train_encoder(train, arch, cfg, progress=progress_enabled(), desc=f"train {name}")
        save_encoder(model, out / f"{name}.safetensors", name=f"small_ir_{name}")
        ver = verification(embed(model, held.images), held.labels, seed=0)
        ver["parameters"] = sum(p.numel() for p in model.parameters())
        ver["final_loss"] = losses[-1]
        metrics[name] = ver
        curve += [{"encoder": name, "epoch": e + 1, "loss": round(v, 6)} for e, v in enumerate(losses)]
        print(
            f"  {name}: verification accuracy {ver['verification_accuracy']:.4f} on {len(np.unique(held.labels))} "
            f"held-out identities (pos cos {ver['mean_positive_cosine']:.3f}, neg cos {ver['mean_negative_cosine']:.3f})"
        )
    metrics["train_identities"] = int(len(np.unique(train.labels)))
    metrics["heldout_identities"] = int(len(np.unique(held.labels)))
    write_json(args.metrics, metrics)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["encoder", "epoch", "loss"], lineterminator="\n")
    w.writeheader()
    w.writerows(curve)
    write_bytes(args.plot, buf.getvalue().encode())
    print(
        f"train_id_encoder: primary {metrics['primary']['verification_accuracy']:.4f}, "
        f"evaluator {metrics['evaluator']['verification_accuracy']:.4f} verification accuracy on held-out identities"
    )


if __name__ == "__main__":
    main()
