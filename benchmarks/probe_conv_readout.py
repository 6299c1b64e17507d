"""Lever probe for the learning issue: the default `train` config through the one training entry point
(`pipelines.fit.fit`), with or without a local convolutional branch that adds a residual computed from
the degraded image alone to the network's ẑ0 (x0_residual: ẑ0 = z_deg + f(·) + g(deg)). Scored on the
frozen evaluation sets exactly as `evaluate` samples (8 steps, seed 42, batches of 16, the first
targets with 3 references), paired against the committed model's per-target values
(`data/evaluate/per_target.json`) and against the degraded input.

    python benchmarks/probe_conv_readout.py [--steps 400] [--conv/--no-conv]

Reads data/shards, data/encoders, data/eval_sets and data/evaluate/per_target.json (`dvc repro`
first). Nothing it trains is saved; nothing in the pipeline uses the branch (a measurement, not a
feature).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch.nn as nn
import yaml

ROOT = Path(__file__).resolve().parents[1]


class LocalBranch(nn.Module):
    """g(deg): a few 3x3 convolutions on the degraded image, zero-initialised output."""

    def __init__(self, w: int = 32):
        super().__init__()
        act = nn.SiLU()
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), act, nn.Conv2d(w, w, 3, padding=1), act,
            nn.Conv2d(w, w, 3, padding=1), act,
        )  # fmt: skip
        self.out = nn.Conv2d(w, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, img):
        return self.out(self.body(img))


class WithBranch(nn.Module):
    """The IConFace network plus g(deg) in latent space (the pixel codec is linear and lossless)."""

    def __init__(self, net, codec):
        super().__init__()
        self.inner, self.codec, self.branch = net, codec, LocalBranch()
        self.cfg = net.cfg

    def forward(self, z, sigma, cond):
        return self.inner(z, sigma, cond) + self.codec.encode(self.branch(self.codec.decode(cond.deg)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--conv", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()

    import pipelines.fit as fitmod
    from pipelines.config import load_sections
    from pipelines.embedding import load_encoders
    from pipelines.evaluation import cosine, embed, psnr_u8
    from pipelines.stats import paired_bootstrap
    from pipelines.training import make_batch, to_uint8, validation_batch
    from stages.evaluate import load_set

    cfgs = load_sections(yaml.safe_load((ROOT / "params.yaml").read_text()))
    cfg, dcfg, ecfg, ev = cfgs["train"], cfgs["degrade"], cfgs["embed"], cfgs["evaluate"]
    encoders = load_encoders(ecfg, "data/encoders")
    if args.conv:
        real = fitmod.build_network

        def build(c, dim):
            net, codec, text = real(c, dim)
            return WithBranch(net, codec), codec, text

        fitmod.build_network = build
    val = validation_batch("data/shards", cfg, cfg.max_refs)
    r = fitmod.fit(cfg, dcfg, "data/shards", encoders, val, steps=args.steps)
    print(f"probe: conv={args.conv} {args.steps} steps, {r.timing['train_s']} s, val {r.metrics}")
    module = r.module.eval()
    committed = json.loads(Path("data/evaluate/per_target.json").read_text())
    for name in ("moderate", "severe"):
        samples, _ = load_set("data/eval_sets", name, ev.samples, 3)
        assert [s["key"] for s in samples] == committed[name]["keys"], "another set of targets"
        gt = np.stack([s["gt"] for s in samples])
        lq = np.stack([s["lq"] for s in samples])
        g = embed(encoders.evaluator, gt, ecfg.crop_border)
        ids = {}
        for k, row in ((0, "no reference"), (1, "1 reference")):
            outs = []
            for i in range(0, len(samples), ev.batch_size):
                chunk = samples[i : i + ev.batch_size]
                b = make_batch([s["lq"] for s in chunk], [s["refs"][:k] for s in chunk])
                if k:
                    b["z_refs"] = module.identity(b["refs"].flatten(0, 1)).unflatten(0, b["refs"].shape[:2])
                outs.append(to_uint8(module.restore(b, steps=ev.steps, guidance=ev.guidance, seed=ev.seed)))
            out = np.concatenate(outs)
            ps, gid = psnr_u8(out, gt), cosine(embed(encoders.evaluator, out, ecfg.crop_border), g)
            c = committed[name]["rows"][row]
            d_lq = paired_bootstrap(ps, psnr_u8(lq, gt))
            d_ps, d_id = paired_bootstrap(ps, c["psnr"]), paired_bootstrap(gid, c["gt_id"])
            print(
                f"{name} / {row}: PSNR {ps.mean():.2f} dB (vs degraded {d_lq.text(3)}; vs committed model "
                f"{d_ps.text(3)}), GT-ID {gid.mean():.4f} (vs committed {d_id.text()})"
            )
            ids[k] = gid
        d = paired_bootstrap(ids[1], ids[0])
        print(f"{name}: GT-ID 1 reference - blind {d.text()} ({d.verdict})")


if __name__ == "__main__":
    main()
