"""Synthetic rendering rate: images per second on one core at 128 px (target >= 100).

    python benchmarks/bench_synthetic.py [--n 300]

Measures `render` alone (one process, one thread) and with PNG encoding, at the default render size,
for a mix of identities and states. Prints one line per configuration.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipelines.images import png_bytes  # noqa: E402
from pipelines.synthetic import conflict_mask, face_spec, render  # noqa: E402


def rate(fn, items) -> float:
    fn(items[0])  # warm-up
    t = time.perf_counter()
    for it in items:
        fn(it)
    return len(items) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args()
    specs = [face_spec(7, "album", i // 5, i % 5) for i in range(args.n)]
    r128 = rate(lambda s: render(s, 128, 128), specs)
    r64 = rate(lambda s: render(s, 128, 64), specs)
    rpng = rate(lambda s: png_bytes(render(s, 128, 64)), specs)
    pairs = list(zip(specs[:-1], specs[1:]))[: args.n // 2]
    rmask = rate(lambda st: conflict_mask(st[0], st[1], 64), pairs)
    print(f"render 128 px (no downsample):        {r128:7.1f} images/s/core (target >= 100)")
    print(f"render 128 px -> 64 px (the default): {r64:7.1f} images/s/core")
    print(f"render + PNG encode at 64 px:         {rpng:7.1f} images/s/core")
    print(f"conflict mask at 64 px:               {rmask:7.1f} masks/s/core")


if __name__ == "__main__":
    main()
