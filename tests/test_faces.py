"""Real photos in, restored photos out (pipelines.faces, `refface restore PHOTO`): dlib detection, FFHQ
alignment and feathered paste-back on a real photo (matplotlib's Grace Hopper, 512x600)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_encoders

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    import matplotlib.cbook as cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A small restorer bundle (tiny backbone, 32 px, random pathways) written as `evaluate` writes one."""
    import torch

    from models.lora import save_trainable
    from pipelines.config import TrainConfig, build
    from pipelines.restorer import write_bundle
    from pipelines.training import build_network

    tmp = tmp_path_factory.mktemp("bundle")
    enc = write_encoders(tmp / "encoders")
    cfg = build(
        TrainConfig,
        {
            "backbone": "tiny",
            "pixel_patch": 4,
            "memory_tokens": 8,
            "train_backbone": True,
            "front_end": 0,
            "front": None,
        },
        "train",
    )
    net, _, _ = build_network(cfg, 512)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    save_trainable(net, tmp / "model")
    return write_bundle(
        tmp / "bundle", cfg, tmp / "model", "small_ir", enc / "primary.safetensors", 32, steps=2
    )


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
    assert code == 0, err and Image.open(tmp_path / "up.png").size == (1024, 1200)

    # two people side by side: each restored; --only-center-face restores one
    pair = tmp_path / "pair.png"
    Image.fromarray(np.concatenate([img, img[:, ::-1]], axis=1)).save(pair)
    code, err = _cli(
        "restore", str(pair), "--model", str(bundle), "--out", str(tmp_path / "pair_out.png"),
        "--save-faces", str(tmp_path / "pair_faces"),
    )  # fmt: skip
    assert code == 0, err and len(list((tmp_path / "pair_faces").glob("*_restored.png"))) == 2
    code, err = _cli(
        "restore", str(pair), "--model", str(bundle), "--out", str(tmp_path / "pc.png"), "--only-center-face",
        "--save-faces", str(tmp_path / "pc_faces"),
    )  # fmt: skip
    assert code == 0, err and len(list((tmp_path / "pc_faces").glob("*_restored.png"))) == 1


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
    assert code == 0, err and Image.open(tmp_path / "gc.png").mode == "RGB"

    # a phone photo stored sideways with EXIF orientation 6: read upright (the detector only finds
    # upright faces), output upright
    side = tmp_path / "side.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90° clockwise
    Image.fromarray(np.rot90(hopper, k=1).copy()).save(side, exif=exif, quality=95)
    code, err = _cli("restore", str(side), "--model", str(bundle), "--out", str(tmp_path / "s.png"))
    assert code == 0, err and Image.open(tmp_path / "s.png").size == (512, 600)

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
