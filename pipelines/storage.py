"""Shard bytes from URLs: fsspec filesystems (`s3://`, `gs://`, ...) and webdataset's `pipe:CMD` (ours).

Local paths never come here: `pipelines.shards` and `pipelines.stream` read them as before and import
this module only for a URL. Everything is read by byte range, as from a local file:

- fsspec URLs: `read_range` is one ranged GET (`fs.cat_file(path, start=, end=)`); `open_stream` opens
  the object with a small read-ahead block (`HEADER_BLOCK`), so a header walk fetches the headers and
  the bytes near them, never the whole shard into memory.
- `pipe:CMD` (webdataset's convention): the stdout of `CMD`, run by the shell. A pipe cannot seek, so
  a range read starts the command and reads and discards everything before the offset: correct but
  slower (each chunk streams its shard's prefix); meant for small data sets and for commands such as
  `pipe:curl -s URL` or `pipe:aws s3 cp s3://... -`.

Credentials and endpoints come from the environment or fsspec's configuration (for S3:
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE, or
FSSPEC_S3_* variables) or from `storage_options` (fsspec's keyword arguments, for example
`{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}`), never from files in git.
Errors are `ShardError`s that name the URL and what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from pipelines.shard_index import INDEX_NAME, ShardError, ShardReadError, index_shard_names

HEADER_BLOCK = 1 << 16  # read-ahead of a header walk: headers of small members come in one request
PIPE_PREFIX = "pipe:"


def is_url(path) -> bool:
    """True for `scheme://...` and `pipe:...`; plain paths (the default) stay on the local fast path."""
    s = str(path)
    return s.startswith(PIPE_PREFIX) or "://" in s


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


@contextlib.contextmanager
def _errors(url: str, what: str = "read") -> Iterator[None]:
    """Turn a filesystem's exception into a `ShardError` that names the URL and the cause."""
    try:
        yield
    except ShardError:
        raise
    except FileNotFoundError as exc:
        raise ShardReadError(f"{url}: not found ({exc}): check the bucket and the key") from exc
    except PermissionError as exc:
        raise ShardReadError(
            f"{url}: access denied ({exc}): check the credentials (AWS_* variables, fsspec config or "
            "storage_options)"
        ) from exc
    except Exception as exc:  # botocore's and aiohttp's own errors are not all OSErrors
        raise ShardReadError(f"{url}: cannot {what} ({type(exc).__name__}: {exc})") from exc


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for `url`; an unknown scheme or missing driver names both."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise ShardReadError(
            f"{url}: no filesystem for this URL ({exc}); s3:// needs s3fs, gs:// gcsfs, az:// adlfs"
        ) from exc


# ==================================================================================================
# pipe: URLs
# ==================================================================================================


class PipeReader:
    """The stdout of a `pipe:CMD` URL as a forward-only file: `seek` ahead reads and discards."""

    def __init__(self, url: str):
        self.url, self.pos, self.size = url, 0, None
        self._err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty stderr cannot block stdout
        self.proc = subprocess.Popen(
            url[len(PIPE_PREFIX) :], shell=True, stdout=subprocess.PIPE, stderr=self._err
        )

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        self.pos += len(data)
        if len(data) < n:
            self._check_exit()
        return data

    def seek(self, pos: int) -> None:
        if pos < self.pos:
            raise ShardError(f"{self.url}: a pipe cannot seek backwards (at byte {self.pos}, asked {pos})")
        while self.pos < pos:
            if not self.read(min(pos - self.pos, 1 << 20)):
                break

    def _check_exit(self) -> None:
        """At end of output: a failed command is an error naming it and its stderr."""
        code = self.proc.wait()
        if code != 0:
            self._err.seek(0)
            err = self._err.read().decode(errors="replace").strip()[-500:]
            raise ShardReadError(f"{self.url}: command exited with status {code}: {err or '(no stderr)'}")

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:  # stopped early (a range read): the command is not needed any more
            self.proc.kill()
        self.proc.wait()
        self._err.close()

    def __enter__(self) -> PipeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ==================================================================================================
# Reads
# ==================================================================================================


@contextlib.contextmanager
def open_stream(url: str, storage_options: dict | None = None) -> Iterator:
    """A readable, forward-seekable file for a header walk: `read(n)`, `seek(pos)` and `size` (the byte
    size, None for a pipe). An fsspec object is read through a `HEADER_BLOCK` read-ahead buffer."""
    if url.startswith(PIPE_PREFIX):
        with PipeReader(url) as f:
            yield f
        return
    fs, path = filesystem(url, storage_options)
    with _errors(url, "open"):
        f = fs.open(path, "rb", block_size=HEADER_BLOCK, cache_type="readahead")
    with f:
        yield _Guarded(f, url)


class _Guarded:
    """An fsspec file whose read errors name the URL."""

    def __init__(self, f, url: str):
        self.f, self.url, self.size = f, url, f.size

    def read(self, n: int) -> bytes:
        with _errors(self.url):
            return self.f.read(n)

    def seek(self, pos: int) -> None:
        with _errors(self.url):
            self.f.seek(pos)


def read_range(url: str, offset: int, length: int, storage_options: dict | None = None) -> bytes:
    """Bytes [offset, offset + length) of the object at `url` (one ranged request; a pipe streams)."""
    if url.startswith(PIPE_PREFIX):
        with PipeReader(url) as f:
            f.seek(offset)
            data = f.read(length)
    else:
        fs, path = filesystem(url, storage_options)
        with _errors(url):
            data = fs.cat_file(path, start=offset, end=offset + length)
    if len(data) != length:
        raise ShardError(f"{url}: {len(data)} bytes at {offset}, expected {length} (truncated or changed?)")
    return data


def read_all(url: str, storage_options: dict | None = None) -> bytes:
    """The whole object (a shard decoded sample by sample, as a local shard is read whole)."""
    if url.startswith(PIPE_PREFIX):
        with PipeReader(url) as f:
            out = []
            while chunk := f.read(1 << 20):
                out.append(chunk)
            return b"".join(out)
    fs, path = filesystem(url, storage_options)
    with _errors(url):
        return fs.cat_file(path)


def sha256(url: str, storage_options: dict | None = None) -> str:
    """sha256 of the object, streamed in 1 MiB pieces."""
    h = hashlib.sha256()
    if url.startswith(PIPE_PREFIX):
        with PipeReader(url) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    fs, path = filesystem(url, storage_options)
    with _errors(url), fs.open(path, "rb", block_size=1 << 20) as f:
        shutil.copyfileobj(f, _Hasher(h), 1 << 20)
    return h.hexdigest()


class _Hasher:
    def __init__(self, h):
        self.h = h

    def write(self, b: bytes) -> None:
        self.h.update(b)


def exists(url: str, storage_options: dict | None = None) -> bool:
    if url.startswith(PIPE_PREFIX):
        return True  # a command: only running it tells
    fs, path = filesystem(url, storage_options)
    with _errors(url, "check"):
        return fs.isfile(path)


# ==================================================================================================
# Listing
# ==================================================================================================


def read_index(root: str, storage_options: dict | None = None) -> dict | None:
    """The shard index at `root/index.json`, or None where there is none."""
    url = join(root, INDEX_NAME)
    if not exists(url, storage_options):
        return None
    try:
        return json.loads(read_all(url, storage_options))
    except ValueError as exc:
        raise ShardError(f"{url}: not a JSON shard index ({exc})") from exc


def shard_urls(root: str, split: str, storage_options: dict | None = None) -> list[str]:
    """Shard URLs of `split` under the folder URL `root`, in order.

    As for a local folder, the index (`index.json`) lists them; without an index (shards copied up
    alone), the objects `root/<split>-*.tar`, sorted by name.
    """
    if root.startswith(PIPE_PREFIX):
        raise ShardError(f"{root}: a pipe: URL is one shard, not a folder; pass a list of shard URLs")
    if (index := read_index(root, storage_options)) is not None:
        return [join(root, n) for n in index_shard_names(index, split, join(root, INDEX_NAME))]
    fs, path = filesystem(root, storage_options)
    with _errors(root, "list"):
        if not fs.exists(path):
            raise ShardReadError(f"{root}: not found (no such bucket, or nothing under this prefix)")
        found = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(join(path, f"{split}-*.tar")))
    if not found:
        raise ShardError(f"{root}: no shards found (no {INDEX_NAME} and no {split}-*.tar objects)")
    return [join(root, n) for n in found]
