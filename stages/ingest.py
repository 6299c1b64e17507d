"""Stage `ingest`: validate every source image into a manifest and a quarantine.

    python -m stages.ingest --out data/ingest --metrics metrics/ingest.json

Writes `manifest.jsonl` (one row per usable image), `quarantine.jsonl` (one row per rejected file or
CSV row, with a reason), `mapping.jsonl` (ffhq_ref: the released reference lists, as validated) and
`source.json`; counts per reason go to the metrics file. With `source.align: ffhq` (raw albums) every
photo is detected and aligned first (pipelines.faces) and its crop written to `aligned/<image id>.png`,
which the later stages read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipelines.config import as_dict
from pipelines.ingest import ingest
from pipelines.io import write_json, write_jsonl
from pipelines.sources import SourceError, list_source
from stages._common import load_params, parser, progress_enabled, setup_logging


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfgs = load_params(args.params, "source", "ingest")
    src, cfg = cfgs["source"], cfgs["ingest"]
    try:
        listing = list_source(src)
    except SourceError as exc:
        raise SystemExit(f"error: {exc}") from exc
    out = Path(args.out)
    aligner, aligned_dir = None, out / "aligned"
    if aligned_dir.exists():
        shutil.rmtree(aligned_dir)
    if src.align == "ffhq":
        from pipelines.faces import FaceAligner

        aligner = FaceAligner(
            src.align_size, src.landmarks, folder=src.landmark_models, min_face=src.min_face
        )
        print(
            f"  aligning every photo to {src.align_size} px ({src.landmarks} landmarks, faces: {src.face_policy})"
        )
    result = ingest(
        listing, cfg, progress=progress_enabled(), aligner=aligner, aligned_dir=aligned_dir,
        face_policy=src.face_policy,
    )  # fmt: skip
    write_jsonl(out / "manifest.jsonl", result.manifest)
    write_jsonl(out / "quarantine.jsonl", result.quarantine)
    write_jsonl(out / "mapping.jsonl", listing.mapping or [])
    write_json(
        out / "source.json", {"source": as_dict(src), "labelled": listing.labelled, "ingest": as_dict(cfg)}
    )
    write_json(args.metrics, result.metrics)
    for q in result.quarantine[:20]:
        print(f"  quarantined [{q['reason']}] {q['detail']}")
    if len(result.quarantine) > 20:
        print(f"  ... and {len(result.quarantine) - 20} more in {out / 'quarantine.jsonl'}")
    print(
        f"ingest: {result.metrics['accepted']} accepted, {result.metrics['quarantined']} quarantined "
        f"{result.metrics['quarantine_reasons']}, {result.metrics['identities']} labelled identities"
    )


if __name__ == "__main__":
    main()
