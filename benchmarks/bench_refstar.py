"""The cost per training step of RefSTAR's parts on the CPU default (pipelines/refstar.py): conflict
masks, the decoupled cross-attention (eq. 4) and the Mask-Compatible Cycle-Consistency loss (eq. 5),
each against the plain IConFace step, measured in the same process.

    python benchmarks/bench_refstar.py [--steps 8] [--batch 8] [--backbone small] [--threads 1]

The embedded default's `train` config (params.yaml) on synthetic 64 px faces with 0–3 references by the
schedule, forward + backward + AdamW step of `IConFaceModule.training_step` (no Ray, no Lightning: the
data path is not what differs). The configurations run round-robin, one step each per round, so that
a load change on the machine hits them alike; the figures are the median step time (wall) and the
median CPU time of the process per step (less sensitive to other processes on a shared machine), each
with its ratio to the plain step of the same rounds. One torch thread by default: on a 2-core machine
shared with other jobs, two threads spin-wait and a step's CPU time varied tenfold (1.4 to 15 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "iconface (in-context, no masks)": {},
    "+ masks": {"refstar.reference_masks": "truth"},
    "+ masks, decoupled (eq. 4)": {
        "refstar.reference_masks": "truth",
        "refstar.reference_route": "decoupled",
    },
    "+ masks, cycle loss (eq. 5)": {"refstar.reference_masks": "truth", "refstar.cycle_loss": True},
    "+ masks, decoupled, cycle": {
        "refstar.reference_masks": "truth",
        "refstar.reference_route": "decoupled",
        "refstar.cycle_loss": True,
    },
}


def batches(n: int, b: int, size: int, seed: int = 0) -> list[dict]:
    """`n` collated batches of synthetic faces with exact conflict masks and degraded first references."""
    from pipelines.batches import make_batch
    from pipelines.degradations import degrade
    from pipelines.refschedule import draw_refs
    from pipelines.synthetic import conflict_mask, face_spec, render

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        lq, gt, refs, masks, zs, ref_lq = [], [], [], [], [], []
        for i in range(b):
            ident = int(rng.integers(0, 1000))
            specs = [face_spec(seed, "album", ident, j) for j in range(4)]
            img = [render(s, 2 * size, size) for s in specs]
            key = f"b{k}s{i}"
            chosen = draw_refs(3, (0.3, 0.3, 0.2, 0.2), seed, key, 0).chosen
            gt.append(img[0])
            lq.append(degrade(img[0], "iconface_mixed", seed, key, 0).image)
            refs.append([img[1 + c] for c in chosen])
            masks.append([conflict_mask(specs[0], specs[1 + c], size) for c in chosen])
            zs.append([rng.normal(size=512).astype(np.float32) for _ in chosen])
            ref_lq.append(
                degrade(refs[-1][0], "iconface_mixed", seed, key + "/ref", 0).image if chosen else None
            )
        batch = make_batch(
            lq,
            refs,
            zs,
            dim=512,
            gt=gt,
            z_gt=[rng.normal(size=512).astype(np.float32) for _ in range(b)],
            ref_masks=masks,
            ref_lq=ref_lq,
        )
        batch["wanted"] = batch["got"] = [len(r) for r in refs]
        out.append(batch)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backbone", default="small")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.config import TrainConfig, build, with_overrides
    from pipelines.module import IConFaceModule
    from pipelines.network import build_network

    torch.set_num_threads(args.threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
    base = build(TrainConfig, {**params["train"], "backbone": args.backbone, "front": None}, "train")
    enc = IRBackbone(IRConfig(64, (1, 1, 2, 1), (16, 16, 32, 64, 128), 512, stem_stride=2)).eval()
    data = batches(args.steps + 1, args.batch, 64)
    runs = {}
    for name, over in CONFIGS.items():
        cfg = with_overrides(base, over)
        net, codec, text = build_network(cfg, 512)
        m = IConFaceModule.from_config(net, codec, enc, text, cfg)
        m.log = m.log_dict = lambda *a, **k: None
        m.optimizers = lambda: None
        opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=cfg.lr)
        runs[name] = (m, opt, [])
    for step, batch in enumerate(data):
        for name, (m, opt, times) in runs.items():
            if "ref_consistent" in batch and not m.refstar.masks:
                batch_ = {k: v for k, v in batch.items() if k not in ("ref_consistent", "ref_lq")}
            else:
                batch_ = batch
            t, c = time.perf_counter(), time.process_time()
            loss = m.training_step(batch_, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step:  # the first round warms up
                times.append((time.perf_counter() - t, time.process_time() - c))
            assert torch.isfinite(loss), name
    plain = [statistics.median(x) for x in zip(*runs["iconface (in-context, no masks)"][2])]
    refs = sum(int(b["ref_mask"].any(1).sum()) for b in data[1:])
    print(
        f"{args.backbone}, batch {args.batch}, 64 px, {args.steps} timed steps per configuration "
        f"({refs} of {args.steps * args.batch} samples with a reference: those get a cycle term), torch threads {args.threads}:"
    )
    for name, (_, _, times) in runs.items():
        wall, cpu = (statistics.median(x) for x in zip(*times))
        print(
            f"  {name:34s} wall {wall:6.3f} s/step x{wall / plain[0]:4.2f} (min {min(t for t, _ in times):.3f}); "
            f"CPU {cpu:6.3f} s/step x{cpu / plain[1]:4.2f}"
        )


if __name__ == "__main__":
    main()
