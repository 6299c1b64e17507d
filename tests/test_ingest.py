"""Ingest: every bad image is quarantined with a reason naming the file; the rest goes on."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, face_png, rgb, save
from PIL import Image

from pipelines.config import IngestConfig, SourceConfig
from pipelines.images import ImageProblem, load_rgb
from pipelines.ingest import ingest
from pipelines.sources import SourceError, list_source


def _album(root: Path) -> Path:
    """root/<identity>/<images> with one example of every kind of bad input."""
    good = {f"p{i}": [rgb(10 * i + j) for j in range(3)] for i in range(3)}
    for ident, imgs in good.items():
        for j, im in enumerate(imgs):
            save(root / ident / f"{j}.png", im)
    bad = root / "zbad"  # sorts after p*: the originals come first, their copies are the duplicates
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    data = face_png(99)
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (bad / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    save(bad / "tiny.png", rgb(98).resize((16, 16)))
    (bad / "dup.png").write_bytes((root / "p0" / "0.png").read_bytes())  # same bytes, other identity
    (root / "p1" / "9.png").write_bytes((root / "p1" / "0.png").read_bytes())  # same bytes, same identity
    save(bad / "dup_pixels.bmp", Image.open(root / "p0" / "1.png"))  # same pixels, other encoding
    save(bad / "cmyk.jpg", rgb(50).convert("CMYK"), quality=95)
    sixteen = (np.asarray(rgb(51).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save(bad / "gray16.png", Image.fromarray(sixteen))
    save(bad / "gray.png", rgb(52).convert("L"))
    save(bad / "palette.png", rgb(53).convert("P", palette=Image.Palette.ADAPTIVE))
    rgba = rgb(54).convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:8, :8, 3] = 0
    save(bad / "alpha.png", Image.fromarray(a, "RGBA"))
    # EXIF orientation 6 (rotate 90° clockwise): a 64x48 file shows as 48x64
    im = rgb(55).resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(bad / "rotated.jpg", im, exif=exif.tobytes(), quality=95)
    (root / "stray.png").write_bytes(face_png(56))  # outside any identity folder
    (bad / "notes.txt").write_text("not an image")
    return root


def test_ingest_quarantines_each_bad_input_with_a_reason(tmp_path):
    root = _album(tmp_path / "album")
    listing = list_source(SourceConfig(kind="folder_by_identity", root=str(root)))
    res = ingest(listing, IngestConfig(min_size=32), progress=False)
    q = {Path(r["item"]).name: r for r in res.quarantine}
    assert q["zero.png"]["reason"] == "empty"
    assert q["truncated.png"]["reason"] in ("truncated", "unreadable")
    assert q["corrupt.jpg"]["reason"] == "unreadable"
    assert q["tiny.png"]["reason"] == "too_small" and "16x16" in q["tiny.png"]["detail"]
    assert q["9.png"]["reason"] == "duplicate" and "same bytes as p1_0" in q["9.png"]["detail"]
    # the same photo under two identities: one label is wrong, and both are named
    assert q["dup.png"]["reason"] == "identity_conflict" and "same bytes" in q["dup.png"]["detail"]
    assert "'zbad'" in q["dup.png"]["detail"] and "'p0'" in q["dup.png"]["detail"]
    assert q["dup_pixels.bmp"]["reason"] == "identity_conflict"
    assert "same pixels" in q["dup_pixels.bmp"]["detail"]
    assert q["stray.png"]["reason"] == "outside_identity_folder"
    assert q["notes.txt"]["reason"] == "unsupported_extension"
    for r in res.quarantine:  # every message names the file
        assert str(Path(r["item"]).name) in r["detail"] or r["reason"] in (
            "outside_identity_folder",
            "unsupported_extension",
        )
    m = {r["image_id"]: r for r in res.manifest}
    conv = {k: v["conversions"] for k, v in m.items()}
    assert any("CMYK->RGB" in c for c in conv["zbad_cmyk"])
    assert any("16-bit" in c for c in conv["zbad_gray16"])
    assert conv["zbad_gray"] == ["L->RGB"]
    assert conv["zbad_palette"] == ["P->RGB"]
    assert any("alpha over white" in c for c in conv["zbad_alpha"])
    assert "exif_orientation_6" in conv["zbad_rotated"] and (
        m["zbad_rotated"]["width"],
        m["zbad_rotated"]["height"],
    ) == (48, 64)
    # nothing lost: every listed file is in exactly one of the two lists
    assert res.metrics["listed"] == len(res.manifest) + sum(
        1 for r in res.quarantine if r["image_id"] is not None
    )
    assert res.metrics["accepted"] == 9 + 6
    assert res.metrics["quarantine_reasons"]["duplicate"] == 1
    assert res.metrics["quarantine_reasons"]["identity_conflict"] == 2
    assert {r["identity"] for r in res.manifest} == {"p0", "p1", "p2", "zbad"}


def test_alpha_can_be_refused(tmp_path):
    root = _album(tmp_path / "album")
    res = ingest(
        list_source(SourceConfig(kind="folder_by_identity", root=str(root))),
        IngestConfig(alpha="quarantine"),
        progress=False,
    )
    assert any(r["reason"] == "alpha" and "alpha.png" in r["detail"] for r in res.quarantine)


def test_load_rgb_errors_name_the_file(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"")
    with pytest.raises(ImageProblem, match=r"x.png: zero-byte"):
        load_rgb(p)
    p.write_bytes(face_png(1)[:200])
    with pytest.raises(ImageProblem, match=r"x.png"):
        load_rgb(p)


def test_loaded_pixels_match_the_file(tmp_path):
    im = rgb(3)
    p = save(tmp_path / "a.png", im)
    arr, info = load_rgb(p)
    assert np.array_equal(arr, np.asarray(im)) and info.conversions == []


def test_empty_source_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        list_source(SourceConfig(kind="folder_by_identity", root=str(tmp_path / "empty")))
    with pytest.raises(SourceError, match="is not a folder"):
        list_source(SourceConfig(kind="unlabelled_folder", root=str(tmp_path / "missing")))


def test_unlabelled_folder_has_no_identities(tmp_path):
    for i in range(3):
        save(tmp_path / "u" / "sub" / f"{i}.png", rgb(i))
    listing = list_source(SourceConfig(kind="unlabelled_folder", root=str(tmp_path / "u")))
    assert not listing.labelled and [i.identity for i in listing.items] == [None] * 3
    assert [i.image_id for i in listing.items] == ["sub_0", "sub_1", "sub_2"]


def _run_ingest(params: Path, out: Path, metrics: Path) -> subprocess.CompletedProcess:
    """The ingest stage as dvc runs it, in a subprocess."""
    cmd = [
        sys.executable,
        "-m",
        "stages.ingest",
        "--params",
        str(params),
        "--out",
        str(out),
        "--metrics",
        str(metrics),
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def test_ingest_stage_writes_metrics_and_survives_bad_images(tmp_path):
    root = _album(tmp_path / "album")
    params = tmp_path / "params.yaml"
    params.write_text(f"source: {{kind: celebref_hq, root: {root}}}\ningest: {{min_size: 32}}\n")
    out = _run_ingest(params, tmp_path / "ing", tmp_path / "m.json")
    assert out.returncode == 0, out.stderr
    assert "quarantined [empty]" in out.stdout and "zero.png" in out.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["accepted"] == 15 and metrics["quarantine_reasons"]["too_small"] == 1
    lines = (tmp_path / "ing" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["image_id"] for x in lines] == sorted(json.loads(x)["image_id"] for x in lines)


def test_bad_params_fail_before_work(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("source: {kind: flickr, root: .}\n")
    out = _run_ingest(params, tmp_path / "o", tmp_path / "m.json")
    assert out.returncode != 0 and "source.kind: 'flickr' is not one of" in out.stderr
    assert not (tmp_path / "o").exists()


def test_a_second_ingest_writes_the_same_bytes(tmp_path):
    """Every quarantine reason is a function of the file's bytes and name: two runs of the stage (two
    processes) on a folder holding every kind of bad file write byte-identical outputs (Pillow's message
    for an unidentifiable file used to embed a Python object address)."""
    root = _album(tmp_path / "album")
    params = tmp_path / "params.yaml"
    params.write_text(f"source: {{kind: folder_by_identity, root: {root}}}\ningest: {{min_size: 32}}\n")
    outs = []
    for run in ("a", "b"):
        r = _run_ingest(params, tmp_path / run, tmp_path / f"{run}.json")
        assert r.returncode == 0, r.stderr
        outs.append({f.name: f.read_bytes() for f in sorted((tmp_path / run).iterdir())})
    assert outs[0] == outs[1]
    text = outs[0]["quarantine.jsonl"].decode()
    assert " at 0x" not in text and "corrupt.jpg" in text
