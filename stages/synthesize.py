"""Stage `synthesize`: render the embedded default's synthetic identity faces.

    python -m stages.synthesize --album data/synthetic/album --encoder-pool data/synthetic/encoder_pool \
        --grid data/synthetic/grid.png

Two disjoint pools: the album (the dataset, ingested like any folder-per-identity source) and the
encoder pool (trains the identity encoders). Each pool folder holds `<identity>/<image>.png` and
`states.jsonl` (the render parameters of every image: identity traits and state, for exact masks).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pipelines.config import SynthesizeConfig
from pipelines.images import png_bytes
from pipelines.io import write_bytes, write_jsonl
from pipelines.synthetic import face_spec, identity_name, image_name, images_per_identity, render
from pipelines.viz import save_grid
from stages._common import load_params, parser, progress_enabled, setup_logging

_CFG: SynthesizeConfig | None = None


def _init(cfg: SynthesizeConfig) -> None:
    global _CFG
    _CFG = cfg


def _render_one(job: tuple[str, int, int]) -> tuple[str, int, int, bytes, dict]:
    pool, i, j = job
    spec = face_spec(_CFG.seed, pool, i, j, _CFG.framing, _CFG.identity_cues)
    img = render(spec, _CFG.render_size, _CFG.image_size)
    return pool, i, j, png_bytes(img), spec.to_json()


def write_pool(cfg: SynthesizeConfig, pool: str, out: Path, counts: list[int], workers: int = 2) -> int:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    jobs = [(pool, i, j) for i, n in enumerate(counts) for j in range(n)]
    states = []
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(cfg,)) as ex:
        it = ex.map(_render_one, jobs, chunksize=32)
        for pool_, i, j, data, spec in tqdm(
            it, total=len(jobs), desc=f"render {pool}", unit="img", disable=not progress_enabled()
        ):
            rel = f"{identity_name(pool_, i)}/{image_name(pool_, i, j)}.png"
            write_bytes(out / rel, data)
            states.append({"relpath": rel, "identity": identity_name(pool_, i), "spec": spec})
    write_jsonl(out / "states.jsonl", states)
    return len(jobs)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--album", required=True)
    p.add_argument("--encoder-pool", required=True)
    p.add_argument("--grid", required=True)
    args = p.parse_args(argv)
    setup_logging()
    cfg: SynthesizeConfig = load_params(args.params, "synthesize")["synthesize"]
    lo, hi = cfg.album_images_per_identity
    album_counts = images_per_identity(
        cfg.seed, "album", cfg.album_identities, lo, hi, cfg.album_singleton_fraction
    )
    enc_counts = [cfg.encoder_images_per_identity] * cfg.encoder_identities
    n_album = write_pool(cfg, "album", Path(args.album), album_counts)
    n_enc = write_pool(cfg, "encoder", Path(args.encoder_pool), enc_counts)
    # A grid for a person: rows are identities, columns their photos (states vary, traits do not).
    rows = []
    for i in range(cfg.grid_identities):
        rows.append(
            [
                render(
                    face_spec(cfg.seed, "album", i, j, cfg.framing, cfg.identity_cues),
                    cfg.render_size,
                    cfg.render_size,
                )
                for j in range(cfg.grid_images)
            ]
        )
    save_grid(
        args.grid,
        rows,
        title="synthetic identities: one row per person (traits fixed), columns = photos (states vary)",
    )
    print(
        f"synthesize: {n_album} album images of {cfg.album_identities} identities, "
        f"{n_enc} encoder-pool images of {cfg.encoder_identities} identities, grid {args.grid}"
    )


if __name__ == "__main__":
    main()
