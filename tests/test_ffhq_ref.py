"""The FFHQ-Ref released layout: split lists, reference mapping CSVs, bad rows."""

import csv

import numpy as np
from conftest import face_png

from pipelines.config import IngestConfig, PairsConfig, SourceConfig
from pipelines.ingest import ingest
from pipelines.pairs import build_pairs
from pipelines.sources import list_source


def _release(root):
    """A tiny FFHQ-Ref: 4 people × 3 images; train 2 people, val 1, test 1; plus bad rows."""
    imgs = root / "images"
    imgs.mkdir(parents=True)
    names = {}
    for p in range(4):
        names[p] = [f"{p * 3 + j:05d}.png" for j in range(3)]
        for j, n in enumerate(names[p]):
            (imgs / n).write_bytes(face_png(p * 10 + j))
    (imgs / "69999.png").write_bytes(face_png(77))  # an FFHQ image not in FFHQ-Ref
    split_people = {"train": [0, 1], "val": [2], "test": [3]}
    (root / "id_based_ffhq_split").mkdir()
    (root / "reference_mapping").mkdir()
    for split, people in split_people.items():
        lst = [n for p in people for n in names[p]]
        if split == "train":
            lst.append("99999.png")  # listed, missing on disk
        (root / "id_based_ffhq_split" / f"{split}_image.txt").write_text("\n".join(lst) + "\n")
        with open(root / "reference_mapping" / f"{split}_references.csv", "w", newline="") as f:
            cols = ["gt_image", "ref_image"] + (["lq_image"] if split != "train" else [])
            w = csv.writer(f)
            w.writerow(cols)
            for p in people:
                for gt in names[p]:
                    refs = [n for n in names[p] if n != gt]
                    row = [gt, repr(refs)] + ([f"lq_{gt}"] if split != "train" else [])
                    w.writerow(row)
            if split == "train":
                w.writerow(["00000.png", "['00001.png', 'missing.png']"])  # a ref missing on disk
                w.writerow(["00001.png", "[00002.png"])  # unparsable list
                w.writerow(["nothere.png", "['00000.png']"])  # gt missing
    return root


def test_ffhq_ref_listing_and_bad_rows(tmp_path):
    root = _release(tmp_path / "ffhqref")
    listing = list_source(SourceConfig(kind="ffhq_ref", root=str(root), images_dir="images"))
    assert len(listing.items) == 12
    assert {i.split for i in listing.items} == {"train", "val", "test"}
    # identities are the connected components of the released links: 4 people
    assert len({i.identity for i in listing.items}) == 4
    reasons = [(p["reason"], p["item"].split("/")[-1], p["detail"]) for p in listing.problems]
    assert any(r == "unparsable_ref_list" and "train_references.csv:" in it for r, it, _ in reasons)
    assert any(r == "missing_file" and "'missing.png'" in d for r, _, d in reasons)
    assert any(r == "missing_file" and "'nothere.png'" in d for r, _, d in reasons)
    assert any(r == "missing_file" and "99999.png" in it for r, it, _ in reasons)
    assert any(r == "not_in_split_lists" and it.endswith("69999.png") for r, it, _ in reasons)
    unparsable = next(p for p in listing.problems if p["reason"] == "unparsable_ref_list")
    assert unparsable["item"].endswith(
        "train_references.csv:9"
    )  # header is row 1, 6 good rows, 1 with a missing ref
    # the partially valid row is kept with the reference that exists
    assert {"split": "train", "gt": "00000", "refs": ["00001"], "lq": None} in [
        {k: m[k] for k in ("split", "gt", "refs", "lq")} for m in listing.mapping
    ]
    res = ingest(listing, IngestConfig(), progress=False)
    assert res.metrics["accepted"] == 12


def test_ffhq_ref_pairs_import_the_released_mapping(tmp_path):
    root = _release(tmp_path / "ffhqref")
    listing = list_source(SourceConfig(kind="ffhq_ref", root=str(root)))
    res = ingest(listing, IngestConfig(), progress=False)
    ids = [r["image_id"] for r in res.manifest]
    person = np.array([int(i) // 3 for i in ids])
    emb = np.eye(8)[person] * 20 + np.random.default_rng(0).normal(0, 0.5, (len(ids), 8))  # separable
    identities, pairs, unpaired, metrics = build_pairs(
        res.manifest, emb, PairsConfig(), True, listing.mapping
    )
    by_target = {}
    for p in pairs:
        by_target.setdefault(p["target"], []).append(p)
    assert by_target["00003"][0]["refs"] == ["00004", "00005"]  # as released, in order
    assert {p["split"] for p in by_target["00006"]} == {"val"}
    assert metrics["released"]["check"]["refs_in_same_graph_component"] == 1.0
    assert metrics["graph_vs_labels"]["adjusted_rand_index"] == 1.0
