"""The shard index and the shard errors, shared by the local reader (pipelines.shards) and the
object-storage reader (pipelines.storage) without either importing the other."""

from __future__ import annotations

from pathlib import Path

INDEX_NAME = "index.json"
FORMAT_VERSION = 1


class ShardError(ValueError):
    """A shard is missing, corrupt or disagrees with the index."""


class ShardReadError(ShardError):
    """A shard location could not be read (missing bucket or key, no access, a failed pipe command):
    raised by `pipelines.storage` with the URL and the cause; never re-labelled as a corrupt shard."""


def index_shard_names(index: dict, split: str, where: str | Path) -> list[str]:
    """Shard file names of `split` in a shard index read from `where` (named in the error)."""
    if split not in index["splits"]:
        raise ShardError(f"{where}: no split {split!r}; have {sorted(index['splits'])}")
    return [e["name"] for e in index["splits"][split]["shards"]]
