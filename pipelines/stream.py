"""The online degradation service: Ray tasks degrade shard samples and stream ready batches.

    stream = DegradationStream(shard_paths("data/shards", "train"), preset="iconface_mixed", seed=0,
                               batch_size=8, max_in_flight=4)
    for batch in stream.epoch(0):
        batch["lq"]   # (B, H, W, 3) uint8, a fresh degradation of batch["gt"]

How it works. The driver plans an epoch as *chunks*: runs of up to `batch_size` consecutive samples of
one shard, located by byte range (a header walk, no decoding). Each chunk becomes one Ray task that
reads only its byte range, decodes the samples, degrades the targets with the preset (a pure function
of (seed, key, epoch)) and returns a ready batch; references, masks and embeddings pass through
untouched (or stay undecoded where the reader has no use for them: `references=False`, `masks=False`).
At most `max_in_flight` tasks are outstanding (backpressure: memory stays bounded by
max_in_flight × batch), and batches are delivered in plan order, so an epoch is reproducible to the
byte however many workers run and wherever they run.

Faults. A task whose worker process dies is retried by Ray (`max_retries`), and again by the driver
if Ray gives up, so a killed worker neither stalls the stream nor loses or duplicates samples. A sample
that fails to decode is reported by key, counted in `stats["decode_errors"]` and left out of its batch.

Clusters. `connect()` starts a local Ray with `num_cpus` by default; with `RAY_ADDRESS` set it joins
that cluster instead, with the same code. Tasks read shards by path, so on a cluster the shards must lie
on storage every node sees: a shared filesystem (same path everywhere), or object storage by URL
(`s3://bucket/prefix/train-000000.tar`, read by byte range through fsspec; `pipelines.storage`). Every
node then needs the credentials: from its environment (AWS_* variables, an instance role) or from the
stream's `storage_options`, which travel with each task.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.degradations import degrade
from pipelines.shards import (
    ShardError,
    ShardReadError,
    _is_url,
    _NotPlain,
    _ustar_members,
    decode_sample,
    ustar_entries,
    ustar_walk,
)

log = logging.getLogger(__name__)


# ==================================================================================================
# Planning
# ==================================================================================================


@dataclass(frozen=True)
class Chunk:
    """Consecutive samples of one shard: the byte range [offset, offset + length) and their keys."""

    index: int
    shard: str
    offset: int
    length: int
    keys: tuple[str, ...]


def sample_ranges(path: str, storage_options: dict | None = None) -> list[tuple[str, int, int]]:
    """(key, byte offset, byte length) of every sample of a plain USTAR shard, in order.

    A local shard is read whole (the fast path); a URL's headers are read by range (`ustar_walk`), so
    the walk holds a 64 KiB read-ahead block, not the shard."""
    out: list[tuple[str, int, int]] = []
    try:
        if _is_url(path):
            out = _ranges_url(path, storage_options)
        else:
            for name, pos, size in ustar_entries(Path(path).read_bytes()):
                _add_member(out, name, pos, size)
    except _NotPlain as exc:
        raise ShardError(
            f"{path}: not a plain USTAR shard (rewrite it with the `shards` stage to stream it)"
        ) from exc
    return out


def _add_member(out: list[tuple[str, int, int]], name: str, pos: int, size: int) -> None:
    """Extend the last sample's range by member `name`, or start a new sample."""
    end = pos + 512 + (size + 511) // 512 * 512
    key = name.split(".", 1)[0]
    if out and out[-1][0] == key:
        out[-1] = (key, out[-1][1], end - out[-1][1])
    else:
        out.append((key, pos, end - pos))


def _ranges_url(url: str, storage_options: dict | None) -> list[tuple[str, int, int]]:
    from pipelines.storage import open_stream

    out: list[tuple[str, int, int]] = []
    with open_stream(url, storage_options) as f:
        try:
            for name, pos, size in ustar_walk(f):
                _add_member(out, name, pos, size)
        except (ShardReadError, _NotPlain):
            raise
        except (ShardError, ValueError, UnicodeDecodeError) as exc:
            raise ShardError(f"{url}: corrupt shard ({exc})") from exc
    return out


def plan_chunks(paths: list[str], batch_size: int, storage_options: dict | None = None) -> list[Chunk]:
    """Chunks of up to `batch_size` samples; a chunk never spans two shards.

    Local shards are walked one after the other; URLs by up to 16 threads at once (each walk waits on
    round trips), the plan in the order of `paths` either way."""
    if any(_is_url(p) for p in paths) and len(paths) > 1:
        with ThreadPoolExecutor(min(16, len(paths))) as pool:
            all_ranges = list(pool.map(lambda p: sample_ranges(p, storage_options), paths))
    else:
        all_ranges = [sample_ranges(p, storage_options) for p in paths]
    chunks: list[Chunk] = []
    for path, ranges in zip(paths, all_ranges):
        for i in range(0, len(ranges), batch_size):
            part = ranges[i : i + batch_size]
            start = part[0][1]
            end = part[-1][1] + part[-1][2]
            chunks.append(Chunk(len(chunks), path, start, end - start, tuple(k for k, _, _ in part)))
    return chunks


def epoch_order(
    chunks: list[Chunk], seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1
) -> list[Chunk]:
    """The chunks one rank processes in an epoch: a seeded permutation, then every world_size-th.

    Every rank gets the same number of chunks (the permutation is truncated to a multiple of
    world_size) so that no DDP rank waits for another at the end of an epoch; `dropped` chunks are
    different ones each epoch.
    """
    order = list(chunks)
    if shuffle:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5EED])
        order = [order[i] for i in rng.permutation(len(order))]
    usable = len(order) - len(order) % world_size
    return order[:usable][rank::world_size]


# ==================================================================================================
# The worker task
# ==================================================================================================


def degrade_chunk_local(
    chunk: Chunk,
    preset: str,
    seed: int,
    epoch: int,
    storage_options: dict | None = None,
    references: bool = True,
    masks: bool = True,
) -> dict:
    """Read, decode and degrade one chunk (the body of the Ray task; callable without Ray).

    A URL shard's chunk is one ranged read (`pipelines.storage.read_range`); a local one as before.
    `references` / `masks` False: those stay undecoded (`pipelines.shards.decode_sample`)."""
    if _is_url(chunk.shard):
        from pipelines.storage import read_range

        data = read_range(chunk.shard, chunk.offset, chunk.length, storage_options)
    else:
        with open(chunk.shard, "rb") as f:
            f.seek(chunk.offset)
            data = f.read(chunk.length)
    data += b"\0" * 1024  # the end-of-archive marker for the header walk
    raws: list[dict] = []
    errors: list[dict] = []
    try:
        for name, value in _ustar_members(data):
            key, ext = name.split(".", 1)
            if not raws or raws[-1]["__key__"] != key:
                raws.append({"__key__": key})
            raws[-1][ext] = value
    except (ShardError, ValueError, UnicodeDecodeError) as exc:
        errors.append(
            {"key": f"{Path(chunk.shard).name}@{chunk.offset}", "error": f"unreadable chunk: {exc}"}
        )
    batch: dict = {
        "index": chunk.index,
        "keys": [],
        "lq": [],
        "gt": [],
        "refs": [],
        "masks": [],
        "meta": [],
        "gt_emb": [],
        "ref_emb": [],
        "params": [],
    }
    for raw in raws:
        key = raw["__key__"]
        try:
            s = decode_sample(raw, references, masks)
            d = degrade(s["gt"], preset, seed, key, epoch)
        except Exception as exc:  # a bad sample must not take the batch down: report it by key
            errors.append({"key": key, "error": f"{type(exc).__name__}: {exc}"})
            continue
        batch["keys"].append(key)
        batch["lq"].append(d.image)
        batch["gt"].append(s["gt"])
        batch["refs"].append(s["refs"])
        batch["masks"].append(s["masks"])
        batch["meta"].append(s["meta"])
        batch["gt_emb"].append(s["gt_emb"])
        batch["ref_emb"].append(s["ref_emb"])
        batch["params"].append(d.params)
    for k in ("lq", "gt", "gt_emb"):
        batch[k] = np.stack(batch[k]) if batch[k] else np.zeros((0,), np.uint8)
    batch["errors"] = errors
    batch["pid"] = os.getpid()
    batch["node"] = _ray_node()
    return batch


def _ray_node() -> str | None:
    """The Ray node this runs on, None outside Ray (without importing Ray where it is not in use: the
    inline stream runs on machines that have no Ray, the GPU check's among them)."""
    import sys

    ray = sys.modules.get("ray")
    # (get_runtime_context would start Ray when called outside it: check first)
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def degrade_chunk(*args, **kwargs) -> dict:
    """`degrade_chunk_local` under the name the Ray task carries (`degrade_chunk_task`)."""
    return degrade_chunk_local(*args, **kwargs)


_REMOTE = None


def degrade_chunk_task():
    """`degrade_chunk_local` as a Ray task (made on first use: Ray is imported only by streams that use it)."""
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(max_retries=3, retry_exceptions=False)(degrade_chunk)
    return _REMOTE


# ==================================================================================================
# The driver side
# ==================================================================================================


def connect(num_cpus: int | None = None) -> str:
    """Start local Ray (default) or join the cluster at RAY_ADDRESS; returns the address in use."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a cluster's workers do not inherit this process's environment: send the CPU pins along
        from pipelines.cpu_pins import READ_BY

        pins = {k: os.environ[k] for k in (*READ_BY, "REFFACE_CPU_PINS") if k in os.environ}
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": pins} if pins else None)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray.get_runtime_context().gcs_address


class _RayFailure(RuntimeError):
    """A Ray task of the stream failed (task error, crashed worker or actor): resubmitted by the driver."""


def _ray_get(ref):
    import ray

    try:
        return ray.get(ref)
    except (
        ray.exceptions.RayTaskError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.RayActorError,
    ) as exc:
        raise _RayFailure(f"{type(exc).__name__}: {exc}") from exc


@dataclass
class DegradationStream:
    """Epochs of degraded batches from shards, produced by Ray tasks (see the module docstring)."""

    paths: list[str]
    preset: str
    seed: int
    batch_size: int = 8
    max_in_flight: int = 4  # outstanding tasks: the memory bound and the parallelism
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    task_retries: int = 2  # driver-side resubmissions after Ray's own retries are exhausted
    inline: bool = False  # degrade in this process, without Ray (tests of multi-process training, debugging)
    references: bool = True  # False: batches carry no reference images or masks (empty lists per sample)
    masks: bool = True  # False: no conflict masks (None per reference)
    storage_options: dict | None = (
        None  # fsspec options for URL shards (else the environment's); to each task
    )
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("DegradationStream: no shards given")
        if self.batch_size < 1 or self.max_in_flight < 1:
            raise ValueError("batch_size and max_in_flight must be at least 1")
        self.chunks = plan_chunks(self.paths, self.batch_size, self.storage_options)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(epoch_order(self.chunks, self.seed, 0, self.shuffle, self.rank, self.world_size))

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """Yield this rank's batches of `epoch` in plan order; `skip_batches` resumes mid-epoch."""
        order = epoch_order(self.chunks, self.seed, epoch, self.shuffle, self.rank, self.world_size)[
            skip_batches:
        ]
        self.stats = {
            "batches": 0,
            "samples": 0,
            "decode_errors": 0,
            "errors": [],
            "resubmitted": 0,
            "wait_s": 0.0,
            "nodes": {},
        }
        pending: deque = deque()
        todo = deque(order)
        attempts: dict[int, int] = {}

        so = self.storage_options

        def task_args(c: Chunk) -> tuple:
            return (c, self.preset, self.seed, epoch, so, self.references, self.masks)

        def submit(c: Chunk) -> None:
            if self.inline:
                pending.append((c, degrade_chunk_local(*task_args(c))))
            else:
                pending.append((c, degrade_chunk_task().remote(*task_args(c))))

        while todo or pending:
            while todo and len(pending) < self.max_in_flight:
                submit(todo.popleft())
            chunk, ref = pending.popleft()
            t = time.perf_counter()
            try:
                batch = ref if self.inline else _ray_get(ref)
            except _RayFailure as exc:
                n = attempts.get(chunk.index, 0) + 1
                if n > self.task_retries:
                    raise RuntimeError(
                        f"chunk {chunk.index} of {chunk.shard} failed {n} times: {exc}"
                    ) from exc
                attempts[chunk.index] = n
                self.stats["resubmitted"] += 1
                log.warning(
                    "chunk %d of %s failed (%s); resubmitting", chunk.index, chunk.shard, type(exc).__name__
                )
                pending.appendleft((chunk, degrade_chunk_task().remote(*task_args(chunk))))
                continue
            finally:
                self.stats["wait_s"] += time.perf_counter() - t
            for err in batch["errors"]:
                log.warning("sample %s skipped: %s", err["key"], err["error"])
            self.stats["decode_errors"] += len(batch["errors"])
            self.stats["errors"] += batch["errors"]
            self.stats["batches"] += 1
            self.stats["samples"] += len(batch["keys"])
            node = batch.get("node")
            self.stats["nodes"][node] = self.stats["nodes"].get(node, 0) + 1
            if batch["keys"]:
                yield batch
