"""Cost of the reference readout (models.iconface, "Reference readout") per training step of the
default config: the same Ray-fed batches, the same seed, readout off (the baseline) then on, in one
process; prints seconds per step and the ratio.

    python benchmarks/bench_readout.py [--steps 10] [--warmup 2]

Needs the default's shards (`dvc repro shards`) and the primary identity encoder (`train_id_encoder`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    import ray

    from pipelines.batches import StreamIterable
    from pipelines.embedding import load_identity_encoder
    from pipelines.module import IConFaceModule
    from pipelines.network import build_network
    from pipelines.shards import shard_paths
    from pipelines.stream import DegradationStream, connect
    from stages._common import load_params

    p = load_params(str(ROOT / "params.yaml"), "train", "degrade", "embed")
    cfg, dcfg, ecfg = p["train"], p["degrade"], p["embed"]
    torch.set_num_threads(cfg.threads)
    connect(dcfg.num_cpus)
    stream = DegradationStream(
        shard_paths(str(ROOT / cfg.shards), "train"),
        dcfg.preset,
        dcfg.seed,
        cfg.batch_size,
        dcfg.max_in_flight,
        dcfg.shuffle,
    )
    it = iter(StreamIterable(stream, tuple(cfg.ref_schedule), cfg.max_refs, cfg.seed))
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    ray.shutdown()
    encoder = load_identity_encoder(ecfg.encoder, str(ROOT / ecfg.checkpoint))[0]

    def per_step(readout: str) -> tuple[float, int]:
        c = replace(cfg, reference_readout=readout, front=str(ROOT / cfg.front) if cfg.front else None)
        net, codec, text = build_network(c, encoder.cfg.embedding_dim)
        m = IConFaceModule.from_config(net, codec, encoder, text, c)
        m.log = m.log_dict = lambda *a, **k: None  # no trainer: the module logs nothing here
        opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=c.lr)
        m.optimizers = lambda: opt
        t0 = 0.0
        for i, b in enumerate(batches):
            if i == args.warmup:
                t0 = time.perf_counter()
            loss = m.training_step(b, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        n = sum(q.numel() for q in net.parameters() if q.requires_grad)
        return (time.perf_counter() - t0) / args.steps, n

    off, n_off = per_step("off")
    on, n_on = per_step("on")
    print(f"readout off: {off:.3f} s/step, {n_off:,} trainable parameters")
    print(f"readout on:  {on:.3f} s/step, {n_on:,} trainable parameters (+{n_on - n_off:,})")
    print(
        f"ratio on/off: {on / off:.3f} ({args.steps} steps of batch {cfg.batch_size}, {cfg.threads} threads)"
    )


if __name__ == "__main__":
    main()
