"""Shards on object storage: a real S3-compatible server (moto's) on 127.0.0.1, and `pipe:` URLs.

The same shards are read from disk and through `s3://` (fsspec + s3fs) and must give the same listing,
the same bytes for every chunk and byte-identical degraded epochs, inline and in real local Ray tasks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pair_shards

from pipelines import storage
from pipelines.shards import ShardError, iter_raw, shard_paths, validate_shards
from pipelines.stream import DegradationStream, degrade_chunk_local, plan_chunks, sample_ranges

BUCKET = "refface-test"
PRESET = "iconface_mixed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port; credentials and endpoint through the environment (as a
    user sets them), the same as explicit `storage_options` for Ray tasks. Shards uploaded as written."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    tmp = tmp_path_factory.mktemp("s3")
    mp = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),  # no developer profile leaks in
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
    }.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    local = make_pair_shards(tmp / "shards")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    fs, _ = storage.filesystem(f"s3://{BUCKET}", options)
    fs.mkdir(BUCKET)
    for f in sorted(local.iterdir()):
        fs.pipe_file(f"{BUCKET}/shards/{f.name}", f.read_bytes())
        if f.suffix == ".tar":  # the same shards without an index, and one object that is no tar
            fs.pipe_file(f"{BUCKET}/bare/{f.name}", f.read_bytes())
    fs.pipe_file(f"{BUCKET}/odd/train-000000.tar", b"PK\x03\x04 a zip, not a tar" + b"\0" * 2000)
    yield {"local": local, "url": f"s3://{BUCKET}/shards", "options": options, "fs": fs}
    mp.undo()
    server.stop()


def _url(s3, path: str) -> str:
    return f"{s3['url']}/{Path(path).name}"


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["meta"] == y["meta"] and x["params"] == y["params"]
        for k in ("lq", "gt", "gt_emb"):
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k
        for k in ("refs", "ref_emb"):
            assert all(np.array_equal(p, q) for p, q in zip(x[k], y[k])), k
        for m, n in zip(x["masks"], y["masks"]):
            assert all(np.array_equal(p, q) for p, q in zip(m, n))


def test_listing_from_s3_equals_local(s3):
    for split in ("train", "val", "test"):
        local = shard_paths(s3["local"], split)
        remote = shard_paths(s3["url"], split)
        assert remote == [_url(s3, p) for p in local] and len(local) >= 1
        assert all(storage.read_all(u) == Path(p).read_bytes() for u, p in zip(remote, local))
    assert len(shard_paths(s3["url"], "train")) == 2  # 24 train samples, 16 a shard
    # without an index: the <split>-*.tar objects, sorted; the index check passes through fsspec
    bare = shard_paths(f"s3://{BUCKET}/bare", "train")
    assert [Path(u).name for u in bare] == [Path(p).name for p in shard_paths(s3["local"], "train")]
    assert validate_shards(s3["url"]) == json.loads((s3["local"] / "index.json").read_text())


def test_every_chunk_reads_the_same_bytes_through_the_url(s3):
    local = shard_paths(s3["local"], "train")
    remote = shard_paths(s3["url"], "train")
    for p, u in zip(local, remote):
        assert sample_ranges(u) == sample_ranges(p) and len(sample_ranges(p)) > 1
    lc, rc = plan_chunks(local, 3), plan_chunks(remote, 3)
    assert [(c.offset, c.length, c.keys) for c in lc] == [(c.offset, c.length, c.keys) for c in rc]
    assert len(lc) == 9  # chunks of 3 samples: 16 → 6 and 8 → 3
    for c, r in zip(lc, rc):
        with open(c.shard, "rb") as f:
            f.seek(c.offset)
            want = f.read(c.length)
        assert storage.read_range(r.shard, r.offset, r.length) == want
        assert storage.read_range(r.shard, r.offset, r.length, s3["options"]) == want
    assert [r["__key__"] for r in iter_raw(remote)] == [r["__key__"] for r in iter_raw(local)]


def test_inline_epoch_over_s3_is_byte_identical(s3):
    local = shard_paths(s3["local"], "train")
    remote = shard_paths(s3["url"], "train")
    a = list(DegradationStream(local, PRESET, seed=3, batch_size=4, inline=True).epoch(1))
    b = list(DegradationStream(remote, PRESET, seed=3, batch_size=4, inline=True).epoch(1))
    _same_batches(a, b)
    assert sum(len(x["keys"]) for x in b) == 24


def test_training_batches_from_an_s3_folder_equal_local(s3):
    """The Lightning data module (what `fit` builds) over the s3 folder: the same collated tensors."""
    import torch

    from pipelines.batches import StreamDataModule

    def first_batches(root: str, n: int = 3) -> list[dict]:
        dm = StreamDataModule(
            shard_paths(root, "train"), PRESET, 5, 4, 2, (0.3, 0.3, 0.2, 0.2), 3, inline=True
        )
        dm.setup()
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(n)]

    for x, y in zip(first_batches(str(s3["local"])), first_batches(s3["url"]), strict=True):
        assert x.keys() == y.keys() and x["keys"] == y["keys"]
        for k, v in x.items():
            assert torch.equal(v, y[k]) if isinstance(v, torch.Tensor) else v == y[k], k


def test_ray_epoch_over_s3_is_byte_identical(s3):
    import ray

    local = shard_paths(s3["local"], "train")
    remote = shard_paths(s3["url"], "train", s3["options"])
    started = not ray.is_initialized()
    if started:
        # address="local": a new local Ray, never a cluster that another process left in /tmp/ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # the workers get the endpoint and keys with each task (storage_options), not from the environment
        stream = DegradationStream(
            remote, PRESET, seed=3, batch_size=4, max_in_flight=3, storage_options=s3["options"]
        )
        b = list(stream.epoch(0))
        assert all(n is not None for n in stream.stats["nodes"])  # ran in Ray workers
        assert {x["pid"] for x in b}.isdisjoint({os.getpid()})
    finally:
        if started:
            ray.shutdown()
    a = list(DegradationStream(local, PRESET, seed=3, batch_size=4, inline=True).epoch(0))
    _same_batches(a, b)


def test_errors_name_the_url(s3):
    missing = f"{s3['url']}/train-000099.tar"
    with pytest.raises(ShardError, match=rf"{missing}: not found .*key"):
        sample_ranges(missing)
    with pytest.raises(ShardError, match=rf"{missing}: not found"):
        list(iter_raw([missing]))
    with pytest.raises(ShardError, match=rf"{missing}: not found"):
        DegradationStream([missing], PRESET, seed=0, inline=True)
    c = plan_chunks(shard_paths(s3["url"], "train"), 4)[0]
    gone = type(c)(c.index, missing, c.offset, c.length, c.keys)
    with pytest.raises(ShardError, match=rf"{missing}: not found"):
        degrade_chunk_local(gone, PRESET, 0, 0)
    with pytest.raises(ShardError, match="s3://no-such-bucket/shards: not found"):
        shard_paths("s3://no-such-bucket/shards", "train")
    with pytest.raises(ShardError, match=rf"s3://{BUCKET}/empty: not found"):
        shard_paths(f"s3://{BUCKET}/empty", "train")
    with pytest.raises(ShardError, match=rf"s3://{BUCKET}/bare: no shards found .*nope-\*\.tar"):
        shard_paths(f"s3://{BUCKET}/bare", "nope")
    with pytest.raises(ShardError, match=rf"{s3['url']}/index.json: no split 'nope'"):
        shard_paths(s3["url"], "nope")
    odd = f"s3://{BUCKET}/odd/train-000000.tar"
    with pytest.raises(ShardError, match=rf"{odd}: not a plain USTAR shard"):
        sample_ranges(odd)
    with pytest.raises(ShardError, match=rf"{BUCKET}/bare/index.json: shard index missing"):
        validate_shards(f"s3://{BUCKET}/bare")


def test_pipe_url_reads_the_same_bytes(s3):
    local = shard_paths(s3["local"], "train")
    piped = [f"pipe:cat {p}" for p in local]
    assert [sample_ranges(u) for u in piped] == [sample_ranges(p) for p in local]
    lc, pc = plan_chunks(local, 5), plan_chunks(piped, 5)
    assert [(c.offset, c.length) for c in lc] == [(c.offset, c.length) for c in pc]
    last = lc[-1]
    with open(last.shard, "rb") as f:
        f.seek(last.offset)
        assert storage.read_range(pc[-1].shard, last.offset, last.length) == f.read(last.length)
    a = list(DegradationStream(local, PRESET, seed=1, batch_size=5, inline=True).epoch(0))
    b = list(DegradationStream(piped, PRESET, seed=1, batch_size=5, inline=True).epoch(0))
    _same_batches(a, b)
    bad = f"pipe:cat {s3['local']}/train-000099.tar"
    with pytest.raises(ShardError, match=rf"{bad}: command exited with status 1: .*No such file"):
        sample_ranges(bad)
    with pytest.raises(ShardError, match="a pipe: URL is one shard, not a folder"):
        shard_paths(f"pipe:cat {s3['local']}", "train")
