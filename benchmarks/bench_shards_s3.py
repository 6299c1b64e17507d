"""Shard reads from local disk against the same shards through `s3://` (moto's server on 127.0.0.1) and
`pipe:cat` (same process).

    python benchmarks/bench_shards_s3.py [--samples 256] [--size 128] [--batch 8]

Writes N samples (target + 3 references + 3 masks, SIZE px PNGs) as shards, uploads them to a local
S3-compatible server (moto, in this process) and prints, for each location kind: the epoch plan (the
header walk of `sample_ranges` over every shard), the chunk reads of one epoch (one ranged read per
chunk, what each Ray task does) in MB/s and samples/s, and the ratio to local. moto is a Python server
sharing this machine's cores, so the s3 figures measure the client path and a slow server, not a real
object store's bandwidth; they show the per-request cost that chunking amortises.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines import storage
from pipelines.images import png_bytes
from pipelines.shards import npy_bytes, write_split
from pipelines.stream import plan_chunks
from pipelines.synthetic import conflict_mask, face_spec, render


def samples(n: int, size: int):
    imgs = [png_bytes(render(face_spec(7, "album", i, 0), 2 * size, size)) for i in range(32)]
    mask = png_bytes(conflict_mask(face_spec(7, "album", 0, 0), face_spec(7, "album", 0, 1), size))
    for i in range(n):
        s = {"__key__": f"s{i:06d}", "gt.png": imgs[i % 32]}
        for k in range(3):
            s[f"ref{k}.png"] = imgs[(i + k + 1) % 32]
            s[f"refmask{k}.png"] = mask
        s["meta.json"] = b'{"ref_count": 3}'
        s["gt_emb.npy"] = npy_bytes(np.zeros(512, np.float32))
        s["ref_emb.npy"] = npy_bytes(np.zeros((3, 512), np.float32))
        yield s


def read_local(c) -> bytes:
    with open(c.shard, "rb") as f:
        f.seek(c.offset)
        return f.read(c.length)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        with tempfile.TemporaryDirectory() as d:
            entries = write_split(Path(d), "train", samples(args.samples, args.size), 64)
            local = [str(Path(d) / e["name"]) for e in entries]
            fs, _ = storage.filesystem("s3://bench", opts)
            fs.mkdir("bench")
            for path in local:
                fs.pipe_file(f"bench/shards/{Path(path).name}", Path(path).read_bytes())
            total = sum(e["bytes"] for e in entries)
            kinds = {
                "local": local,
                "s3": [f"s3://bench/shards/{Path(x).name}" for x in local],
                "pipe": [f"pipe:cat {x}" for x in local],
            }
            print(
                f"{args.samples} samples, {len(local)} shards, {total / 1e6:.1f} MB, "
                f"{args.size} px, chunks of {args.batch}"
            )
            base = None
            for kind, paths in kinds.items():
                t = time.perf_counter()
                chunks = plan_chunks(paths, args.batch, opts)
                plan_s = time.perf_counter() - t
                t = time.perf_counter()
                n = 0
                for c in chunks:
                    data = (
                        read_local(c)
                        if kind == "local"
                        else storage.read_range(c.shard, c.offset, c.length, opts)
                    )
                    n += len(data)
                read_s = time.perf_counter() - t
                rate = args.samples / read_s
                base = base or rate
                print(
                    f"{kind:5s}: plan {plan_s * 1e3:7.1f} ms ({len(chunks)} chunks); chunk reads "
                    f"{n / read_s / 1e6:8.1f} MB/s, {rate:9.1f} samples/s, {read_s / len(chunks) * 1e3:6.2f} ms "
                    f"a chunk; {rate / base:.3f}x local"
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
