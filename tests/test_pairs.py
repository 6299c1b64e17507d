import numpy as np
import pytest

from pipelines.config import PairsConfig
from pipelines.pairs import (
    assign_splits,
    build_pairs,
    farthest_point_order,
    graph_components,
    label_agreement,
    unit,
)


def _clusters(n_people=12, per=5, dim=64, noise=0.07, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_people, dim)))
    labels = np.repeat(np.arange(n_people), per)
    emb = unit(centres[labels] + rng.normal(0, noise, (len(labels), dim))) * rng.uniform(
        10, 30, (len(labels), 1)
    )
    return emb, labels


def test_graph_links_below_the_distance_threshold():
    e = unit(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]))
    # distances: 0-1 = 0.2, 1-2 = 0.4, 0-2 = 1.0
    assert graph_components(e, 0.3).tolist() == [0, 0, 2, 3]
    assert graph_components(e, 0.41).tolist() == [0, 0, 0, 3]
    assert graph_components(e, 0.41, block=1).tolist() == [0, 0, 0, 3]  # blocking does not matter


def test_label_agreement():
    a = np.array([0, 0, 1, 1, 2])
    assert label_agreement(a, np.array(["x", "x", "y", "y", "z"]))["adjusted_rand_index"] == 1.0
    merged = label_agreement(np.zeros(5, int), np.array(["x", "x", "y", "y", "z"]))
    assert merged["pair_recall"] == 1.0 and merged["pair_precision"] == pytest.approx(2 / 10)


def test_splits_are_identity_disjoint_and_near_the_fractions():
    sizes = {f"id{i}": 2 + i % 5 for i in range(300)}
    s = assign_splits(sizes, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    imgs = {k: sum(sizes[i] for i in sizes if s[i] == k) for k in ("train", "val", "test")}
    total = sum(sizes.values())
    assert abs(imgs["train"] / total - 0.8) < 0.02 and abs(imgs["test"] / total - 0.1) < 0.02
    assert s == assign_splits(
        dict(reversed(list(sizes.items()))), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1
    )


def test_farthest_point_order():
    e = unit(np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.05], [0.7, 0.7]]))
    order = farthest_point_order(0, [1, 2, 3, 4], e)
    assert order[0] == 3  # farthest from the target first
    assert order[1] == 2  # then farthest from {target, 3}
    assert sorted(order) == [1, 2, 3, 4]


def test_build_pairs_protocol():
    emb, labels = _clusters()
    manifest = [
        {"image_id": f"img{i:03d}", "identity": f"p{lab}", "split": None} for i, lab in enumerate(labels)
    ]
    # a near-duplicate of img000 in the same identity: never a val/test reference of it
    cfg = PairsConfig(split_fractions={"train": 0.5, "val": 0.25, "test": 0.25}, max_refs=3)
    identities, pairs, unpaired, metrics = build_pairs(manifest, emb, cfg, labelled=True)
    split_of = {r["image_id"]: r["split"] for r in identities}
    for p in pairs:
        assert len(p["refs"]) <= 3 and p["target"] not in p["refs"]
        assert all(split_of[r] == p["split"] for r in p["refs"])
        assert all(labels[int(r[3:])] == labels[int(p["target"][3:])] for r in p["refs"])
        if p["split"] in ("val", "test"):
            assert all(1 - c >= 0.1 for c in p["ref_cosines"])
    assert metrics["graph_vs_labels"]["adjusted_rand_index"] > 0.9
    assert {p["split"] for p in pairs} == {"train", "val", "test"}


def test_graph_identities_for_unlabelled_sources_and_singletons():
    emb, labels = _clusters(n_people=6, per=4)
    emb = np.vstack([emb, unit(np.random.default_rng(5).normal(size=(1, emb.shape[1]))) * 20])  # a loner
    manifest = [{"image_id": f"u{i:03d}", "identity": None, "split": None} for i in range(len(emb))]
    identities, pairs, unpaired, metrics = build_pairs(manifest, emb, PairsConfig(), labelled=False)
    assert metrics["identity_from"] == "graph"
    assert {u["target"]: u["reason"] for u in unpaired}["u024"] == "single_image_identity"
    assert len({r["identity"] for r in identities}) == 7
    with pytest.raises(ValueError, match="no identity labels"):
        build_pairs(manifest, emb, PairsConfig(identity_from="label"), labelled=False)
