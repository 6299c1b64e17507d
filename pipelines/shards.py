"""Webdataset shards by the contract of docs/architecture.md: write, index, validate, read.

One sample per target: ``gt.png``, ``ref{i}.png`` (ordered, up to `max_refs`), ``meta.json``,
``gt_emb.npy`` (D,) and ``ref_emb.npy`` (K, D) raw identity embeddings, and ``refmask{i}.png``
(single channel, reference grid; 0 consistent, 1 conflict, 255 ignore) where masks exist. Shards are
byte-reproducible: sorted samples, mtime 0, fixed owner and mode, deterministic PNG and npy bytes.

Shard locations are local paths (the default, read as files) or URLs: `s3://bucket/prefix` and other
fsspec URLs, or webdataset's `pipe:CMD`, read by byte range through `pipelines.storage` (ours). The
functions that take a location take `storage_options` (fsspec's keyword arguments) for URLs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.shard_index import (  # noqa: F401 (part of this module's interface)
    FORMAT_VERSION,
    INDEX_NAME,
    ShardError,
    ShardReadError,
    index_shard_names,
)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_split(out: Path, split: str, samples: Iterator[dict], samples_per_shard: int) -> list[dict]:
    """Write samples ({"__key__", "gt.png": bytes, ...}) to `out/{split}-NNNNNN.tar`; return shard entries."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{split}-%06d.tar")
    counts: dict[str, int] = {}

    def post(fname: str) -> None:
        counts[Path(fname).name] = writer.count

    writer = wds.ShardWriter(
        pattern, maxcount=samples_per_shard, verbose=0, mtime=0, encoder=False, post=post
    )
    n = 0
    for s in samples:
        writer.write(s)
        n += 1
    writer.close()
    if n == 0:  # ShardWriter opened an empty first shard: remove it, an empty split has no shards
        for f in out.glob(f"{split}-*.tar"):
            f.unlink()
        return []
    entries = []
    for name in sorted(counts):
        path = out / name
        entries.append(
            {"name": name, "samples": counts[name], "bytes": path.stat().st_size, "sha256": _sha(path)}
        )
    return entries


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate_shards(root: str | Path, check_hash: bool = True, storage_options: dict | None = None) -> dict:
    """Check every shard listed in `root/index.json`: present, sha256 and sample count as indexed.

    Returns the index. Raises `ShardError` naming the first bad shard and what is wrong with it.
    `root` may be a folder URL (`s3://bucket/prefix`): the same checks, streamed through fsspec.
    """
    if _is_url(root):
        return _validate_url(str(root), check_hash, storage_options)
    root = Path(root)
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        raise ShardError(f"{index_path}: shard index missing (run `dvc repro shards`)")
    index = json.loads(index_path.read_text())
    for split, info in index["splits"].items():
        for entry in info["shards"]:
            path = root / entry["name"]
            if not path.is_file():
                raise ShardError(f"{path}: shard listed in {index_path} is missing")
            if check_hash and _sha(path) != entry["sha256"]:
                raise ShardError(f"{path}: corrupt shard (sha256 differs from {index_path})")
            try:
                keys = _sample_keys(path)
            except (tarfile.TarError, OSError, EOFError, ShardError, ValueError) as exc:
                raise ShardError(f"{path}: corrupt shard (not a readable tar: {exc})") from exc
            if len(keys) != entry["samples"]:
                raise ShardError(f"{path}: {len(keys)} samples, index says {entry['samples']} ({split})")
    return index


def _validate_url(root: str, check_hash: bool, storage_options: dict | None) -> dict:
    from pipelines import storage

    index_url = storage.join(root, INDEX_NAME)
    index = storage.read_index(root, storage_options)
    if index is None:
        raise ShardError(f"{index_url}: shard index missing (upload the whole shards folder)")
    for split, info in index["splits"].items():
        for entry in info["shards"]:
            url = storage.join(root, entry["name"])
            if not storage.exists(url, storage_options):
                raise ShardError(f"{url}: shard listed in {index_url} is missing")
            if check_hash and storage.sha256(url, storage_options) != entry["sha256"]:
                raise ShardError(f"{url}: corrupt shard (sha256 differs from {index_url})")
            try:
                keys = _sample_keys(url, storage_options)
            except (tarfile.TarError, EOFError, ValueError) as exc:
                raise ShardError(f"{url}: corrupt shard (not a readable tar: {exc})") from exc
            if len(keys) != entry["samples"]:
                raise ShardError(f"{url}: {len(keys)} samples, index says {entry['samples']} ({split})")
    return index


def _sample_keys(path: Path | str, storage_options: dict | None = None) -> list[str]:
    keys: list[str] = []
    for name, _ in _members(str(path), storage_options):
        key = name.split(".", 1)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def shard_paths(root: str | Path, split: str, storage_options: dict | None = None) -> list[str]:
    """The shards of `split` under `root`, in index order: paths, or URLs for a folder URL (see
    `pipelines.storage.shard_urls`)."""
    if _is_url(root):
        from pipelines.storage import shard_urls

        return shard_urls(str(root), split, storage_options)
    root = Path(root)
    index = json.loads((root / INDEX_NAME).read_text())
    return [str(root / n) for n in index_shard_names(index, split, root / INDEX_NAME)]


def _is_url(path) -> bool:
    """`scheme://...` or `pipe:...` (the same test as `pipelines.storage.is_url`, without importing it)."""
    s = str(path)
    return s.startswith("pipe:") or "://" in s


_REF = re.compile(r"^ref(\d+)\.png$")
_MASK = re.compile(r"^refmask(\d+)\.png$")


def decode_sample(raw: dict, references: bool = True, masks: bool = True) -> dict:
    """Raw webdataset sample (bytes per extension) → arrays.

    Returns {"key", "meta", "gt" (H, W, 3) uint8, "refs" [K × (H, W, 3)], "masks" [K × (H, W) or None],
    "gt_emb" (D,), "ref_emb" (K, D)}. Masks stay single-channel (decoded before any RGB conversion).
    A reader that does not use them can leave them encoded: `references=False` gives empty `refs` and
    `masks` lists (meta["ref_count"] and `ref_emb` still count the references), `masks=False` gives no mask
    (None) for each reference. The embedded default's samples hold 5.4 references and masks on average:
    1.8 ms of decoding per sample, 1.35 ms without the masks, 0.35 ms without either.
    """
    meta = json.loads(raw["meta.json"])
    k = meta["ref_count"] if references else 0
    refs, ref_masks = [None] * k, [None] * k
    for name, value in raw.items():
        if not references:
            break
        if m := _REF.match(name):
            refs[int(m.group(1))] = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
        elif masks and (m := _MASK.match(name)):
            ref_masks[int(m.group(1))] = np.asarray(Image.open(io.BytesIO(value)))  # mode L: (H, W)
    if any(r is None for r in refs):
        raise ShardError(f"sample {raw.get('__key__')}: meta says {k} references, some are missing")
    return {
        "key": raw["__key__"],
        "meta": meta,
        "gt": np.asarray(Image.open(io.BytesIO(raw["gt.png"])).convert("RGB")),
        "refs": refs,
        "masks": ref_masks,
        "gt_emb": np.load(io.BytesIO(raw["gt_emb.npy"])),
        "ref_emb": np.load(io.BytesIO(raw["ref_emb.npy"])),
    }


def ustar_entries(data: bytes) -> Iterator[tuple[str, int, int]]:
    """(name, header offset, data size) of the regular files of a plain USTAR archive held in memory.

    Our shards are plain USTAR (no long names, no pax headers), so a direct header walk is several
    times faster than `tarfile`. Anything else raises `_NotPlain` and the caller falls back to tarfile.
    """
    pos, n = 0, len(data)
    while pos + 512 <= n:
        header = data[pos : pos + 512]
        if header == _ZERO_BLOCK:
            return
        name, size = _parse_header(header, pos)
        if pos + 512 + size > n:
            raise ShardError(f"member {name} runs past the end of the archive (truncated)")
        yield name, pos, size
        pos += 512 + (size + 511) // 512 * 512
    raise ShardError("archive ends without its end-of-archive blocks (truncated)")


_ZERO_BLOCK = b"\0" * 512


def _parse_header(header: bytes, pos: int) -> tuple[str, int]:
    """(member name, data size) of a plain USTAR regular-file header; `_NotPlain` for anything else."""
    if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0"):
        raise _NotPlain
    chksum = int(header[148:156].rstrip(b" \0") or b"0", 8)
    if chksum != sum(header[:148]) + 256 + sum(header[156:]):
        raise ShardError(f"tar header checksum mismatch at byte {pos}")
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode()
    size = int(header[124:136].rstrip(b" \0") or b"0", 8)
    return (f"{prefix}/{name}" if prefix else name), size


def ustar_walk(f) -> Iterator[tuple[str, int, int]]:
    """`ustar_entries` over a file read by range (ours): `f` has `read(n)`, forward `seek(pos)` and
    `size` (None where unknown, as for a pipe). Reads the 512-byte headers and skips the data, so a
    remote shard's walk never holds the shard in memory (see `pipelines.storage.open_stream`)."""
    pos, n = 0, f.size
    if n == 0:
        raise ShardError("empty object (0 bytes; a folder?): not a shard")
    while True:
        f.seek(pos)
        header = f.read(512)
        if len(header) < 512:
            raise ShardError("archive ends without its end-of-archive blocks (truncated)")
        if header == _ZERO_BLOCK:
            return
        name, size = _parse_header(header, pos)
        if n is not None and pos + 512 + size > n:
            raise ShardError(f"member {name} runs past the end of the archive (truncated)")
        yield name, pos, size
        pos += 512 + (size + 511) // 512 * 512


def _ustar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a plain USTAR archive (see `ustar_entries`)."""
    for name, pos, size in ustar_entries(data):
        yield name, data[pos + 512 : pos + 512 + size]


class _NotPlain(Exception):
    pass


def _members(path: str, storage_options: dict | None = None) -> Iterator[tuple[str, bytes]]:
    if _is_url(path):
        from pipelines.storage import read_all

        data = read_all(path, storage_options)
    else:
        data = Path(path).read_bytes()
    try:
        yield from _ustar_members(data)
    except _NotPlain:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    yield m.name, tf.extractfile(m).read()


def iter_raw(paths: list[str], storage_options: dict | None = None) -> Iterator[dict]:
    """Raw samples (extension → bytes) from tar shards (paths or URLs) in order, without webdataset's
    decoders."""
    for path in paths:
        sample: dict = {}
        try:
            for name, value in _members(path, storage_options):
                key, ext = name.split(".", 1)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext] = value
        except ShardReadError:
            raise
        except (tarfile.TarError, OSError, EOFError, ShardError, ValueError) as exc:
            raise ShardError(f"{path}: corrupt shard ({exc})") from exc
        if sample:
            yield sample


def iter_samples(root: str | Path, split: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Decoded samples of a split, in shard order (`root` a folder or a folder URL)."""
    for raw in iter_raw(shard_paths(root, split, storage_options), storage_options):
        yield decode_sample(raw)
