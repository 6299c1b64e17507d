"""How much PSNR can a small network gain on the frozen severe set within a CPU budget? A probe that
bounds the learning issue: a plain residual CNN (no references, no diffusion) trained by L2 on the
same train shards and the same online degradation preset as `train`, then scored on the frozen
evaluation sets against the degraded input (paired, 95 % bootstrap interval).

    python benchmarks/probe_restoration_ceiling.py [--minutes 6] [--preset iconface_mixed]

Reads data/shards and data/eval_sets (run `dvc repro eval_sets` first). Prints one line per set.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from pipelines.degradations import get_preset
from pipelines.evaluation import psnr_u8
from pipelines.shards import decode_sample, iter_raw, iter_samples, shard_paths
from pipelines.stats import paired_bootstrap


class ResCNN(nn.Module):
    """x + f(x): a few 3x3 convolutions at full and half resolution."""

    def __init__(self, w: int = 48):
        super().__init__()
        act = nn.SiLU()
        self.inp = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), act)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), act)
        self.mid = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(2 * w, 2 * w, 3, padding=1), act)])
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * w, w, 3, padding=1), act
        )
        self.out = nn.Conv2d(2 * w, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        a = self.inp(x)
        b = self.up(self.mid(self.down(a)))
        return x + self.out(torch.cat([a, b], 1))


def unit(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1


def u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--preset", default="iconface_mixed")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    gts = [s["gt"] for s in iter_samples("data/shards", "train")]
    preset, rng = get_preset(args.preset), np.random.default_rng(0)
    net = ResCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.minutes * 60:
        idx = rng.integers(0, len(gts), args.batch)
        pairs = [(preset(gts[i], rng)[0], gts[i]) for i in idx]
        x, y = unit(np.stack([a for a, _ in pairs])), unit(np.stack([b for _, b in pairs]))
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    print(f"probe: {step} steps of batch {args.batch} in {time.perf_counter() - t0:.0f} s on {args.preset}")
    net.eval()
    for name in ("moderate", "severe"):
        lq, gt = [], []
        for raw in iter_raw(shard_paths("data/eval_sets", name)):
            lq.append(np.asarray(Image.open(io.BytesIO(raw["lq.png"])).convert("RGB")))
            gt.append(decode_sample(raw)["gt"])
        lq, gt = np.stack(lq), np.stack(gt)
        with torch.no_grad():
            out = u8(net(unit(lq)))
        a, b = psnr_u8(out, gt), psnr_u8(lq, gt)
        d = paired_bootstrap(a, b)
        print(
            f"{name}: {len(gt)} targets, degraded {b.mean():.2f} dB -> CNN {a.mean():.2f} dB, {d.text(3)} ({d.verdict})"
        )


if __name__ == "__main__":
    main()
