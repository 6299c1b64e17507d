"""Stage `train_front`: the degradation-removal front end of the embedded default (ours).

    python -m stages.train_front --shards data/shards --out data/front \
        --metrics metrics/train_front.json --plot plots/train_front.csv

DiffBIR's stage 1 (Lin et al., ECCV 2024): a restoration network trained by L2 removes the degradation;
the generative model (IConFace, the `train` stage) conditions on its output and adds what only the
references can give. A small residual CNN (models.iconface.FrontEnd) learns the local deblurring and
denoising that a transformer on 8×8-pixel tokens learns slowest. It sees only the degraded image and
its target, never a reference. Batches come from the same Ray degradation stream as `train` (the
`degrade` section: preset, seed), so a rerun reads the same degradations in the same order.

Metrics: PSNR of the degraded input and of the front end on the first `val_samples` val targets of each
`val_presets` (degraded once, seed 42 + index, as `train`'s validation), with a paired 95 % interval.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import torch

from models.pathways import FrontEnd, save_front
from pipelines.batches import to_uint8, to_unit
from pipelines.degradations import get_preset
from pipelines.evaluation import psnr_u8
from pipelines.io import write_bytes, write_json
from pipelines.module import lr_factor
from pipelines.shards import iter_samples, shard_paths
from pipelines.stats import paired_bootstrap
from pipelines.stream import DegradationStream, connect
from stages._common import load_params, parser, progress_enabled, setup_logging


def train_front(cfg, dcfg, shards: str, progress: bool = False) -> tuple[FrontEnd, list[dict]]:
    """Train a FrontEnd for cfg.steps optimiser steps on the degradation stream; (model, loss curve)."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    net = FrontEnd(cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, "cosine", cfg.warmup_steps, cfg.steps)
    )
    connect(dcfg.num_cpus)
    stream = DegradationStream(
        shard_paths(shards, "train"),
        dcfg.preset,
        dcfg.seed,
        cfg.batch_size,
        dcfg.max_in_flight,
        dcfg.shuffle,
        references=False,  # the front end learns from the target alone: its references stay undecoded
    )
    if len(stream) == 0:
        raise SystemExit(f"error: {shards} has no train batch of {cfg.batch_size} samples")
    curve, window, step, epoch = [], [], 0, 0
    bar = tqdm(total=cfg.steps, desc="train_front", disable=not progress)
    while step < cfg.steps:
        for batch in stream.epoch(epoch):
            x, y = to_unit(batch["lq"]), to_unit(batch["gt"])
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            window.append(float(loss.detach()))
            if step % cfg.log_every == 0 or step == cfg.steps:
                curve.append({"step": step, "loss": round(float(np.mean(window)), 6)})
                window = []
            bar.update(1)
            if step >= cfg.steps:
                break
        epoch += 1
    bar.close()
    return net.eval(), curve


@torch.no_grad()
def validate(net: FrontEnd, shards: str, preset: str, n: int) -> dict:
    """Paired PSNR of the degraded input and the front end on the first n val targets (seed 42 + i)."""
    gts, lqs = [], []
    for i, s in enumerate(iter_samples(shards, "val")):
        if i >= n:
            break
        gts.append(s["gt"])
        lqs.append(get_preset(preset)(s["gt"], np.random.default_rng(42 + i))[0])
    if not gts:
        raise SystemExit(f"error: {shards} has no val samples to validate the front end on")
    gt, lq = np.stack(gts), np.stack(lqs)
    out = to_uint8(net(to_unit(lq)).clamp(-1, 1))
    a, b = psnr_u8(out, gt), psnr_u8(lq, gt)
    d = paired_bootstrap(a, b)
    return {
        "n": len(gt),
        "degraded_psnr": round(float(b.mean()), 4),
        "front_psnr": round(float(a.mean()), 4),
        "gain": d.as_dict(),
        "verdict": d.verdict,
    }


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--plot", required=True, help="CSV of the loss every log_every steps (a DVC plot)")
    args = p.parse_args(argv)
    setup_logging()
    params = load_params(args.params, "train_front", "degrade")
    cfg, dcfg = params["train_front"], params["degrade"]
    t0 = time.perf_counter()
    net, curve = train_front(cfg, dcfg, args.shards, progress=progress_enabled())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_front(net, out / "front.safetensors")
    metrics = {
        "steps": cfg.steps,
        "parameters": sum(p.numel() for p in net.parameters()),
        "final_loss": curve[-1]["loss"],
    }
    for preset in cfg.val_presets:
        metrics[preset] = validate(net, args.shards, preset, cfg.val_samples)
    write_json(args.metrics, metrics)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss"], lineterminator="\n")
    w.writeheader()
    w.writerows(curve)
    write_bytes(args.plot, buf.getvalue().encode())
    gains = ", ".join(f"{k} {v['gain']['diff']:+.2f} dB" for k, v in metrics.items() if isinstance(v, dict))
    print(
        f"train_front: {cfg.steps} steps in {time.perf_counter() - t0:.0f} s; PSNR over the degraded input: {gains}"
    )


if __name__ == "__main__":
    main()
