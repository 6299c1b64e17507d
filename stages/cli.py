"""`refface`: restore photos with a registered (or local) model.

    refface restore LQ.png [--ref R1.png ...] --out OUT.png [--model models:/refface@champion]
    refface restore LQ1.png LQ2.png FOLDER/ [--ref R1.png ...] --out OUT_FOLDER/
                    [--side-by-side GRID.png] [--steps N] [--seed S]

`--model` is an MLflow model URI (default `models:/refface@champion`, tracking URI from
MLFLOW_TRACKING_URI or sqlite:///mlflow.db) or a local restorer bundle folder (data/evaluate/bundle).
The model is loaded once; several photos (files or folders of them) are restored one after the other
with the same references, each written to `OUT_FOLDER/<name>.png`, with per-image progress. The output
has the model's resolution. Bad input (not an image, more than 3 references, grayscale, too small, a
model alias nobody holds) ends with a one-line error naming it and exit status 2; in a batch the other
photos are still restored. Without MLFLOW_TRACKING_URI and without ./mlflow.db the CLI creates no
tracking database: it says which command makes one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "models:/refface@champion"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAKE_CHAMPION = "`dvc repro` in the project folder (its `mlflow_sync` stage registers the evaluated model)"


def load_restorer(model: str):
    """A `Restorer` from a bundle folder or an MLflow model URI."""
    from pipelines.tracking import DEFAULT_DB, tracking_uri, user_set

    path = Path(model)
    if path.is_dir():
        from pipelines.restorer import Restorer

        return Restorer(path)
    if "://" not in model and ":/" not in model:
        raise SystemExit(f"error: --model {model}: no such bundle folder (and not an MLflow model URI)")
    uri = tracking_uri()
    if not user_set() and not Path(DEFAULT_DB).is_file():
        raise SystemExit(
            f"error: cannot load {model}: no tracking store here ({uri}: {Path(DEFAULT_DB).resolve()} does not "
            f"exist and MLFLOW_TRACKING_URI is not set). Run {MAKE_CHAMPION}, set MLFLOW_TRACKING_URI, or pass "
            "--model data/evaluate/bundle"
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except MlflowException as exc:
        msg = str(exc).splitlines()[0].rstrip(".")
        raise SystemExit(
            f"error: cannot load {model} from {uri}: {msg}. Create it with {MAKE_CHAMPION}, "
            "or pass a bundle folder (--model data/evaluate/bundle)"
        ) from exc
    return loaded.unwrap_python_model().restorer


def inputs_of(items: list[str]) -> list[Path]:
    """The photos named: files as given, folders expanded to their images (sorted)."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SystemExit(f"error: {p} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    return out


def restore_main(args: argparse.Namespace) -> int:
    if len(args.ref) > 3:
        raise SystemExit(f"error: {len(args.ref)} references given; the model accepts at most 3")
    photos = inputs_of(args.lq)
    many = len(photos) > 1 or any(Path(x).is_dir() for x in args.lq)
    out_dir = Path(args.out) if many or Path(args.out).is_dir() else None
    if out_dir is not None and out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise SystemExit(f"error: --out {args.out}: several photos need a folder, not an image file")
    if many and args.side_by_side:
        raise SystemExit("error: --side-by-side takes one photo")
    # The model is found (or refused) before torch and the model code are imported: a wrong --model or a
    # missing tracking store answers in about a second.
    t0 = time.perf_counter()
    restorer = load_restorer(args.model)
    start = time.perf_counter() - t0
    from PIL import Image

    from pipelines.restorer import InputError, check_image
    from pipelines.viz import save_grid

    try:
        refs = [check_image(r, f"reference {r}") for r in args.ref]
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from exc
    failed, times = [], []
    for i, photo in enumerate(photos, 1):
        target = out_dir / f"{photo.stem}.png" if out_dir is not None else Path(args.out)
        t = time.perf_counter()
        try:
            lq = check_image(photo, f"degraded image {photo}")
            out = restorer.restore(lq, refs, steps=args.steps, seed=args.seed)
        except InputError as exc:
            failed.append(str(photo))
            print(f"[{i}/{len(photos)}] error: {exc}", file=sys.stderr)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(target)
        times.append(time.perf_counter() - t)
        print(f"[{i}/{len(photos)}] {photo} -> {target} ({out.shape[1]}x{out.shape[0]}, {times[-1]:.2f} s)")
        if args.side_by_side:
            # With references, the blind restoration (same seed) sits beside the referenced one.
            blind = [restorer.restore(lq, [], steps=args.steps, seed=args.seed)] if refs else []
            row = [restorer._fit(lq), *[restorer._fit(r) for r in refs], out, *blind]
            labels = ["degraded", *[f"ref{j + 1}" for j in range(len(refs))], "restored"]
            labels += ["restored, no reference"] if refs else []
            save_grid(args.side_by_side, [row], title=" | ".join(labels), col_labels=labels, cell=128)
    per = sum(times) / len(times) if times else 0.0
    print(
        f"refface: restored {len(times)} of {len(photos)} photo(s) with {len(refs)} reference(s); "
        f"model load {start:.1f} s, {per:.2f} s per photo"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="refface", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore a degraded face photo with 0-3 references")
    r.add_argument("lq", nargs="+", help="degraded photo(s), or folders of them")
    r.add_argument(
        "--ref", action="append", default=[], help="a reference photo of the same person (up to 3)"
    )
    r.add_argument("--out", required=True, help="the restored image (PNG), or a folder for several photos")
    r.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"MLflow model URI or bundle folder (default {DEFAULT_MODEL})"
    )
    r.add_argument("--side-by-side", help="also write degraded | references | restored to this PNG")
    r.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed (default: the bundle's)")
    args = p.parse_args(argv)
    try:
        code = restore_main(args)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            sys.exit(2)
        raise
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
