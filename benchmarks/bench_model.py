"""IConFace model figures: forward+backward time and peak memory per sample (tiny config, CPU) with
0/1/2/3 references; 12-step sampling time; trainable vs frozen parameters for tiny and klein-4B.

    python benchmarks/bench_model.py [--batch 4] [--size 64]

Peak memory is the process RSS high-water mark above the pre-step baseline, sampled every millisecond
by a thread (CPU torch allocations bypass Python's tracemalloc); read it as an estimate.
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from models.codecs import PixelCodec
from models.iconface import Conditioning, IConFace, IConFaceConfig, build_backbone
from models.lora import add_lora
from models.sampler import sample


class PeakRSS:
    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tr = build_backbone("tiny")
    add_lora(tr, 16)
    model = IConFace(tr, IConFaceConfig())
    codec = PixelCodec(4)
    side = args.size // codec.factor
    b, c = args.batch, codec.channels
    print(f"tiny config, {args.size} px ({side}x{side} tokens per image), batch {b}, 2 threads")
    for r in range(4):
        cond = Conditioning(
            torch.randn(b, c, side, side),
            torch.randn(b, r, c, side, side),
            torch.ones(b, r, dtype=torch.bool),
            torch.randn(b, r, 512),
            torch.randn(b, 512),
            torch.randn(b, 8, 96),
        )

        def step(cond=cond):
            out = model(torch.randn(b, c, side, side), torch.rand(b), cond)
            out.square().mean().backward()

        step()
        with PeakRSS() as mem:
            t = time.perf_counter()
            for _ in range(args.repeats):
                step()
            dt = (time.perf_counter() - t) / args.repeats
        print(
            f"  {r} refs: forward+backward {dt / b * 1000:7.1f} ms/sample, peak +{mem.mib / b:6.1f} MiB/sample"
        )
    cond = Conditioning(
        torch.randn(1, c, side, side),
        torch.randn(1, 3, c, side, side),
        torch.ones(1, 3, dtype=torch.bool),
        torch.randn(1, 3, 512),
        torch.randn(1, 512),
        torch.randn(1, 8, 96),
    )
    t = time.perf_counter()
    sample(model, cond, torch.zeros(1, 8, 96), (1, c, side, side), steps=12, guidance=4.0)
    print(
        f"sampling 12 steps with guidance 4.0 (24 forwards), 3 refs, one image: {time.perf_counter() - t:.2f} s"
    )
    for name in ("tiny", "klein_base_4b"):
        with torch.device("meta"):
            tr = build_backbone(name)
            add_lora(tr, 16)
            m = IConFace(tr, IConFaceConfig())
        train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
        lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
        print(
            f"{name:14s} trainable {train:>13,} (LoRA {lora:,}, pathways {train - lora:,}), frozen {frozen:>13,}"
        )


if __name__ == "__main__":
    main()
