"""Training throughput for the CPU config: samples/s, the fraction of step time spent waiting for data,
peak memory; and an estimate of per-GPU memory for klein-4B in bf16 with LoRA and checkpointing.

    python benchmarks/bench_train.py [--steps 60] [--backbone small] [--max-in-flight 4]

Runs Lightning on Ray-fed batches from synthetic shards written to a temporary folder (no MLflow).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def klein_estimate(tokens_per_image: int = 1024, refs: int = 1, text: int = 512) -> dict:
    """Back-of-envelope memory per GPU (bf16 weights, fp32 trainable + AdamW, checkpointed blocks)."""
    from models.iconface import IConFace, IConFaceConfig, build_backbone
    from models.lora import add_lora

    with torch.device("meta"):
        tr = build_backbone("klein_base_4b")
        add_lora(tr, 16)
        m = IConFace(tr, IConFaceConfig())
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    seq = tokens_per_image * (2 + refs) + text
    dim, blocks = 3072, 25
    gb = 1024**3
    est = {
        "frozen_weights_bf16_gb": frozen * 2 / gb,
        "trainable_fp32_weights_grads_adam_gb": train * 16 / gb,
        "checkpointed_block_inputs_gb": seq * dim * 2 * blocks / gb,
        "one_block_recompute_gb": seq
        * dim
        * 2
        * 24
        / gb,  # ~24 activations of width dim per token in a block
        "vae_adaface_gb": (84e6 + 44e6) * 2 / gb,
    }
    est["total_gb"] = sum(est.values())
    return {k: round(v, 2) for k, v in est.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--backbone", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, default=4)
    args = p.parse_args()
    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.config import DegradeConfig, TrainConfig, build
    from pipelines.embedding import Encoders
    from pipelines.fit import fit
    from pipelines.images import png_bytes
    from pipelines.shards import npy_bytes, write_split
    from pipelines.synthetic import face_spec, render

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        pngs = [png_bytes(render(face_spec(1, "album", i, j), 128, 64)) for i in range(16) for j in range(4)]

        def samples():
            for i in range(512):
                s = {
                    "__key__": f"s{i:05d}",
                    "gt.png": pngs[i % 64],
                    "meta.json": json.dumps({"ref_count": 3}).encode(),
                    "gt_emb.npy": npy_bytes(np.ones(512, np.float32)),
                    "ref_emb.npy": npy_bytes(np.ones((3, 512), np.float32)),
                }
                for k in range(3):
                    s[f"ref{k}.png"] = pngs[(i + k + 1) % 64]
                yield s

        paths = [str(Path(d) / e["name"]) for e in write_split(Path(d), "train", samples(), 128)]
        # The embedded default's train and degrade configs, on the chosen backbone, through the one
        # training entry point (pipelines.fit) that the train, ablate and tune stages use.
        params = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
        cfg = build(
            TrainConfig,
            {**params.get("train", {}), "backbone": args.backbone, "batch_size": args.batch},
            "train",
        )
        dcfg = build(
            DegradeConfig, {**params.get("degrade", {}), "max_in_flight": args.max_in_flight}, "degrade"
        )
        enc = IRBackbone(IRConfig(64, (1, 1, 2, 1), (16, 16, 32, 64, 128), 512, stem_stride=2))
        result = fit(cfg, dcfg, paths, Encoders(enc, enc, "bench", 0.0), None, steps=args.steps)
        t = result.timing
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{args.backbone}: {t['samples_per_s']:.1f} samples/s over {args.steps} steps (batch {args.batch}, "
            f"Ray start-up included), data wait {t['data_wait_fraction']:.1%} of the time, peak RSS {peak:.0f} MiB"
        )
    print("klein_base_4b per-GPU memory ESTIMATE (512², 1 reference, bf16, LoRA 16, gradient checkpointing):")
    for k, v in klein_estimate().items():
        print(f"  {k:40s} {v:7.2f} GB")


if __name__ == "__main__":
    main()
