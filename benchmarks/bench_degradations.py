"""Degradation throughput: every preset at 512² and at the default size, one core; our classic face
recipe against a straightforward BasicSR-style port in the same process; Ray stream scaling.

    python benchmarks/bench_degradations.py [--n 40] [--no-stream]

The reference port below follows BasicSR/GFPGAN's `FFHQDegradationDataset` code path as written
there: float64 kernel on a mesh grid, a full 41×41 `cv2.filter2D`, float64 Gaussian noise,
`cv2.imencode` JPEG, bilinear resizes. It is written here only to be measured against.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.degradations import PRESETS, classic, sample_rng  # noqa: E402
from pipelines.synthetic import face_spec, render  # noqa: E402

cv2.setNumThreads(1)


def basicsr_classic(img_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A direct BasicSR-style port of the GFPGAN degradation (the baseline)."""
    img = img_u8.astype(np.float32) / 255.0
    h, w = img.shape[:2]
    ks = 41
    sigma_x = rng.uniform(0.1, 10)
    if rng.uniform() < 0.5:
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = rng.uniform(0.1, 10), rng.uniform(-math.pi, math.pi)
    d = np.diag([sigma_x**2, sigma_y**2])
    u = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv = np.linalg.inv(u @ d @ u.T)
    ax = np.arange(-ks // 2 + 1.0, ks // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    xy = np.hstack((xx.reshape(ks * ks, 1), yy.reshape(ks * ks, 1))).reshape(ks, ks, 2)
    k = np.exp(-0.5 * np.sum(np.dot(xy, inv) * xy, 2))
    k = k / np.sum(k)
    img = cv2.filter2D(img, -1, k)
    scale = rng.uniform(0.8, 8)
    img = cv2.resize(img, (int(w // scale), int(h // scale)), interpolation=cv2.INTER_LINEAR)
    sigma = rng.uniform(0, 20) / 255.0
    img = np.clip(img + np.float32(rng.standard_normal(img.shape)) * sigma, 0, 1)
    q = int(rng.uniform(60, 100))
    _, enc = cv2.imencode(".jpg", (img * 255.0).round().astype(np.uint8), [int(cv2.IMWRITE_JPEG_QUALITY), q])
    img = cv2.imdecode(enc, 1).astype(np.float32) / 255.0
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def rate(fn, imgs, n) -> float:
    fn(imgs[0], sample_rng(0, "warm", 0))
    t = time.perf_counter()
    for i in range(n):
        fn(imgs[i % len(imgs)], sample_rng(0, f"k{i}", 0))
    return n / (time.perf_counter() - t)


def stream_figures(n_samples: int = 512) -> None:
    import ray

    from pipelines.images import png_bytes
    from pipelines.shards import npy_bytes, write_split
    from pipelines.stream import DegradationStream

    with tempfile.TemporaryDirectory() as d:
        pngs = [png_bytes(render(face_spec(1, "album", i, 0), 128, 64)) for i in range(32)]

        def samples():
            for i in range(n_samples):
                yield {
                    "__key__": f"s{i:05d}",
                    "gt.png": pngs[i % 32],
                    "ref0.png": pngs[(i + 1) % 32],
                    "meta.json": b'{"ref_count": 1}',
                    "gt_emb.npy": npy_bytes(np.zeros(4, np.float32)),
                    "ref_emb.npy": npy_bytes(np.zeros((1, 4), np.float32)),
                }

        paths = [str(Path(d) / e["name"]) for e in write_split(Path(d), "train", samples(), 128)]
        results = {}
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            s = DegradationStream(paths, "realesrgan", 0, batch_size=16, max_in_flight=2 * workers)
            list(s.epoch(99))  # warm the workers
            t = time.perf_counter()
            n = sum(len(b["keys"]) for b in s.epoch(0))
            dt = time.perf_counter() - t
            results[workers] = (n / dt, s.stats["wait_s"] / max(s.stats["batches"], 1))
            ray.shutdown()
        r1, r2 = results[1][0], results[2][0]
        print(
            f"stream realesrgan 64 px: 1 worker {r1:7.1f} samples/s, 2 workers {r2:7.1f} samples/s, "
            f"scaling efficiency {r2 / (2 * r1):.2f}"
        )
        for w, (_, wait) in results.items():
            print(
                f"  consumer wait per batch of 16 (consuming as fast as it can), {w} worker(s): {wait * 1000:.1f} ms"
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--no-stream", action="store_true")
    args = p.parse_args()
    for size in (512, 64):
        imgs = [render(face_spec(1, "album", i, 0), 128, 128) for i in range(4)]
        imgs = [
            cv2.resize(x, (size, size), interpolation=cv2.INTER_CUBIC if size > 128 else cv2.INTER_AREA)
            for x in imgs
        ]
        n = args.n if size == 512 else args.n * 10
        print(f"--- {size}x{size}, one core ---")
        for name, fn in PRESETS.items():
            print(f"{name:16s} {rate(fn, imgs, n):8.1f} images/s")
        ours = rate(
            lambda x, r: classic(x, r, (0.1, 10.0), (0.8, 8.0), (0.0, 20.0), (60, 100), "face_classic"),
            imgs,
            n,
        )
        base = rate(basicsr_classic, imgs, n)
        print(
            f"face_classic: ours {ours:.1f} vs BasicSR-style port {base:.1f} images/s -> {ours / base:.2f}x"
        )
    if not args.no_stream:
        stream_figures()


if __name__ == "__main__":
    main()
