"""GPU figures of the recipe: training step time, samples/s and peak memory per configuration, restore
time per image, and the FLOP floor with the ratio to it.

    python benchmarks/bench_gpu.py                      # klein_base_4b shapes at 512² on CUDA
    python benchmarks/bench_gpu.py --small              # the same code on a tiny config on the CPU
    python benchmarks/bench_gpu.py --rows 1,7 --restore 4,5 --json out.json --plot out.png

The configuration is the recipe as the stages read it: params.yaml with configs/recipe_gpu.yaml merged
over it, validated like every `train` section, its `weights`, `vae` and `prompt_cache` pointed at local
folders this script writes with random weights (`write_inputs`: the FLUX.2 VAE's default config, a
prompt cache, and a transformer folder in klein's widths at a reduced depth). Each row then builds the
transformer at klein's full depth from its named config (random weights: timings and memory do not
depend on the values) and trains the project's own `IConFaceModule` under a Lightning `Trainer`
(`bf16-mixed`, LoRA 16, frozen weights stored in bf16 unless the row says otherwise) after
`prepare_for_training`, as `fit` does. Each row is a fresh model and a fresh compile; the step time is
the median of `--steps` steps after `--warmup` (CUDA-synchronised), the peak memory is
`torch.cuda.max_memory_allocated` after a reset and after the previous row's model is freed.

Restore set-ups: 12 steps, guidance 4.0, 3 references, batch 1, through `IConFaceModule.restore`:
float32 weights under autocast; weights cast to bf16 once; the LoRA merged first
(`models.lora.merge_lora`); every block compiled (`IConFace.compile_blocks`; the compile time is printed
on its own, paid once per process and shape); and both guidance branches as one batch of two.

The floor: the FLOPs of one forward with 3 references (counted by `torch.utils.flop_counter`) over the
measured throughput of a large bf16 matrix product on the same device; a training step costs about
3 forwards (4 with checkpointing) and a restore 2·steps forwards. On the CPU (`--small`) the same
figures come from float32 and the tiny config: they exist so that this script cannot rot (a test runs
it), not as numbers to quote. The JSON is rewritten after every row, so a run cut short keeps its rows.
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

from bench_gpu_report import plot, print_profiles, profile_forward  # noqa: E402  (benchmarks/, beside it)

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

# (label, overrides of the recipe's settings): the recipe is bf16-mixed, frozen bf16, LoRA 16, 3
# references, batch 1, gradient checkpointing inside compiled blocks (configs/recipe_gpu.yaml).
TRAIN_ROWS: list[tuple[str, dict]] = [
    ("eager: full, 3 references, batch 1, checkpointing", {"compile": False}),
    ("eager: full, 1 reference", {"compile": False, "refs": 1}),
    ("eager: concat (no pathways), 3 references", {"compile": False, "variant": "concat"}),
    ("eager: no checkpointing", {"compile": False, "gradient_checkpointing": False}),
    ("eager: frozen weights float32", {"compile": False, "frozen_dtype": "float32"}),
    ("eager: batch 4", {"compile": False, "batch": 4}),
    ("compiled blocks, full checkpointing inside", {}),
    ("compiled, checkpointing inside half the blocks", {"fraction": 0.5}),
    ("compiled, no checkpointing", {"gradient_checkpointing": False}),
    ("compiled, checkpointing keeping matmul and attention outputs", {"policy": "save_matmuls"}),
    (
        "eager: checkpointing keeping matmul and attention outputs",
        {"compile": False, "policy": "save_matmuls"},
    ),
    ("compiled, checkpointing keeping attention outputs", {"policy": "save_attention"}),
    (
        "recipe: compiled, keeping attention outputs, on 60 % of the blocks",
        {"policy": "save_attention", "fraction": 0.6},
    ),
    (
        "compiled, keeping attention outputs, on 64 % of the blocks",
        {"policy": "save_attention", "fraction": 0.64},
    ),
]
RECIPE_ROW = "recipe: compiled, keeping attention outputs, on 60 % of the blocks"

# (label, set-up) of the restore rows; batch_cfg: both guidance branches as one batch of two
RESTORE_SETUPS: list[tuple[str, dict]] = [
    ("float32 weights under autocast", dict(cast=False, merge=False, compile=False, batch_cfg=False)),
    ("weights cast to bf16 once", dict(cast=True, merge=False, compile=False, batch_cfg=False)),
    ("LoRA merged, bf16 weights", dict(cast=True, merge=True, compile=False, batch_cfg=False)),
    ("LoRA merged, bf16, compiled", dict(cast=True, merge=True, compile=True, batch_cfg=False)),
    (
        "LoRA merged, bf16, compiled, CFG as one batch",
        dict(cast=True, merge=True, compile=True, batch_cfg=True),
    ),
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


def write_inputs(scale: Scale, folder: Path, depth: tuple[int, int] = (1, 1)) -> dict[str, str]:
    """The three local folders/files a user gives (`train.weights`, `train.vae`, `train.prompt_cache`),
    with random weights: the transformer in the scale's widths at a reduced `depth` (double, single
    blocks), the VAE (`AutoencoderKLFlux2`'s default config = the FLUX.2 VAE at full scale) and the
    prompt cache (`models.prompt`'s format)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from models.iconface import BACKBONES
    from models.prompt import save_prompt_cache

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**(scale.vae or {}))
    vae.save_pretrained(folder / "vae")
    channels = vae.config.latent_channels * 4  # the codec packs 2x2 latent patches (models.codecs)
    shape = {**BACKBONES[scale.backbone], "in_channels": channels}
    shape.update(num_layers=depth[0], num_single_layers=depth[1])
    Flux2Transformer2DModel(**shape).to(torch.bfloat16).save_pretrained(folder / "transformer")
    dim = shape["joint_attention_dim"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, scale.text_tokens, dim, generator=g, device=g.device)
    save_prompt_cache(folder / "prompt.safetensors", {"prompt": prompt, "empty": torch.zeros_like(prompt)})
    return {
        "weights": str(folder / "transformer"),
        "vae": str(folder / "vae"),
        "prompt_cache": str(folder / "prompt.safetensors"),
    }


def train_config(scale: Scale, paths: dict[str, str], over: dict):
    """The recipe's `train` section (params.yaml with configs/recipe_gpu.yaml merged over it, as the
    stages read it), its three paths pointed at `paths`, the scale's sizes and the row's overrides;
    validated like every `train` section."""
    from pipelines.config import TrainConfig, build, read_params

    train = read_params(ROOT / "params.yaml", ROOT / "configs" / "recipe_gpu.yaml")["train"]
    train.update(paths)
    train.update(
        backbone=scale.backbone,
        lora_rank=scale.lora_rank,
        memory_tokens=scale.memory_tokens,
        precision=scale.precision,
        accelerator="cpu" if scale.backbone == "tiny" else "gpu",
        gradient_checkpointing=over.get("gradient_checkpointing", True),
        variant=over.get("variant", "full"),
        frozen_dtype=over.get("frozen_dtype", train["frozen_dtype"]),
        compile=over.get("compile", True),
        checkpoint_fraction=over.get("fraction", 1.0),
        checkpoint_policy=over.get("policy", "full"),
        max_refs=3,
        batch_size=over.get("batch", 1),
        accumulate=1,
    )
    return build(TrainConfig, train, "train")


def build_module(scale: Scale, cfg, dev: torch.device):
    """The train stage's module (build_network + IConFaceModule + cast_frozen), built on `dev`.

    The transformer is built at the scale's full depth from its named config with random weights
    (`weights` set aside): the folder `write_inputs` wrote holds a reduced depth, and timings and memory
    do not depend on the values. The VAE and the prompt come from their local paths."""
    from dataclasses import replace

    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.module import IConFaceModule, cast_frozen, frozen_dtype
    from pipelines.network import build_network

    with torch.device(dev):
        torch.manual_seed(0)
        enc = IRBackbone(IRConfig(**(scale.encoder or {}))).eval()
        net, codec, text = build_network(replace(cfg, weights=None), enc.cfg.embedding_dim)
        module = IConFaceModule.from_config(net, codec.to(dev), enc, text, cfg)
    module.to(dev)
    if (dtype := frozen_dtype(cfg)) is not None:
        cast_frozen([module.net, module.codec, module.id_encoder], dtype)
    return module


def synthetic_batch(scale: Scale, b: int, refs: int, seed: int = 0) -> dict:
    from pipelines.batches import make_batch

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


def train_row(scale: Scale, paths: dict, dev: torch.device, over: dict, warmup: int, steps: int) -> dict:
    import lightning as L

    from pipelines.module import prepare_for_training

    cfg = train_config(scale, paths, over)
    fresh_compile()
    reset_peak(dev)
    module = build_module(scale, cfg, dev)
    prepare_for_training(module, cfg)  # as fit does: frozen dtype, compiled blocks (train.compile)
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
    fresh_compile()
    reset_peak(dev)
    return row


def fresh_compile() -> None:
    """Forget compiled graphs between rows (each row compiles its own)."""
    import torch._dynamo

    torch._dynamo.reset()


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


def restore_rows(
    scale: Scale,
    paths: dict,
    dev: torch.device,
    steps: int,
    guidance: float,
    runs: int,
    setups: list,
    profiles: dict | None = None,
) -> list:
    """(label, forward s, restore s per image, compile s, peak GiB, max |Δ| vs the first) per set-up;
    with `profiles` (a dict) also where one forward's device time goes, per set-up."""
    rows = []
    batch = synthetic_batch(scale, 1, 3, seed=1)
    reference = None
    for label, s in setups:
        *row, out = restore_row(scale, paths, dev, steps, guidance, runs, batch, label, s, profiles)
        reference = out if reference is None else reference
        rows.append((*row, float((out - reference).abs().max())))
    return rows


def restore_row(scale, paths, dev, steps, guidance, runs, batch, label, s, profiles) -> tuple:
    """One restore set-up: (label, forward s, restore s per image, compile s, peak GiB, the output)."""
    from models.lora import merge_lora
    from pipelines.module import cast_frozen

    cfg = train_config(scale, paths, {"frozen_dtype": "float32", "compile": False})
    fresh_compile()
    reset_peak(dev)
    module = build_module(scale, cfg, dev)
    module.net.transformer.disable_gradient_checkpointing()  # inference
    g = torch.Generator(device="cpu").manual_seed(7)
    for p in module.net.parameters():  # a LoRA that is not zero, as after training
        if p.requires_grad:
            p.data = (torch.randn(p.shape, generator=g, device=g.device) * 1e-3).to(p)
    if s["merge"]:
        merge_lora(module.net.transformer)
    if s["cast"]:
        module.net.requires_grad_(False)
        cast_frozen([module.net, module.codec, module.id_encoder], torch.bfloat16)
        module._low = None
    elif dev.type == "cuda" or scale.precision == "bf16-mixed":
        module._low = torch.bfloat16  # autocast over float32 weights (Lightning's bf16-mixed)
    compile_s = None
    opts = dict(steps=steps, guidance=guidance, batch_cfg=s["batch_cfg"])
    if s["compile"]:
        module.net.compile_blocks()
        sync(dev)
        t = time.perf_counter()
        forward_s(module, batch, dev, n=1)
        module.restore(batch, **opts)  # the sampler's shapes and strides too
        sync(dev)
        compile_s = time.perf_counter() - t
    fwd = forward_s(module, batch, dev)
    per_image = []
    for _ in range(runs):
        sync(dev)
        t = time.perf_counter()
        out = module.restore(batch, **opts)
        sync(dev)
        per_image.append(time.perf_counter() - t)
    if profiles is not None:
        profiles[label] = profile_forward(module, batch, dev)
    row = (label, fwd, statistics.median(per_image), compile_s, peak_gib(dev), out)
    del module
    reset_peak(dev)
    return row


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


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny config on the CPU (the test's mode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--restore-steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--restore-runs", type=int, default=3)
    p.add_argument("--rows", default="all", help="training rows, 1-based, comma-separated, or 'all' / 'none'")
    p.add_argument(
        "--restore", default="all", help="restore set-ups, 1-based, comma-separated, or 'all' / 'none'"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows and set-ups")
    p.add_argument(
        "--profile", action="store_true", help="profile one forward per restore set-up (kernel classes)"
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    return p


def measure_floor(scale: Scale, paths: dict[str, str], dev: torch.device) -> dict:
    """The device's matmul rate and one 3-reference forward's FLOPs, hence the forward's time floor, as
    the head of the result (its `train` and `restore` lists empty); prints them."""
    rate = matmul_flops_per_s(dev, scale.matmul)
    cfg = train_config(scale, paths, {"compile": False})
    module = build_module(scale, cfg, dev)
    flops = count_forward_flops(module, synthetic_batch(scale, 1, 3, seed=2), dev)
    del module
    reset_peak(dev)
    floor_fwd = flops / rate
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (--small)",
        "torch": torch.__version__,
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
        f"{floor_fwd:.4f} s",
        flush=True,
    )
    return result


def bench_training(
    result: dict, scale: Scale, paths: dict[str, str], dev: torch.device, rows: list, args: argparse.Namespace
) -> None:
    """Time each training row, append it (with its floor) to `result["train"]` and print its table line;
    the result is saved after each row."""
    floor_fwd = result["floor_forward_s"]
    print("\n| configuration | step s | samples/s | peak GiB | weights MiB | floor step s | × floor |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for label, over in rows:
        r = train_row(scale, paths, dev, over, args.warmup, args.steps)
        refs = over.get("refs", 3)
        # a step ≈ forward + backward (2×) (+ one recomputed forward with checkpointing), per sample,
        # scaled from the 3-reference forward by the image token count (2 + refs segments of 5)
        ckpt = over.get("gradient_checkpointing", True)
        floor = floor_fwd * (4 if ckpt else 3) * over.get("batch", 1) * (2 + refs) / 5
        r.update({"label": label, "floor_step_s": floor, "x_floor": r["step_s"] / floor})
        result["train"].append(r)
        print(
            f"| {label} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {fmt(r['peak_gib'], '.1f')} | "
            f"{r['weights_mib']:.1f} | {floor:.3f} | {r['x_floor']:.2f} |",
            flush=True,
        )
        save(result, args.json)


def bench_restore(
    result: dict,
    scale: Scale,
    paths: dict[str, str],
    dev: torch.device,
    setups: list,
    args: argparse.Namespace,
) -> None:
    """Time each restore set-up, append it to `result["restore"]` and print its table line; with
    `--profile`, the kernel-class profiles go to `result["profile"]` and are printed."""
    floor_fwd = result["floor_forward_s"]
    print(
        f"\nRestore ({args.restore_steps} steps, guidance {args.guidance}, 3 references, batch 1, "
        f"{scale.resolution}²):"
    )
    print("\n| set-up | forward s | restore s/image | × floor | compile s | peak GiB | max |Δ| vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    n_fwd = args.restore_steps * (2 if args.guidance != 1.0 else 1)
    profiles = {} if args.profile else None
    rrows = restore_rows(
        scale, paths, dev, args.restore_steps, args.guidance, args.restore_runs, setups, profiles
    )
    for label, fwd, img_s, comp, peak, diff in rrows:
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
            f"{diff:.4f} |",
            flush=True,
        )
    if profiles:
        result["profile"] = profiles
        print_profiles(profiles)


def summary_line(result: dict) -> str:
    """The closing line: rows and set-ups run, the recipe row's step, the fastest restore."""
    parts = [f"bench_gpu: {len(result['train'])} training rows, {len(result['restore'])} restore set-ups"]
    recipe = next((r for r in result["train"] if r["label"] == RECIPE_ROW), None)
    if recipe:
        parts.append(f"recipe step {recipe['step_s']:.3f} s at {fmt(recipe['peak_gib'], '.1f')} GiB")
    if result["restore"]:
        best = min(result["restore"], key=lambda r: r["restore_s"])
        parts.append(f"fastest restore {best['restore_s']:.3f} s/image ({best['label']})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    scale = SMALL if args.small else FULL
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device; run with --small on the CPU")
    dev = torch.device("cuda" if not args.small else "cpu")
    if args.small:
        torch.set_num_threads(1)
    rows = pick(TRAIN_ROWS, args.rows)
    setups = pick(RESTORE_SETUPS, args.restore)
    if args.no_compile:
        rows = [r for r in rows if r[1].get("compile") is False]
        setups = [r for r in setups if not r[1]["compile"]]

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_inputs(scale, Path(tmp))
        result = measure_floor(scale, paths, dev)
        bench_training(result, scale, paths, dev, rows, args)
        bench_restore(result, scale, paths, dev, setups, args)
    save(result, args.json)
    print(summary_line(result))
    if args.plot and result["train"] and result["restore"]:
        plot(result, args.plot)
    return result


def pick(items: list, spec: str) -> list:
    """Items by 1-based numbers ("1,3"), or all / none."""
    if spec == "all":
        return list(items)
    if spec == "none":
        return []
    chosen = {int(x) for x in spec.split(",")}
    return [r for i, r in enumerate(items, 1) if i in chosen]


def save(result: dict, path: Path | None) -> None:
    """Write the figures so far (a run cut short by its time limit still leaves its rows)."""
    if path is not None:
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
