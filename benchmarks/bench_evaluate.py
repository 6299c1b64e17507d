"""What the evaluate stage no longer computes: SSIM's Gaussian filter as two 1-D passes against the 11x11
2-D window (the baseline, in the same process), and the restorations taken from the blind mode because
the reference gate shuts every input of a chunk.

    python benchmarks/bench_evaluate.py [--repeat 3]

The SSIM part runs anywhere (random images of the evaluation's shape). The chunk count reads the
default's evaluation sets and the evaluated bundle's gate (`dvc repro evaluate`: data/eval_sets and
data/evaluate/bundle); without them it says so and stops there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages  # noqa: E402,F401  (the CPU pins, before numpy and torch load)


def ssim_2d(a, b):
    """The baseline: the same SSIM with the 2-D window in one convolution (the stage's earlier code)."""
    import torch
    import torch.nn.functional as F

    from pipelines.evaluation import _gauss

    x = torch.from_numpy(a).permute(0, 3, 1, 2).double().flatten(0, 1).unsqueeze(1)
    y = torch.from_numpy(b).permute(0, 3, 1, 2).double().flatten(0, 1).unsqueeze(1)
    g = _gauss()
    w = (g[:, None] * g[None, :]).view(1, 1, len(g), len(g))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).view(len(a), 3).mean(1).numpy()


def bench_ssim(repeat: int, n: int = 128, size: int = 64) -> None:
    import numpy as np

    from pipelines.evaluation import ssim_u8

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    times = {"2-D window": [], "separable": []}
    for _ in range(repeat):
        for name, fn in (("2-D window", ssim_2d), ("separable", ssim_u8)):
            t = time.perf_counter()
            out = fn(a, b)
            times[name].append(time.perf_counter() - t)
            if name == "2-D window":
                base = out
    diff = float(np.abs(ssim_u8(a, b) - base).max())
    t0, t1 = (min(v) for v in times.values())
    print(
        f"SSIM of {n} images of {size} px: 2-D window {t0:.3f} s, separable {t1:.3f} s ({t1 / t0:.2f}x); max |diff| {diff:.1e}"
    )


def count_chunks() -> None:
    from pipelines.reference_gate import ReferenceGate
    from pipelines.set_evaluation import load_set
    from stages._common import load_params

    sets, bundle = ROOT / "data/eval_sets", ROOT / "data/evaluate/bundle/bundle.json"
    if not (sets / "index.json").is_file() or not bundle.is_file():
        print(f"chunks: {sets} or {bundle} missing (dvc repro evaluate); not counted")
        return
    cfg = load_params(ROOT / "params.yaml", "evaluate")["evaluate"]
    g = json.loads(bundle.read_text()).get("reference_gate")
    if not g:
        print("chunks: the bundle has no reference gate; nothing is taken from the blind mode")
        return
    gate = ReferenceGate.from_dict(g)
    modes = [k for k in cfg.modes if k > 0]
    index = json.loads((sets / "index.json").read_text())
    total = saved = 0
    for name in sorted(index["splits"]):
        samples, _ = load_set(str(sets), name, cfg.samples, max(max(cfg.modes), 1))
        shut = gate.alpha([s["lq"] for s in samples]) == 0.0
        chunks = [shut[i : i + cfg.batch_size] for i in range(0, len(shut), cfg.batch_size)]
        full = sum(bool(c.all()) for c in chunks)
        print(
            f"{name}: {int(shut.sum())} of {len(shut)} inputs shut; {full} of {len(chunks)} chunks entirely "
            f"shut, taken from the blind mode in each of the {len(modes)} reference modes"
        )
        total += len(chunks) * len(modes)
        saved += full * len(modes)
    print(f"chunks: {saved} of the reference modes' {total} chunk restorations taken from the blind mode")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    bench_ssim(args.repeat)
    count_chunks()


if __name__ == "__main__":
    main()
