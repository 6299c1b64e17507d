"""`refface`: restore photos with a registered (or local) model.

    refface restore PHOTO.jpg [--ref R1.jpg ...] --out OUT.png [--model models:/refface@champion]
                    [--aligned] [--only-center-face] [--upscale N] [--save-faces DIR] [--colour]
    refface restore LQ1.png LQ2.png FOLDER/ [--ref R1.png ...] --out OUT_FOLDER/
                    [--side-by-side GRID.png] [--steps N] [--seed S]
                    [--guidance-image S_I] [--guidance-context S_C] [--ref-ensemble]
    refface restore LQ.png --aligned --ref R1.png --ref-masks predict [--refsel-model M.safetensors]
    refface restore LQ.png --aligned --ref R1.png --ref-mask M1.png

Conflict masks (RefSTAR): `--ref-masks predict` has the RefSel model (the bundle's, `--refsel-model`, or
data/refsel/model.safetensors) predict each reference's mask from the degraded face and the reference;
`--ref-mask FILE` (once per `--ref`, in order; with `--aligned`) gives them (PNG, 0 consistent,
1 conflict, 255 ignore, in the reference's grid); `--ref-masks none` uses none. The default (`auto`)
predicts for a model trained with masks and uses none otherwise. The summary line says which.

`--model` is an MLflow model URI (default `models:/refface@champion`, tracking URI from
MLFLOW_TRACKING_URI or sqlite:///mlflow.db) or a local restorer bundle folder (data/evaluate/bundle).
The model is loaded once; several photos (files or folders of them) are restored one after the other
with the same references, each written to `OUT_FOLDER/<name>.png`, with per-image progress.

Any photo (pipelines.faces): every face is detected (dlib), aligned to the model's input (FFHQ
alignment: `--landmarks 5`, the default, puts the eyes on the FFHQ template; `--landmarks 68` is the
ffhq-dataset quad), restored, and pasted back with the inverse transform and a feathered mask: the
output has the photo's size (times `--upscale N`) and pixels away from every face are unchanged.
`--only-center-face` restores one face; `--save-faces DIR` writes the crops; `--aligned` takes the
photos as aligned crops (output at the model's resolution). `--guidance-image`, `--guidance-context`
and `--ref-ensemble` are seed 002's guidance (its eq. 5, with 1.2 / 1.2 in the paper) and training-free
multi-reference ensemble (eq. 6), for any model; they replace the bundle's prompt guidance. References are detected and aligned the
same way and must show exactly one face. Grayscale photos are restored and come back grey (`--colour`
keeps the colour output); EXIF orientation and alpha are handled by the loader ingest uses.

Bad input (not an image, more than 3 references, no face, a reference with several faces, too small,
a model alias nobody holds) ends with a one-line error naming it and exit status 2; in a batch the
other photos are still restored. Without MLFLOW_TRACKING_URI and without ./mlflow.db the CLI creates no
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


def _aligner(args, resolution: int):
    from pipelines.faces import FaceAligner

    try:
        return FaceAligner(
            resolution, landmarks=args.landmarks, detector=args.detector, folder=args.landmark_models
        )
    except (FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"error: face detection unavailable: {exc}") from exc


def sampler_options(args) -> dict:
    """The sampler settings of the command line (None = the bundle's)."""
    return {
        "steps": args.steps,
        "seed": args.seed,
        "guidance_image": args.guidance_image,
        "guidance_context": args.guidance_context,
        "ref_ensemble": args.ref_ensemble,
        "gate": False if args.no_gate else None,
    }


def restore_photo(restorer, aligner, photo: Path, refs, args, matcher=None):
    """(output image, aligned crops, restored crops, grey) for one photo.

    With an aligner: detect, align, restore every face (or the centre one), paste back at the photo's
    size times `--upscale`. References go to the face they show: with several faces in the photo,
    dlib's face ResNet (`matcher`) gives them to the faces within its same-person distance (0.6) of the
    references' mean descriptor; the other faces are restored without references. Without an aligner
    (`--aligned`) the photo is the model's input and the output has the model's resolution."""
    import numpy as np

    from pipelines.faces import FaceError, center_face, is_grey, paste_back, to_grey
    from pipelines.restorer import InputError, check_image

    img = check_image(photo, f"degraded image {photo}")
    grey = is_grey(img) and not args.colour
    masks = getattr(args, "resolved_masks", None)  # RefSTAR: "predict" | "none" | mask files | None
    if aligner is None:
        rm = [masks] if masks is not None and not isinstance(masks, str) else masks
        out = restorer.restore_batch([img], [refs], **sampler_options(args), ref_masks=rm)[0]
        out = to_grey(out) if grey else out
        return out, [restorer._fit(img)], [out], grey
    faces = aligner.detect(img)
    if not faces:
        msg = f"degraded image {photo}: no face found (an aligned crop? use --aligned)"
        raise InputError(str(FaceError("no_face", msg)))
    if args.only_center_face:
        faces = [center_face(faces, img.shape)]
    crops = [aligner.align(img, f) for f in faces]
    face_refs = [refs] * len(crops)
    if refs and len(crops) > 1 and matcher is not None:
        net, ref_mean = matcher
        dist = [float(np.linalg.norm(net.describe(c) - ref_mean)) for c in crops]
        face_refs = [refs if d < net.THRESHOLD else [] for d in dist]
        print(
            f"  {photo}: {len(crops)} faces; references given to face(s) "
            f"{[k for k, r in enumerate(face_refs) if r]} (dlib distance < {net.THRESHOLD}: "
            f"{', '.join(f'{d:.2f}' for d in dist)})"
        )
    restored = list(restorer.restore_batch(crops, face_refs, **sampler_options(args), ref_masks=masks))
    if grey:
        restored = [to_grey(r) for r in restored]
    return paste_back(img, faces, restored, args.upscale), crops, restored, grey


def check_restore_args(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot act together, before anything is loaded."""
    if args.aligned:
        ignored = [
            name
            for name, on in (
                ("--upscale", args.upscale != 1),
                ("--only-center-face", args.only_center_face),
                ("--landmarks", args.landmarks != 5),
                ("--detector", args.detector != "hog"),
            )
            if on
        ]
        if ignored:
            raise SystemExit(f"error: {', '.join(ignored)} act on detected faces; --aligned skips detection")
    if len(args.ref) > 3:
        raise SystemExit(f"error: {len(args.ref)} references given; the model accepts at most 3")
    if args.ref_mask:  # RefSTAR: mask files, one per reference, in the aligned reference's grid
        if not args.aligned:
            raise SystemExit(
                "error: --ref-mask needs --aligned (a mask lies in the aligned reference's pixel grid)"
            )
        if len(args.ref_mask) != len(args.ref):
            raise SystemExit(
                f"error: {len(args.ref_mask)} --ref-mask for {len(args.ref)} --ref: give one per reference"
            )
        if args.ref_masks != "auto":
            raise SystemExit(
                f"error: --ref-mask gives the masks; it cannot go with --ref-masks {args.ref_masks}"
            )
    if args.upscale < 1:
        raise SystemExit(f"error: --upscale {args.upscale}: must be a positive integer")


def output_folder(args: argparse.Namespace, photos: list[Path]) -> Path | None:
    """The folder the restored photos go to (None: `--out` is the one output image); refuses an image
    name for several photos, `--side-by-side` with several, and photos whose outputs would collide."""
    many = len(photos) > 1 or any(Path(x).is_dir() for x in args.lq)
    out_dir = Path(args.out) if many or Path(args.out).is_dir() else None
    if out_dir is not None and out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise SystemExit(f"error: --out {args.out}: several photos need a folder, not an image file")
    if many and args.side_by_side:
        raise SystemExit("error: --side-by-side takes one photo")
    stems = [p.stem for p in photos]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if out_dir is not None and twice:
        raise SystemExit(
            f"error: several photos named {', '.join(twice)}: their outputs would overwrite each other"
        )
    return out_dir


def reference_masks(args: argparse.Namespace):
    """The RefSTAR masks asked for: None (auto), "none" | "predict", or the `--ref-mask` images."""
    import numpy as np
    from PIL import Image

    ref_masks = None if args.ref_masks == "auto" else args.ref_masks  # RefSTAR (module docstring)
    if args.ref_mask:
        try:
            ref_masks = [np.asarray(Image.open(f)) for f in args.ref_mask]
        except OSError as exc:
            raise SystemExit(f"error: --ref-mask: not a readable mask image ({exc})") from exc
    return ref_masks


def load_references(args: argparse.Namespace, aligner) -> list:
    """The `--ref` images, each aligned to the model's input unless `--aligned`."""
    from pipelines.faces import FaceError
    from pipelines.restorer import InputError, check_image

    try:
        refs = []
        for r in args.ref:
            img = check_image(r, f"reference {r}")
            if aligner is not None:
                img = aligner.align(img, aligner.one_face(img, f"reference {r}"))
            refs.append(img)
    except (InputError, FaceError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    return refs


def reference_matcher(args: argparse.Namespace, aligner, refs: list):
    """(dlib face ResNet, the references' mean descriptor) to give references to the faces they show;
    None without references, with `--aligned` or with `--only-center-face`."""
    import numpy as np

    if refs and aligner is not None and not args.only_center_face:
        from pipelines.faces import DlibResNet

        net = DlibResNet(args.landmark_models)
        return (net, np.mean([net.describe(r) for r in refs], axis=0))
    return None


def save_face_crops(folder: str, stem: str, crops: list, restored: list) -> None:
    """Write each aligned face crop and its restoration as `<stem>_<k>_aligned.png` / `_restored.png`."""
    from PIL import Image

    faces_dir = Path(folder)
    faces_dir.mkdir(parents=True, exist_ok=True)
    for k, (c, r) in enumerate(zip(crops, restored)):
        Image.fromarray(c).save(faces_dir / f"{stem}_{k:02d}_aligned.png")
        Image.fromarray(r).save(faces_dir / f"{stem}_{k:02d}_restored.png")


def save_side_by_side(
    restorer, args: argparse.Namespace, crops: list, restored: list, refs: list, grey: bool
) -> None:
    """Write degraded | references | restored (| the blind restoration, with references) of the first
    face to `--side-by-side`."""
    from pipelines.faces import to_grey
    from pipelines.viz import save_grid

    # With references, the blind restoration (same seed) sits beside the referenced one.
    # the first face (in reading order) when the photo shows several
    lq = crops[0]
    blind = [restorer.restore_batch([lq], [[]], **sampler_options(args))[0]] if refs else []
    blind = [to_grey(b) for b in blind] if grey else blind
    row = [lq, *[restorer._fit(r) for r in refs], restored[0], *blind]
    labels = ["degraded" + (f" (face 1 of {len(crops)})" if len(crops) > 1 else ""),
              *[f"ref{j + 1}" for j in range(len(refs))], "restored"]  # fmt: skip
    labels += ["restored, no reference"] if refs else []
    save_grid(args.side_by_side, [row], title=" | ".join(labels), col_labels=labels, cell=128)


def restore_main(args: argparse.Namespace) -> int:
    check_restore_args(args)
    photos = inputs_of(args.lq)
    out_dir = output_folder(args, photos)
    # The model is found (or refused) before torch and the model code are imported: a wrong --model or a
    # missing tracking store answers in about a second.
    t0 = time.perf_counter()
    restorer = load_restorer(args.model)
    start = time.perf_counter() - t0
    from PIL import Image

    if args.refsel_model:
        restorer.refsel_path = Path(args.refsel_model)
    ref_masks = reference_masks(args)

    from pipelines.restorer import InputError

    aligner = None if args.aligned else _aligner(args, restorer.resolution)
    refs = load_references(args, aligner)
    matcher = reference_matcher(args, aligner, refs)
    args.resolved_masks = ref_masks
    failed, times, n_faces = [], [], 0
    for i, photo in enumerate(photos, 1):
        target = out_dir / f"{photo.stem}.png" if out_dir is not None else Path(args.out)
        t = time.perf_counter()
        try:
            out, crops, restored, grey = restore_photo(restorer, aligner, photo, refs, args, matcher)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(out[..., 0] if grey else out).save(target)
        except InputError as exc:
            failed.append(str(photo))
            print(f"[{i}/{len(photos)}] error: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # one photo never ends a batch: named, and the others go on
            failed.append(str(photo))
            print(f"[{i}/{len(photos)}] error: {photo}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            continue
        n_faces += len(crops)
        if args.save_faces:
            save_face_crops(args.save_faces, photo.stem, crops, restored)
        times.append(time.perf_counter() - t)
        print(
            f"[{i}/{len(photos)}] {photo} -> {target} ({out.shape[1]}x{out.shape[0]}, "
            f"{len(crops)} face(s), {times[-1]:.2f} s)"
        )
        if args.side_by_side:
            save_side_by_side(restorer, args, crops, restored, refs, grey)
    per = sum(times) / len(times) if times else 0.0
    print(
        f"refface: restored {len(times)} of {len(photos)} photo(s), {n_faces} face(s), with {len(refs)} "
        f"reference(s), masks {_masks_said(restorer)}; model load {start:.1f} s, {per:.2f} s per photo"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 2 if failed else 0


def _masks_said(restorer) -> str:
    """Which conflict masks the last restoration used (RefSTAR), for the summary line."""
    m = getattr(restorer, "last_masks", None) or {"source": "none"}
    return {"predicted": f"predicted by {m.get('model')}", "given": "from --ref-mask files"}.get(
        m["source"], "none"
    )


def add_restore_arguments(r: argparse.ArgumentParser) -> None:
    """Add the options of `refface restore` to `r`."""
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
    r.add_argument(
        "--guidance-image",
        type=float,
        default=None,
        help="s_i of seed 002's eq. 5: guidance scale of the degraded input (paper: 1.2)",
    )
    r.add_argument(
        "--guidance-context",
        type=float,
        default=None,
        help="s_c of seed 002's eq. 5: guidance scale of the reference context (paper: 1.2)",
    )
    r.add_argument(
        "--ref-ensemble",
        action="store_true",
        default=None,
        help="seed 002's eq. 6: one forward per reference, their predictions averaged (any model, up to 3)",
    )
    r.add_argument(
        "--no-gate",
        action="store_true",
        help="the references at full weight on every photo (default: the bundle's reference gate)",
    )
    r.add_argument(
        "--aligned", action="store_true", help="the photos and references are already aligned face crops"
    )
    r.add_argument("--only-center-face", action="store_true", help="restore only the face nearest the centre")
    r.add_argument(
        "--upscale", type=int, default=1, help="output = photo x N (background resized, faces restored)"
    )
    r.add_argument("--save-faces", help="also write each aligned and restored face crop to this folder")
    r.add_argument(
        "--colour", action="store_true", help="a grayscale photo comes back in colour (default: grey)"
    )
    r.add_argument(
        "--landmarks",
        type=int,
        choices=(5, 68),
        default=5,
        help="5: eyes onto the FFHQ template (CC0 model, default); 68: the ffhq-dataset quad (iBUG 300-W "
        "model: non-commercial terms)",
    )
    r.add_argument("--detector", choices=("hog", "cnn"), default="hog", help="dlib face detector")
    r.add_argument("--landmark-models", default=None, help="folder of dlib's .dat files (default: installed)")
    r.add_argument(
        "--ref-masks",
        choices=("auto", "none", "predict"),
        default="auto",
        help="conflict masks of the references (RefSTAR): predict = the RefSel model; auto = predict for a "
        "model trained with masks, none otherwise",
    )
    r.add_argument(
        "--ref-mask",
        action="append",
        default=[],
        help="a reference's conflict mask PNG (one per --ref; --aligned)",
    )
    r.add_argument(
        "--refsel-model",
        default=None,
        help="RefSel model (default: the bundle's, else data/refsel/model.safetensors)",
    )


def build_parser() -> argparse.ArgumentParser:
    """`refface` with its subcommands `restore` and `prompt-cache`."""
    p = argparse.ArgumentParser(
        prog="refface", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore a degraded face photo with 0-3 references")
    add_restore_arguments(r)
    c = sub.add_parser(
        "prompt-cache", help="embed the restoration prompt with a local Qwen3 folder (train.prompt_cache)"
    )
    c.add_argument("--text-encoder", required=True, help="local Qwen3 folder (FLUX.2-klein's text encoder)")
    c.add_argument("--out", required=True, help="the cache to write (safetensors {prompt, empty})")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "prompt-cache":
        from models.prompt import encode_with_qwen, save_prompt_cache

        emb = encode_with_qwen(args.text_encoder)
        save_prompt_cache(args.out, emb)
        print(
            f"prompt cache {args.out}: prompt {tuple(emb['prompt'].shape)}, empty {tuple(emb['empty'].shape)}"
        )
        return
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
