"""Shards: contract, byte-reproducibility, validation naming the corrupt shard."""

import json

import numpy as np
import pytest
from conftest import face_png

from pipelines.images import png_bytes
from pipelines.shards import (
    ShardError,
    decode_sample,
    iter_raw,
    iter_samples,
    npy_bytes,
    shard_paths,
    validate_shards,
    write_split,
)
from pipelines.synthetic import conflict_mask, face_spec


def _samples(n=5, k=2):
    for i in range(n):
        t = face_spec(7, "album", 0, i)
        s = {"__key__": f"t{i:03d}", "gt.png": face_png(i)}
        for j in range(k):
            s[f"ref{j}.png"] = face_png(100 + j)
            s[f"refmask{j}.png"] = png_bytes(conflict_mask(t, face_spec(7, "album", 0, 10 + j), 64))
        s["meta.json"] = json.dumps({"ref_count": k, "target": f"t{i:03d}"}, sort_keys=True).encode()
        s["gt_emb.npy"] = npy_bytes(np.full(8, i, np.float32))
        s["ref_emb.npy"] = npy_bytes(np.ones((k, 8), np.float32))
        yield s


def _write(root):
    index = {"format_version": 1, "splits": {}}
    for split, n in (("train", 5), ("val", 0), ("test", 3)):
        entries = write_split(root, split, _samples(n), samples_per_shard=2)
        index["splits"][split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    (root / "index.json").write_text(json.dumps(index))
    return index


def test_shards_are_byte_reproducible_and_indexed(tmp_path):
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b")
    assert [e["sha256"] for e in a["splits"]["train"]["shards"]] == [
        e["sha256"] for e in b["splits"]["train"]["shards"]
    ]
    assert [e["samples"] for e in a["splits"]["train"]["shards"]] == [2, 2, 1]
    assert a["splits"]["val"] == {"samples": 0, "shards": []}
    validate_shards(tmp_path / "a")


def test_decoded_sample_follows_the_contract(tmp_path):
    _write(tmp_path)
    s = list(iter_samples(tmp_path, "train"))
    assert [x["key"] for x in s] == ["t000", "t001", "t002", "t003", "t004"]
    x = s[1]
    assert x["gt"].shape == (64, 64, 3) and len(x["refs"]) == 2
    assert x["masks"][0].ndim == 2 and set(np.unique(x["masks"][0])) <= {0, 1, 255}  # single channel kept
    assert x["gt_emb"].tolist() == [1.0] * 8 and x["ref_emb"].shape == (2, 8)


def test_a_reader_can_leave_references_and_masks_encoded(tmp_path):
    _write(tmp_path)
    raw = next(iter_raw(shard_paths(tmp_path, "train")))
    full, no_masks, target_only = (
        decode_sample(raw),
        decode_sample(raw, masks=False),
        decode_sample(raw, references=False),
    )
    assert all(np.array_equal(a, b) for a, b in zip(full["refs"], no_masks["refs"]))
    assert len(no_masks["refs"]) == 2 and no_masks["masks"] == [None, None]
    assert target_only["refs"] == [] and target_only["masks"] == []
    for x in (no_masks, target_only):  # the rest is what the full decode gives
        assert np.array_equal(x["gt"], full["gt"]) and np.array_equal(x["ref_emb"], full["ref_emb"])
        assert x["meta"] == full["meta"]


def test_validation_names_the_corrupt_or_missing_shard(tmp_path):
    _write(tmp_path)
    bad = tmp_path / "train-000001.tar"
    data = bytearray(bad.read_bytes())
    data[600] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001.tar: corrupt shard \(sha256"):
        validate_shards(tmp_path)
    bad.write_bytes(bytes(data[:700]))
    with pytest.raises(ShardError, match=r"train-000001.tar: corrupt shard"):
        validate_shards(tmp_path, check_hash=False)
    bad.unlink()
    with pytest.raises(ShardError, match=r"train-000001.tar: shard listed in .* is missing"):
        validate_shards(tmp_path)


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    _write(tmp_path)
    ds = wds.WebDataset(str(tmp_path / "train-{000000..000002}.tar"), shardshuffle=False, empty_check=False)
    keys = [s["__key__"] for s in ds]
    assert keys == ["t000", "t001", "t002", "t003", "t004"]
    raw = next(iter(iter_raw([str(tmp_path / "test-000000.tar")])))
    assert decode_sample(raw)["meta"]["ref_count"] == 2
