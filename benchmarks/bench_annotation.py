"""Annotation and mask-model speed: the brush codec (our decoder against the SDK's bare RLE decoder in the
same process), the simulated annotator, and the RefSel U-Net's training and prediction throughput.

    python benchmarks/bench_annotation.py [--n 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from label_studio_sdk.converter.brush import decode_rle

from annotation.labeling import mask_to_result, result_to_mask
from annotation.simulated import AnnotatorNoise, annotator_rng, simulate
from models.refsel import RefSelConfig, RefSelUNet, mask_to_target, ohem_cross_entropy
from pipelines.synthetic import conflict_mask, face_spec


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for size in (64, 512):
        truth = conflict_mask(face_spec(1, "album", 0, 0), face_spec(1, "album", 0, 1), size)
        res = mask_to_result(truth, "k")
        enc = timed(lambda truth=truth: mask_to_result(truth, "k"), a.n)
        dec = timed(lambda res=res, size=size: result_to_mask(res, size, size, "k"), a.n)
        # The SDK's bare RLE decoder on the same regions: what our validation and contract mapping add.
        sdk = timed(lambda res=res: [decode_rle(r["value"]["rle"]) for r in res], a.n)
        sim = timed(
            lambda truth=truth: simulate(truth, annotator_rng(0, "a", "k"), AnnotatorNoise()),
            max(a.n // 5, 3),
        )
        print(
            f"{size}px mask: encode {enc * 1e3:.2f} ms, decode {dec * 1e3:.2f} ms (of which the SDK's bare decode_rle "
            f"{sdk * 1e3:.2f} ms, {sdk / dec:.0%}), simulated annotator {sim * 1e3:.1f} ms"
        )
    for size, widths, batch in ((64, (16, 32, 64, 128), 32), (512, (16, 32, 64, 128), 2)):
        net = RefSelUNet(RefSelConfig(widths=widths))
        opt = torch.optim.AdamW(net.parameters(), 1e-3, betas=(0.5, 0.999))
        x = torch.randn(batch, 3, size, size)
        t = mask_to_target(torch.randint(0, 2, (batch, size, size), dtype=torch.uint8))

        def step(net=net, opt=opt, x=x, t=t):
            loss = ohem_cross_entropy(net(x, x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()
        tr = timed(step, 3)
        with torch.no_grad():
            net.eval()
            net(x, x)
            pr = timed(lambda net=net, x=x: net(x, x), 3)
        params = sum(p.numel() for p in net.parameters())
        print(
            f"RefSel U-Net {size}px ({params / 1e6:.2f} M params, batch {batch}, {a.threads} threads): "
            f"train {batch / tr:.1f} pairs/s, predict {batch / pr:.1f} pairs/s"
        )


if __name__ == "__main__":
    main()
