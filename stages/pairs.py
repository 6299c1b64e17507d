"""Stage `pairs`: identity graph, identity-disjoint splits, ordered references (FFHQ-Ref protocol).

    python -m stages.pairs --ingest data/ingest --embeddings data/embeddings --out data/pairs \
        --metrics metrics/pairs.json

Writes `identities.jsonl` (per image: identity, split, graph component), `pairs.jsonl` (per target:
its ordered references and ref–target cosines) and `unpaired.jsonl` (targets without a usable
reference, with the reason). For `ffhq_ref` the released mapping is imported as is and, with
`pairs.check_released`, compared with what the protocol rebuilds from our embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.io import read_json, read_jsonl, write_json, write_jsonl
from pipelines.pairs import build_pairs
from stages._common import load_params, parser, setup_logging


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--ingest", required=True)
    p.add_argument("--embeddings", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, "pairs")["pairs"]
    ing, embd = Path(args.ingest), Path(args.embeddings)
    manifest = read_jsonl(ing / "manifest.jsonl")
    source = read_json(ing / "source.json")
    mapping = read_jsonl(ing / "mapping.jsonl")
    emb = np.load(embd / "embeddings.npy")
    meta = read_json(embd / "embeddings.json")
    if meta["image_ids"] != [r["image_id"] for r in manifest]:
        raise SystemExit(f"error: {embd} does not match {ing / 'manifest.jsonl'}; re-run `dvc repro embed`")
    grouping = None
    if meta.get("grouping", {}).get("encoder") == "dlib_resnet":
        grouping = np.load(embd / "grouping.npy")
        print(f"  identities grouped by dlib's face ResNet (Euclidean < {cfg.dlib_link_distance})")
    try:
        identities, pairs, unpaired, metrics = build_pairs(
            manifest, emb, cfg, source["labelled"], mapping or None, grouping
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    metrics["encoder"] = meta["encoder"]
    if grouping is not None:
        metrics["grouping"] = "dlib_resnet"
    out = Path(args.out)
    write_jsonl(out / "identities.jsonl", identities)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "unpaired.jsonl", unpaired)
    write_json(args.metrics, metrics)
    agree = metrics.get("graph_vs_labels")
    extra = (
        f"; graph vs labels: ARI {agree['adjusted_rand_index']:.3f}, pair precision {agree['pair_precision']:.3f}, "
        f"recall {agree['pair_recall']:.3f}"
        if agree
        else ""
    )
    print(
        f"pairs: targets {metrics['targets']}, unpaired {metrics['unpaired']}, identities from {metrics['identity_from']}{extra}"
    )


if __name__ == "__main__":
    main()
