"""GPU figures of the real configuration: training step time, samples/s and peak memory per
configuration, restore time, and the FLOP floor with the ratio to it (issue 16, item 1).

    python benchmarks/bench_gpu.py                      # klein_base_4b shapes at 512² on CUDA
    python benchmarks/bench_gpu.py --small              # the same code on a tiny config on the CPU
    python benchmarks/bench_gpu.py --json out.json --plot out.png

Weights are random in the shapes of FLUX.2-klein-base-4B, the FLUX.2 VAE (`AutoencoderKLFlux2`'s
default config, written to a temporary folder and loaded through `train.vae` as a user's would be)
and AdaFace IR-50: timings and memory do not depend on the values. Training runs the project's own
`IConFaceModule` under a Lightning `Trainer` (`bf16-mixed`, LoRA 16, gradient checkpointing, frozen
weights stored in bf16 unless the row says otherwise), built by `pipelines.training.build_network` as
the `train` stage builds it. Each row is a fresh model; the step time is the median of `--steps` steps
after `--warmup` (CUDA-synchronised), the peak memory is `torch.cuda.max_memory_allocated` after a
reset and after the previous row's model is freed.

Restore rows: 12 steps, guidance 4.0 (two forwards a step), 3 references, batch 1 — through
`IConFaceModule.restore` with (a) float32 weights under autocast, (b) weights cast to bf16 once,
(c) the LoRA merged first (`models.lora.merge_lora`), (d) that model with every block compiled
(`torch.compile`; the compile time is printed on its own, it is paid once per process and shape).

The floor: the FLOPs of one forward with 3 references (counted by `torch.utils.flop_counter`) over the
measured throughput of a large bf16 matrix product on the same device; a training step costs about
3 forwards (4 with checkpointing) and a restore 2·steps forwards. On the CPU (`--small`) the same
figures come from float32 and the tiny config: they exist so that this script cannot rot (a test runs
it), not as numbers to quote.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024**3


@dataclass(frozen=True)
class Scale:
    backbone: str
    resolution: int
    vae: dict | None  # AutoencoderKLFlux2 config overrides; None = its default (the FLUX.2 VAE)
    encoder: dict | None  # IRConfig overrides; None = IR-50
    text_tokens: int
    lora_rank: int
    precision: str
    memory_tokens: int
    matmul: int  # side of the square matmul that measures the device's throughput


FULL = Scale("klein_base_4b", 512, None, None, 512, 16, "bf16-mixed", 256, 8192)
SMALL = Scale(
    "tiny",
    32,
    dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ),
    dict(input_size=32, units=(1, 1, 1, 1), widths=(8, 8, 8, 16, 16), embedding_dim=16, stem_stride=2),
    8,
    4,
    "bf16-mixed",
    8,
    512,
)

# (label, overrides of the recipe row): the rows of issue 16's table, plus the compiled step.
TRAIN_ROWS: list[tuple[str, dict]] = [
    ("recipe: full, 3 references, batch 1", {}),
    ("full, 1 reference", {"refs": 1}),
    ("concat (no pathways), 3 references", {"variant": "concat"}),
    ("full, 3 references, no checkpointing", {"gradient_checkpointing": False}),
    ("full, 3 references, frozen weights float32", {"frozen_dtype": "float32"}),
    ("full, 3 references, batch 4", {"batch": 4}),
    ("full, 3 references, compiled blocks", {"compile": True}),
]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None


def write_vae(scale: Scale, folder: Path) -> str:
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    AutoencoderKLFlux2(**(scale.vae or {})).save_pretrained(folder)
    return str(folder)


def train_config(scale: Scale, vae: str, over: dict):
    from pipelines.config import TrainConfig, build

    return build(
        TrainConfig,
        {
            "backbone": scale.backbone,
            "vae": vae,
            "train_backbone": False,
            "front_end": 0,
            "front": None,
            "prediction": "velocity",
            "lr": 1e-5,
            "lr_schedule": "constant",
            "lora_rank": scale.lora_rank,
            "memory_tokens": scale.memory_tokens,
            "precision": scale.precision,
            "gradient_checkpointing": over.get("gradient_checkpointing", True),
            "variant": over.get("variant", "full"),
            "frozen_dtype": over.get("frozen_dtype", "auto"),
            "compile": over.get("compile", False),
            "max_refs": 3,
            "batch_size": over.get("batch", 1),
        },
        "train",
    )


def build_module(scale: Scale, cfg, dev: torch.device):
    """The train stage's module (build_network + IConFaceModule + cast_frozen), built on `dev`."""
    from models.id_encoder import IRBackbone, IRConfig
    from models.prompt import synthetic_prompt
    from pipelines.training import IConFaceModule, build_network, cast_frozen, frozen_dtype

    with torch.device(dev):
        torch.manual_seed(0)
        enc = IRBackbone(IRConfig(**(scale.encoder or {}))).eval()
        net, codec, _ = build_network(cfg, enc.cfg.embedding_dim)
        text = synthetic_prompt(scale.text_tokens, net.transformer.config.joint_attention_dim)
        module = IConFaceModule.from_config(net, codec.to(dev), enc, text, cfg)
    module.to(dev)
    if (dtype := frozen_dtype(cfg)) is not None:
        cast_frozen([module.net, module.codec, module.id_encoder], dtype)
    return module


def synthetic_batch(scale: Scale, b: int, refs: int, seed: int = 0) -> dict:
    from pipelines.training import make_batch

    rng = np.random.default_rng(seed)
    s = scale.resolution
    img = lambda: rng.integers(0, 255, (s, s, 3), dtype=np.uint8)  # noqa: E731
    d = 512 if scale.encoder is None else scale.encoder["embedding_dim"]
    batch = make_batch(
        [img() for _ in range(b)],
        [[img() for _ in range(refs)] for _ in range(b)],
        [[rng.normal(size=d).astype(np.float32) for _ in range(refs)] for _ in range(b)],
        gt=[img() for _ in range(b)],
        z_gt=[rng.normal(size=d).astype(np.float32) for _ in range(b)],
    )
    batch["wanted"], batch["got"] = [refs] * b, [refs] * b
    return batch


def parameter_gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / GIB


def train_row(scale: Scale, vae: str, dev: torch.device, over: dict, warmup: int, steps: int) -> dict:
    import lightning as L

    cfg = train_config(scale, vae, over)
    reset_peak(dev)
    module = build_module(scale, cfg, dev)
    if cfg.compile:
        from pipelines.training import compile_blocks

        compile_blocks(module.net.transformer)
    batch = synthetic_batch(scale, cfg.batch_size, over.get("refs", 3))
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(dev)
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(dev)
            times.append(time.perf_counter() - self.t)

    loader = torch.utils.data.DataLoader([batch] * (warmup + steps), batch_size=None)
    trainer = L.Trainer(
        max_steps=warmup + steps,
        accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=1,
        precision=cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    step = statistics.median(times[warmup:])
    row = {
        "step_s": step,
        "samples_per_s": cfg.batch_size / step,
        "peak_gib": peak_gib(dev),
        "weights_mib": parameter_gib(module) * 1024,
        "first_step_s": times[0],
        "loss": float(module.history[-1]["loss"]),
    }
    del trainer, module, loader
    reset_peak(dev)
    return row


def count_forward_flops(module, batch, dev: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    module.eval().requires_grad_(False)  # the counter's module tracker needs no grad-requiring inputs
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad(), module.autocast():
        cond = module.conditioning(batch)
        z = torch.randn_like(cond.deg)
        sigma = torch.full((z.shape[0],), 0.5, device=dev)
        with FlopCounterMode(display=False) as counter:
            module.net(z, sigma, cond)
    return int(counter.get_total_flops())


def forward_s(module, batch, dev: torch.device, n: int = 5) -> float:
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    module.eval()
    with torch.no_grad(), module.autocast():
        cond = module.conditioning(batch)
        z = torch.randn_like(cond.deg)
        sigma = torch.full((z.shape[0],), 0.5, device=dev)
        module.net(z, sigma, cond)  # warm-up (and the compile, where compiled)
        out = []
        for _ in range(n):
            sync(dev)
            t = time.perf_counter()
            module.net(z, sigma, cond)
            sync(dev)
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def restore_rows(scale: Scale, vae: str, dev: torch.device, steps: int, guidance: float, runs: int) -> list:
    """(label, forward s, restore s per image, compile s) for the four inference set-ups."""
    from models.lora import merge_lora
    from pipelines.training import cast_frozen, compile_blocks

    rows = []
    batch = synthetic_batch(scale, 1, 3, seed=1)
    setups = [
        ("float32 weights under autocast", dict(cast=False, merge=False, compile=False)),
        ("weights cast to bf16 once", dict(cast=True, merge=False, compile=False)),
        ("LoRA merged, bf16 weights", dict(cast=True, merge=True, compile=False)),
        ("LoRA merged, bf16 weights, compiled", dict(cast=True, merge=True, compile=True)),
    ]
    reference = None
    for label, s in setups:
        cfg = train_config(scale, vae, {"frozen_dtype": "float32"})
        reset_peak(dev)
        module = build_module(scale, cfg, dev)
        g = torch.Generator(device="cpu").manual_seed(7)
        for p in module.net.parameters():  # a LoRA that is not zero, as after training
            if p.requires_grad:
                p.data = (torch.randn(p.shape, generator=g) * 1e-3).to(p)
        if s["merge"]:
            merge_lora(module.net.transformer)
        if s["cast"]:
            module.net.requires_grad_(False)
            cast_frozen([module.net, module.codec, module.id_encoder], torch.bfloat16)
            module._low = None
        elif dev.type == "cuda" or scale.precision == "bf16-mixed":
            module._low = torch.bfloat16  # autocast over float32 weights (Lightning's bf16-mixed)
        compile_s = None
        if s["compile"]:
            compile_blocks(module.net.transformer)
            sync(dev)
            t = time.perf_counter()
            forward_s(module, batch, dev, n=1)
            module.restore(batch, steps=steps, guidance=guidance)  # the sampler's shapes and strides too
            sync(dev)
            compile_s = time.perf_counter() - t
        fwd = forward_s(module, batch, dev)
        per_image = []
        for _ in range(runs):
            sync(dev)
            t = time.perf_counter()
            out = module.restore(batch, steps=steps, guidance=guidance)
            sync(dev)
            per_image.append(time.perf_counter() - t)
        if reference is None:
            reference = out
        diff = float((out - reference).abs().max())
        rows.append((label, fwd, statistics.median(per_image), compile_s, peak_gib(dev), diff))
        del module
        reset_peak(dev)
    return rows


def matmul_flops_per_s(dev: torch.device, n: int) -> float:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    sync(dev)
    reps = 20 if dev.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def fmt(v, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny config on the CPU (the test's mode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--restore-steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--restore-runs", type=int, default=3)
    p.add_argument("--rows", default="all", help="comma-separated row numbers (1-based) or 'all'")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    scale = SMALL if args.small else FULL
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device; run with --small on the CPU")
    dev = torch.device("cuda" if not args.small else "cpu")
    if args.small:
        torch.set_num_threads(1)
    rows = TRAIN_ROWS
    if args.rows != "all":
        pick = {int(x) for x in args.rows.split(",")}
        rows = [r for i, r in enumerate(TRAIN_ROWS, 1) if i in pick]
    if args.no_compile:
        rows = [r for r in rows if not r[1].get("compile")]

    with tempfile.TemporaryDirectory() as tmp:
        vae = write_vae(scale, Path(tmp) / "vae")
        rate = matmul_flops_per_s(dev, scale.matmul)
        cfg = train_config(scale, vae, {})
        module = build_module(scale, cfg, dev)
        flops = count_forward_flops(module, synthetic_batch(scale, 1, 3, seed=2), dev)
        del module
        reset_peak(dev)
        floor_fwd = flops / rate
        result: dict = {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (--small)",
            "scale": scale.backbone,
            "resolution": scale.resolution,
            "matmul_tflops": rate / 1e12,
            "forward_tflop_3_refs": flops / 1e12,
            "floor_forward_s": floor_fwd,
            "train": [],
            "restore": [],
        }
        print(
            f"device {result['device']}; {scale.backbone} at {scale.resolution}²; matmul "
            f"{rate / 1e12:.1f} TFLOP/s; one forward with 3 references {flops / 1e12:.3g} TFLOP → floor "
            f"{floor_fwd:.4f} s"
        )
        print("\n| configuration | step s | samples/s | peak GiB | weights MiB | floor step s | × floor |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, over in rows:
            r = train_row(scale, vae, dev, over, args.warmup, args.steps)
            refs = over.get("refs", 3)
            # a step ≈ forward + backward (2×) (+ one recomputed forward with checkpointing), per sample,
            # scaled from the 3-reference forward by the image token count (2 + refs segments of 5)
            ckpt = over.get("gradient_checkpointing", True)
            floor = floor_fwd * (4 if ckpt else 3) * over.get("batch", 1) * (2 + refs) / 5
            r.update({"label": label, "floor_step_s": floor, "x_floor": r["step_s"] / floor})
            result["train"].append(r)
            print(
                f"| {label} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {fmt(r['peak_gib'], '.1f')} | "
                f"{r['weights_mib']:.1f} | {floor:.3f} | {r['x_floor']:.2f} |"
            )
        print(
            f"\nRestore ({args.restore_steps} steps, guidance {args.guidance}, 3 references, batch 1, "
            f"{scale.resolution}²):"
        )
        print(
            "\n| set-up | forward s | restore s/image | × floor | compile s | peak GiB | max |Δ| vs first |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        n_fwd = args.restore_steps * (2 if args.guidance != 1.0 else 1)
        rrows = restore_rows(scale, vae, dev, args.restore_steps, args.guidance, args.restore_runs)
        for label, fwd, img_s, comp, peak, diff in rrows:
            if args.no_compile and comp is not None:
                continue
            x = img_s / (floor_fwd * n_fwd)
            result["restore"].append(
                {
                    "label": label,
                    "forward_s": fwd,
                    "restore_s": img_s,
                    "x_floor": x,
                    "compile_s": comp,
                    "peak_gib": peak,
                    "max_abs_diff": diff,
                }
            )
            print(
                f"| {label} | {fwd:.4f} | {img_s:.3f} | {x:.2f} | {fmt(comp, '.1f')} | {fmt(peak, '.1f')} | "
                f"{diff:.4f} |"
            )
    best = min(result["restore"], key=lambda r: r["restore_s"])
    recipe = result["train"][0] if result["train"] else None
    print(
        f"\nbench_gpu: {len(result['train'])} training rows, {len(result['restore'])} restore set-ups; "
        + (f"recipe step {recipe['step_s']:.3f} s ({recipe['x_floor']:.2f}× floor); " if recipe else "")
        + f"fastest restore {best['restore_s']:.3f} s/image ({best['label']})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    tr = result["train"]
    axes[0].barh([r["label"] for r in tr], [r["step_s"] for r in tr], color="#4477aa")
    axes[0].barh([r["label"] for r in tr], [r["floor_step_s"] for r in tr], color="#cccccc", alpha=0.8)
    axes[0].set_xlabel("training step s (grey: FLOP floor)")
    axes[0].invert_yaxis()
    rs = result["restore"]
    axes[1].barh([r["label"] for r in rs], [r["restore_s"] for r in rs], color="#aa7744")
    axes[1].set_xlabel("restore s / image")
    axes[1].invert_yaxis()
    fig.suptitle(f"{result['device']}: {result['scale']} at {result['resolution']}²")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
