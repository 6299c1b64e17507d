"""`refface`: restore photos with a registered (or local) model.

    refface restore LQ.png [--ref R1.png ...] --out OUT.png [--model models:/refface@champion]
                    [--side-by-side GRID.png] [--steps N] [--seed S]

`--model` is an MLflow model URI (default `models:/refface@champion`, tracking URI from
MLFLOW_TRACKING_URI or sqlite:///mlflow.db) or a local restorer bundle folder (data/evaluate/bundle).
The output has the model's resolution. Bad input (not an image, more than 3 references, grayscale, too
small, a model alias nobody holds) ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "models:/refface@champion"


def load_restorer(model: str):
    """A `Restorer` from a bundle folder or an MLflow model URI."""
    from pipelines.restorer import Restorer

    path = Path(model)
    if path.is_dir():
        return Restorer(path)
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except MlflowException as exc:
        msg = str(exc).splitlines()[0].rstrip(".")
        raise SystemExit(
            f"error: cannot load {model} from {uri}: {msg}. Register one with `dvc repro register` "
            f"or pass a bundle folder (data/evaluate/bundle)"
        ) from exc
    return loaded.unwrap_python_model().restorer


def restore_main(args: argparse.Namespace) -> None:
    from PIL import Image

    from pipelines.restorer import InputError, check_image
    from pipelines.viz import save_grid

    if len(args.ref) > 3:
        raise SystemExit(f"error: {len(args.ref)} references given; the model accepts at most 3")
    try:
        lq = check_image(args.lq, f"degraded image {args.lq}")
        refs = [check_image(r, f"reference {r}") for r in args.ref]
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from exc
    restorer = load_restorer(args.model)
    try:
        out = restorer.restore(lq, refs, steps=args.steps, seed=args.seed)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from exc
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(args.out)
    if args.side_by_side:
        # With references, the blind restoration (same seed) sits beside the referenced one.
        blind = [restorer.restore(lq, [], steps=args.steps, seed=args.seed)] if refs else []
        row = [restorer._fit(lq), *[restorer._fit(r) for r in refs], out, *blind]
        labels = ["degraded", *[f"ref{i + 1}" for i in range(len(refs))], "restored"]
        labels += ["restored, no reference"] if refs else []
        save_grid(args.side_by_side, [row], title=" | ".join(labels), col_labels=labels, cell=128)
    print(
        f"refface: restored {args.lq} with {len(refs)} reference(s) -> {args.out} ({out.shape[1]}x{out.shape[0]})"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="refface", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore a degraded face photo with 0-3 references")
    r.add_argument("lq", help="the degraded photo")
    r.add_argument(
        "--ref", action="append", default=[], help="a reference photo of the same person (up to 3)"
    )
    r.add_argument("--out", required=True, help="where to write the restored image (PNG)")
    r.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"MLflow model URI or bundle folder (default {DEFAULT_MODEL})"
    )
    r.add_argument("--side-by-side", help="also write degraded | references | restored to this PNG")
    r.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed (default: the bundle's)")
    args = p.parse_args(argv)
    try:
        restore_main(args)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
