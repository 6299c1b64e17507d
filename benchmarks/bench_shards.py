"""Shard read throughput against reading the same images as loose PNG files (same process).

    python benchmarks/bench_shards.py [--samples 400] [--refs 3]

Writes N samples (target + K references, 64 px) both as webdataset shards and as loose PNG files,
then reads and decodes each way with a cold-ish page cache order (shards first, then files, then
again in the other order) and prints samples/s and the ratio shards / loose files.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.images import png_bytes
from pipelines.shards import iter_raw, npy_bytes, write_split
from pipelines.synthetic import face_spec, render


def decode_png(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--refs", type=int, default=3)
    args = p.parse_args()
    imgs = [png_bytes(render(face_spec(7, "album", i, 0), 128, 64)) for i in range(64)]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        loose = root / "loose"
        loose.mkdir()

        def samples():
            for i in range(args.samples):
                s = {"__key__": f"s{i:06d}", "gt.png": imgs[i % 64]}
                for k in range(args.refs):
                    s[f"ref{k}.png"] = imgs[(i + k + 1) % 64]
                s["meta.json"] = b"{}"
                s["gt_emb.npy"] = npy_bytes(np.zeros(512, np.float32))
                yield s

        entries = write_split(root / "shards", "train", samples(), 128)
        paths = [str(root / "shards" / e["name"]) for e in entries]
        for s in samples():
            for k, v in s.items():
                if k != "__key__":
                    (loose / f"{s['__key__']}.{k}").write_bytes(v)
        files = sorted(loose.iterdir())

        def read_shards(decode: bool = True) -> int:
            n = 0
            for raw in iter_raw(paths):
                for k, v in raw.items():
                    if decode and k.endswith(".png"):
                        decode_png(v)
                n += 1
            return n

        def read_loose(decode: bool = True) -> int:
            n = 0
            for f in files:
                b = f.read_bytes()
                if decode and f.suffix == ".png":
                    decode_png(b)
                if f.name.endswith(".gt.png"):
                    n += 1
            return n

        def timed(fn):
            t = time.perf_counter()
            n = fn()
            return n / (time.perf_counter() - t)

        rs = [timed(read_shards), timed(read_loose), timed(read_loose), timed(read_shards)]
        shards, loose_rate = (rs[0] + rs[3]) / 2, (rs[1] + rs[2]) / 2
        print(f"shards:      {shards:8.1f} samples/s ({args.refs} refs, 64 px, decode included)")
        print(f"loose files: {loose_rate:8.1f} samples/s")
        print(f"ratio shards / loose: {shards / loose_rate:.2f}x (decode included)")
        rs = [timed(lambda: read_shards(False)), timed(lambda: read_loose(False))]
        rs += [timed(lambda: read_loose(False)), timed(lambda: read_shards(False))]
        shards, loose_rate = (rs[0] + rs[3]) / 2, (rs[1] + rs[2]) / 2
        print(
            f"bytes only: shards {shards:8.1f} samples/s, loose {loose_rate:8.1f} samples/s, ratio {shards / loose_rate:.2f}x"
        )


if __name__ == "__main__":
    main()
