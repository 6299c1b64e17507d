"""The Ray degradation stream on local Ray: exact counts, reproducible bytes, a killed worker, bad samples."""

import hashlib
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import ray
from conftest import make_shards

from pipelines.stream import DegradationStream, degrade_chunk_local, epoch_order, plan_chunks

N = 320


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), N, refs=2, per_shard=64)


def _digest(batches):
    return {k: hashlib.sha256(lq.tobytes()).hexdigest() for b in batches for k, lq in zip(b["keys"], b["lq"])}


def test_plan_covers_every_sample_once(shards):
    chunks = plan_chunks(shards, 16)
    keys = [k for c in chunks for k in c.keys]
    assert len(keys) == N == len(set(keys)) and len(chunks) == 20
    # ranks get disjoint, equal-sized shares
    a, b = epoch_order(chunks, 0, 3, True, 0, 2), epoch_order(chunks, 0, 3, True, 1, 2)
    assert len(a) == len(b) == 10 and not {c.index for c in a} & {c.index for c in b}
    assert [c.index for c in epoch_order(chunks, 0, 3, True)] != [
        c.index for c in epoch_order(chunks, 0, 4, True)
    ]


def test_chunk_task_is_a_pure_function(shards):
    c = plan_chunks(shards, 8)[3]
    a, b = degrade_chunk_local(c, "iconface_mixed", 0, 0), degrade_chunk_local(c, "iconface_mixed", 0, 0)
    assert a["keys"] == list(c.keys) and a["lq"].shape == (8, 32, 32, 3) and a["lq"].dtype == np.uint8
    assert a["lq"].tobytes() == b["lq"].tobytes()
    # references and masks pass through untouched
    assert len(a["refs"][0]) == 2 and a["masks"][0][0].shape == (32, 32)
    # or stay undecoded for a reader that has no use for them, with the same degraded targets
    lean = degrade_chunk_local(c, "iconface_mixed", 0, 0, references=False)
    assert lean["lq"].tobytes() == a["lq"].tobytes() and lean["gt"].tobytes() == a["gt"].tobytes()
    assert lean["refs"][0] == [] and lean["masks"][0] == [] and lean["ref_emb"][0].shape == (2, 4)
    no_masks = degrade_chunk_local(c, "iconface_mixed", 0, 0, masks=False)
    assert no_masks["masks"][0] == [None, None] and np.array_equal(no_masks["refs"][0][1], a["refs"][0][1])


def test_stream_epoch_exact_and_reproducible(local_ray, shards):
    s = DegradationStream(shards, "iconface_mixed", seed=0, batch_size=16, max_in_flight=3)
    first = list(s.epoch(0))
    keys = [k for b in first for k in b["keys"]]
    assert len(keys) == N and len(set(keys)) == N and s.stats["samples"] == N
    b = first[0]
    assert (
        b["lq"].shape == (16, 32, 32, 3) and b["gt"].shape == (16, 32, 32, 3) and b["gt_emb"].shape == (16, 4)
    )
    again = list(DegradationStream(shards, "iconface_mixed", seed=0, batch_size=16, max_in_flight=1).epoch(0))
    assert [x["keys"] for x in again] == [x["keys"] for x in first]  # same order whatever the parallelism
    assert _digest(again) == _digest(first)
    lean = list(
        DegradationStream(
            shards, "iconface_mixed", seed=0, batch_size=16, max_in_flight=3, references=False
        ).epoch(0)
    )
    assert _digest(lean) == _digest(first) and all(r == [] for b in lean for r in b["refs"])
    bare = list(
        DegradationStream(
            shards, "iconface_mixed", seed=0, batch_size=16, max_in_flight=3, masks=False
        ).epoch(0)
    )
    assert _digest(bare) == _digest(first) and all(m == [None, None] for b in bare for m in b["masks"])
    assert all(len(r) == 2 for b in bare for r in b["refs"])
    other = _digest(s.epoch(1))
    assert sum(other[k] != v for k, v in _digest(first).items()) > N * 0.9  # a fresh corruption each epoch
    # resuming mid-epoch continues exactly where it stopped
    rest = list(s.epoch(0, skip_batches=5))
    assert [x["keys"] for x in rest] == [x["keys"] for x in first[5:]]


def _kill_one_worker(done: threading.Event, killed: list):
    """SIGKILL the first Ray worker process found executing degrade_chunk."""
    while not done.is_set() and not killed:
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any("ray::degrade_chunk" in part for part in (p.info["cmdline"] or [])):
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.005)


def test_killed_worker_is_replaced_without_loss_or_duplicates(local_ray, shards):
    clean = _digest(DegradationStream(shards, "realesrgan", seed=5, batch_size=8, max_in_flight=2).epoch(0))
    s = DegradationStream(shards, "realesrgan", seed=5, batch_size=8, max_in_flight=2)
    done, killed = threading.Event(), []
    got = []
    for i, b in enumerate(s.epoch(0)):
        got.append(b)
        if i == 3:
            t = threading.Thread(target=_kill_one_worker, args=(done, killed))
            t.start()
    done.set()
    t.join()
    assert killed, "no worker was found to kill"
    keys = [k for b in got for k in b["keys"]]
    assert len(keys) == N and len(set(keys)) == N
    assert _digest(got) == clean  # redone samples are byte-identical


def test_bad_sample_is_reported_by_key_and_skipped(local_ray, tmp_path):
    paths = make_shards(tmp_path, 40, refs=1, per_shard=40, corrupt_key="s00017")
    s = DegradationStream(paths, "face_classic", seed=0, batch_size=8, max_in_flight=2)
    keys = [k for b in s.epoch(0) for k in b["keys"]]
    assert len(keys) == 39 and "s00017" not in keys
    assert s.stats["decode_errors"] == 1 and s.stats["errors"][0]["key"] == "s00017"
