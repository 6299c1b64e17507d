"""Real photos in, restored photos out (pipelines.faces, `refface restore PHOTO`): dlib detection, FFHQ
alignment and feathered paste-back on a real photo (matplotlib's Grace Hopper, 512x600)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_encoders, write_tiny_bundle
from PIL import Image

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    import matplotlib.cbook as cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from stages.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


@pytest.mark.parametrize("landmarks", [5, 68])
def test_alignment_puts_the_eyes_on_the_ffhq_template(hopper, landmarks):
    from pipelines.faces import FaceAligner, eye_centres, template_eyes

    aligner = FaceAligner(256, landmarks=landmarks)
    faces = aligner.detect(hopper)
    assert len(faces) == 1 and faces[0].landmarks.shape == (landmarks, 2)
    crop = aligner.align(hopper, faces[0])
    assert crop.shape == (256, 256, 3)
    # measured independently: the 68-point model run again on the aligned crop
    again = FaceAligner(256, landmarks=68).detect(crop)
    assert len(again) == 1
    err = np.hypot(*(np.stack(eye_centres(again[0].landmarks)) - template_eyes(256)).T)
    assert err.max() < 4.0, err  # pixels at 256
    rec = faces[0].record()
    assert len(rec["landmarks"]) == landmarks and np.array(rec["affine"]).shape == (2, 3)


def test_ffhq_quad_follows_the_published_recipe():
    """On symmetric landmarks the quad is an axis-aligned square centred 0.1 of the way to the mouth."""
    from pipelines.faces import ffhq_quad

    lm = np.zeros((68, 2))
    lm[36:42] = [100, 100]
    lm[42:48] = [140, 100]
    lm[48], lm[54] = [110, 150], [130, 150]
    q = ffhq_quad(lm)
    # eye-to-eye 40, eye-to-mouth 50: half side = max(2.0*40, 1.8*50) = 90, centre (120, 105)
    np.testing.assert_allclose(q, [[30, 15], [30, 195], [210, 195], [210, 15]], atol=1e-9)
    with pytest.raises(ValueError, match="68 landmarks"):
        ffhq_quad(lm[:5])


def test_paste_back_keeps_the_photo_outside_the_mask(hopper):
    from pipelines.faces import FaceAligner, feather_mask, paste_back

    aligner = FaceAligner(64)
    faces = aligner.detect(hopper)
    restored = [np.full((64, 64, 3), 200, np.uint8)]
    out = paste_back(hopper, faces, restored)
    assert out.shape == hopper.shape
    mask = feather_mask(faces[0].affine, 64, hopper.shape[:2])
    assert (mask == 0).mean() > 0.5 and (mask == 1).sum() > 1000  # a soft edge around a solid core
    np.testing.assert_array_equal(out[mask == 0], hopper[mask == 0])
    assert (out[mask == 1] == 200).all()
    soft = (mask > 0) & (mask < 1)
    assert soft.sum() > 500  # feathered, not a hard seam
    up = paste_back(hopper, faces, restored, upscale=2)
    assert up.shape == (1200, 1024, 3)


def test_restore_a_real_photo_end_to_end(tmp_path, hopper, bundle):
    """detect → align → restore → paste back: the photo's size, unchanged far from the face, one face
    crop saved; --upscale; several faces; --only-center-face."""
    from pipelines.faces import FaceAligner, feather_mask

    src = tmp_path / "hopper.jpg"
    Image.fromarray(hopper).save(src, quality=95)
    img = np.asarray(Image.open(src).convert("RGB"))
    code, err = _cli(
        "restore", str(src), "--model", str(bundle), "--out", str(tmp_path / "out.png"),
        "--save-faces", str(tmp_path / "faces"),
    )  # fmt: skip
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == img.shape
    face = FaceAligner(32).detect(img)[0]
    keep = feather_mask(face.affine, 32, img.shape[:2]) == 0
    np.testing.assert_array_equal(out[keep], img[keep])
    assert not np.array_equal(out[~keep], img[~keep])  # the face was restored
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == [
        "hopper_00_aligned.png",
        "hopper_00_restored.png",
    ]

    code, err = _cli(
        "restore", str(src), "--model", str(bundle), "--out", str(tmp_path / "up.png"), "--upscale", "2"
    )
    assert code == 0, err
    assert Image.open(tmp_path / "up.png").size == (1024, 1200)

    # two people side by side: each restored; --only-center-face restores one
    pair = tmp_path / "pair.png"
    Image.fromarray(np.concatenate([img, img[:, ::-1]], axis=1)).save(pair)
    code, err = _cli(
        "restore", str(pair), "--model", str(bundle), "--out", str(tmp_path / "pair_out.png"),
        "--save-faces", str(tmp_path / "pair_faces"),
    )  # fmt: skip
    assert code == 0, err
    assert len(list((tmp_path / "pair_faces").glob("*_restored.png"))) == 2
    code, err = _cli(
        "restore", str(pair), "--model", str(bundle), "--out", str(tmp_path / "pc.png"), "--only-center-face",
        "--save-faces", str(tmp_path / "pc_faces"),
    )  # fmt: skip
    assert code == 0, err
    assert len(list((tmp_path / "pc_faces").glob("*_restored.png"))) == 1


def test_grey_exif_and_faceless_photos(tmp_path, hopper, bundle):
    # a grayscale photo is restored and comes back grey (mode L), same size
    grey = tmp_path / "grey.png"
    Image.fromarray(hopper).convert("L").save(grey)
    code, err = _cli("restore", str(grey), "--model", str(bundle), "--out", str(tmp_path / "g.png"))
    assert code == 0, err
    g = Image.open(tmp_path / "g.png")
    assert g.mode == "L" and g.size == (512, 600)
    code, err = _cli(
        "restore", str(grey), "--model", str(bundle), "--out", str(tmp_path / "gc.png"), "--colour"
    )
    assert code == 0, err
    assert Image.open(tmp_path / "gc.png").mode == "RGB"

    # a phone photo stored sideways with EXIF orientation 6: read upright (the detector only finds
    # upright faces), output upright
    side = tmp_path / "side.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90° clockwise
    Image.fromarray(np.rot90(hopper, k=1).copy()).save(side, exif=exif, quality=95)
    code, err = _cli("restore", str(side), "--model", str(bundle), "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    assert Image.open(tmp_path / "s.png").size == (512, 600)

    # no face: a clear error naming the photo; a reference with no face: named too
    blank = tmp_path / "wall.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8)).save(blank)
    code, err = _cli("restore", str(blank), "--model", str(bundle), "--out", str(tmp_path / "w.png"))
    assert code == 2 and "wall.png: no face found" in err
    src = tmp_path / "h.png"
    Image.fromarray(hopper).save(src)
    code, err = _cli(
        "restore", str(src), "--ref", str(blank), "--model", str(bundle), "--out", str(tmp_path / "r.png")
    )
    assert code == 2 and f"reference {blank}: no face found" in err
    two = tmp_path / "two.png"
    Image.fromarray(np.concatenate([hopper, hopper[:, ::-1]], axis=1)).save(two)
    code, err = _cli(
        "restore", str(src), "--ref", str(two), "--model", str(bundle), "--out", str(tmp_path / "r.png")
    )
    assert code == 2 and "two.png: 2 faces found" in err
    # with a one-face reference it works
    code, err = _cli(
        "restore", str(src), "--ref", str(src), "--model", str(bundle), "--out", str(tmp_path / "r.png")
    )
    assert code == 0, err


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return data.astronaut()[:300, 100:400]  # her face (the full photo also shows the flag and a patch)


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def test_raw_album_is_aligned_at_ingest_and_bad_photos_quarantined(tmp_path, hopper, astronaut):
    """`source.align: ffhq`: every photo of a raw album is detected and aligned before ingest's checks;
    no face, several faces and a face too small are quarantined with that reason; the crop, the
    landmarks and the transform are recorded."""
    import json

    import yaml

    from stages.ingest import main as ingest_main

    root = tmp_path / "album"
    small = np.asarray(Image.fromarray(hopper).resize((307, 360), Image.Resampling.LANCZOS))
    tiny = np.asarray(Image.fromarray(hopper).resize((154, 180), Image.Resampling.LANCZOS))
    _save(root / "hopper" / "orig.png", hopper)
    _save(root / "hopper" / "mirror.png", hopper[:, ::-1])
    _save(root / "hopper" / "crop.png", hopper[60:480, 40:470])
    _save(root / "hopper" / "small.png", small)
    _save(root / "hopper" / "tiny.png", tiny)
    _save(root / "astronaut" / "face.png", astronaut)
    _save(root / "astronaut" / "mirror.png", astronaut[:, ::-1])
    group = np.concatenate([hopper[90:390, 120:420], astronaut], axis=1)
    _save(root / "astronaut" / "group.png", group)
    _save(root / "astronaut" / "wall.png", np.full((120, 160, 3), 90, np.uint8))
    pp = tmp_path / "params.yaml"
    source = {
        "kind": "folder_by_identity",
        "root": str(root),
        "align": "ffhq",
        "align_size": 64,
        "min_face": 64,
    }
    pp.write_text(yaml.safe_dump({"source": source}))
    out = tmp_path / "ingest"
    ingest_main(["--params", str(pp), "--out", str(out), "--metrics", str(tmp_path / "m.json")])
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    quarantine = {
        Path(q["item"]).name: q for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())
    }
    assert sorted(r["image_id"] for r in manifest) == [
        "astronaut_face", "astronaut_mirror", "hopper_crop", "hopper_mirror", "hopper_orig", "hopper_small",
    ]  # fmt: skip
    assert {k: q["reason"] for k, q in quarantine.items()} == {
        "group.png": "several_faces",
        "wall.png": "no_face",
        "tiny.png": "face_too_small",
    }
    assert "group.png: 2 faces found" in quarantine["group.png"]["detail"]
    for r in manifest:
        crop = np.asarray(Image.open(r["path"]))
        assert crop.shape == (64, 64, 3) and (r["width"], r["height"]) == (64, 64)
        assert Path(r["source_path"]).parent.name == r["identity"] and len(r["face"]["landmarks"]) == 5
    # the same photo, mirrored, lands on the same crop mirrored (alignment is geometric, not a guess)
    a = np.asarray(Image.open(out / "aligned" / "hopper_orig.png")).astype(int)
    b = np.asarray(Image.open(out / "aligned" / "hopper_mirror.png")).astype(int)[:, ::-1]
    assert np.abs(a - b).mean() < 12
    # a second run writes the same bytes
    first = (out / "manifest.jsonl").read_bytes(), (out / "aligned" / "hopper_small.png").read_bytes()
    ingest_main(["--params", str(pp), "--out", str(out), "--metrics", str(tmp_path / "m.json")])
    assert first == (
        (out / "manifest.jsonl").read_bytes(),
        (out / "aligned" / "hopper_small.png").read_bytes(),
    )


def test_unlabelled_real_album_becomes_identities_with_dlib(tmp_path, hopper, astronaut):
    """An unlabelled folder of ordinary photos (one person's flips, crops and rescales, another person)
    → ingest with `align: ffhq` → embed with dlib's face ResNet for grouping → pairs: the two people."""
    import json

    import yaml

    from stages.embed import main as embed_main
    from stages.ingest import main as ingest_main
    from stages.pairs import main as pairs_main

    root = tmp_path / "photos"
    small = np.asarray(Image.fromarray(hopper).resize((300, 352), Image.Resampling.LANCZOS))
    for name, img in {
        "a.png": hopper,
        "b.png": hopper[:, ::-1],
        "c.png": hopper[40:520, 20:500],
        "d.png": small,
        "e.png": astronaut,
        "f.png": astronaut[:, ::-1],
        "g.png": np.asarray(Image.fromarray(astronaut).resize((240, 240), Image.Resampling.LANCZOS)),
    }.items():
        _save(root / name, img)
    enc = write_encoders(tmp_path / "encoders")
    pp = tmp_path / "params.yaml"
    pp.write_text(
        yaml.safe_dump(
            {
                "source": {
                    "kind": "unlabelled_folder",
                    "root": str(root),
                    "align": "ffhq",
                    "align_size": 128,
                },
                "embed": {"checkpoint": str(enc / "primary.safetensors"), "grouping": "dlib_resnet"},
                "pairs": {"split_fractions": {"train": 1.0, "val": 0.0, "test": 0.0}},
            }
        )
    )
    ing, emb = tmp_path / "ingest", tmp_path / "emb"
    ingest_main(["--params", str(pp), "--out", str(ing), "--metrics", str(tmp_path / "i.json")])
    embed_main(["--params", str(pp), "--ingest", str(ing), "--out", str(emb)])
    meta = json.loads((emb / "embeddings.json").read_text())
    assert meta["grouping"]["encoder"] == "dlib_resnet" and np.load(emb / "grouping.npy").shape == (7, 128)
    pairs_main(
        ["--params", str(pp), "--ingest", str(ing), "--embeddings", str(emb), "--out", str(tmp_path / "p"),
         "--metrics", str(tmp_path / "p.json")]
    )  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "p" / "identities.jsonl").read_text().splitlines()]
    people = {}
    for r in rows:
        people.setdefault(r["identity"], set()).add(r["image_id"])
    assert sorted(map(sorted, people.values())) == [["a", "b", "c", "d"], ["e", "f", "g"]]
    assert json.loads((tmp_path / "p.json").read_text())["grouping"] == "dlib_resnet"


def test_dlib_resnet_as_the_evaluator(tmp_path, hopper, astronaut):
    """`embed.evaluator: dlib_resnet`: GT-ID measured by dlib's face ResNet on aligned crops."""
    from pipelines.config import EmbedConfig
    from pipelines.embedding import load_encoders
    from pipelines.evaluation import cosine, embed
    from pipelines.faces import FaceAligner

    enc = write_encoders(tmp_path / "encoders")
    encoders = load_encoders(
        EmbedConfig(checkpoint=str(enc / "primary.safetensors"), evaluator="dlib_resnet"),
        tmp_path / "encoders",
    )
    al = FaceAligner(128)
    crops = np.stack([al.align(x, al.one_face(x, "x")) for x in (hopper, hopper[:, ::-1], astronaut)])
    e = embed(encoders.evaluator, crops)
    same, other = cosine(e[0:1], e[1:2])[0], cosine(e[0:1], e[2:3])[0]
    assert e.shape == (3, 128) and same > 0.95 and other < same - 0.05, (same, other)


@pytest.mark.parametrize("upscale,crop_scale", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_paste_back_of_the_aligned_crop_returns_the_photo(hopper, upscale, crop_scale):
    """Geometry round trip: pasting the aligned crop itself back (with --upscale, and with a restored crop
    at another size than the aligned one) lands on the photo's own pixels; nothing outside the crop square
    changes."""
    import cv2

    from pipelines.faces import FaceAligner, paste_back

    aligner = FaceAligner(256)
    face = aligner.detect(hopper)[0]
    crop = aligner.align(hopper, face)
    if crop_scale != 1:
        crop = cv2.resize(crop, None, fx=crop_scale, fy=crop_scale, interpolation=cv2.INTER_CUBIC)
    out = paste_back(hopper, [face], [crop], upscale).astype(np.float32)
    base = (
        hopper
        if upscale == 1
        else cv2.resize(hopper, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
    )
    base = base.astype(np.float32)
    inv = cv2.invertAffineTransform(face.affine)
    inv[:, :2] *= upscale
    inv[:, 2] = inv[:, 2] * upscale + (upscale - 1) / 2
    square = cv2.warpAffine(np.ones((256, 256), np.float32), inv, base.shape[1::-1], flags=cv2.INTER_NEAREST)
    core = cv2.erode(square, np.ones((41, 41), np.uint8)) > 0
    outside = cv2.dilate(square, np.ones((5, 5), np.uint8)) == 0
    np.testing.assert_array_equal(out[outside], base[outside])
    # inside: the same pixels up to the two resamplings (a shifted paste-back would differ on every edge)
    err = np.abs(out[core] - base[core]).mean()
    assert err < 3.5, err  # 3.16 is the two resamplings' own loss; half-pixel shifts measured 3.9-5.3
