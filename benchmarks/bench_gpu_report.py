"""Reporting helpers of benchmarks/bench_gpu.py: where one forward's device time goes (torch.profiler)
and the figure of its rows."""

from __future__ import annotations

from pathlib import Path

import torch


def profile_forward(module, batch, dev: torch.device) -> dict:
    """Where one forward's device time goes (torch.profiler): milliseconds per kernel class (matrix
    products, attention, the rest) and the ten costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad(), module.autocast():
        cond = module.conditioning(batch)
        z = torch.randn_like(cond.deg)
        sigma = torch.full((z.shape[0],), 0.5, device=dev)
        module.net(z, sigma, cond)
        if cuda:
            torch.cuda.synchronize(dev)
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            module.net(z, sigma, cond)
            if cuda:
                torch.cuda.synchronize(dev)

    def own(e) -> float:
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3

    events = [e for e in prof.key_averages() if own(e) > 0]
    classes = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        name = e.key.lower()
        if any(w in name for w in ("flash", "fmha", "attention", "cudnn")):
            classes["attention"] += own(e)
        elif any(w in name for w in ("gemm", "sm90", "cutlass", "nvjet", "aten::mm", "aten::addmm")):
            classes["matmul"] += own(e)
        else:
            classes["other"] += own(e)
    top = sorted(events, key=own, reverse=True)[:10]
    return {"ms": classes, "top": [(e.key[:90], own(e)) for e in top]}


def print_profiles(profiles: dict) -> None:
    print("\nOne forward's device time (ms) by kernel class:\n")
    print("| set-up | matmul | attention | other |\n|---|---:|---:|---:|")
    for label, prof in profiles.items():
        ms = prof["ms"]
        print(f"| {label} | {ms['matmul']:.1f} | {ms['attention']:.1f} | {ms['other']:.1f} |")
    for label, prof in profiles.items():
        print(f"\n{label}: costliest kernels (ms per forward)")
        for name, ms in prof["top"]:
            print(f"  {ms:8.2f}  {name}")


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
