"""Which numerical kernels give this CPU its own bytes: digests of small pinned computations to compare
between machines.

The chain's outputs are byte-identical across the CPUs the pins cover (pipelines/cpu_pins.py), yet an
Intel Xeon with AMX and a 480 MiB L3 trained other id encoders from the first epoch on, with every pin
binding (docs/results.md, "Running the default"). Run this on two machines and compare the lines: the
first probe whose digest differs names the library and kernel that diverges (MKL's sgemm, plain and
with a transposed operand, a linear layer forward and backward, batch norm and PReLU in training,
oneDNN's convolution forward, its backward by data or by weight, the strided backward, torch's native
convolution, numpy and OpenBLAS), and the id encoder's training step shows whether that is enough to
move the stage. An AMD EPYC that reproduces the committed bytes and the Xeon that does not agree on the
forward kernels and oneDNN's convolutions and differ on the native convolution's backward and the id
encoder's gradients (docs/results.md).

    python benchmarks/cpu_fingerprint.py [--threads 2] [--out fingerprint.json]

Prints the CPU (model, AVX-512 and AMX, cache sizes), the convolution kernels oneDNN ran (its verbose
log), and one sha256 prefix per probe. A few seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import stages  # noqa: E402,F401  (the CPU pins, before numpy and torch load)


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def cpu_info() -> dict:
    """Model name, the ISA extensions that matter to the pins, and the cache sizes of CPU 0."""
    from pipelines.cpu_pins import cpu_flags

    info: dict = {"machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(
            ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info["flags"] = sorted((cpu_flags() or set()) & {"avx2", "avx512f", "avx512_bf16", "amx_tile"})
    caches = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            caches[f"L{level} {kind}"] = (d / "size").read_text().strip()
        except OSError:
            continue
    info["caches"] = caches
    return info


def probes(threads: int) -> dict[str, str]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from models.id_encoder import IRBackbone, IRConfig

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out: dict[str, str] = {}

    a, b = torch.randn(512, 384, generator=g), torch.randn(384, 256, generator=g)
    out["MKL sgemm (512x384 @ 384x256)"] = digest((a @ b).numpy())
    # the layouts a backward pass uses: an operand transposed (the gradient of a linear layer's weight
    # and input, native convolution's backward); their own generator, so that the probes after them
    # draw what they drew before these were added (their digests stay comparable)
    g2 = torch.Generator().manual_seed(1)
    at, bt = a.t().contiguous(), b.t().contiguous()
    out["MKL sgemm transposed A (A^T @ B)"] = digest((at.t() @ b).numpy())
    out["MKL sgemm transposed B (A @ B^T)"] = digest((a @ bt.t()).numpy())
    xl = torch.randn(64, 2048, generator=g2, requires_grad=True)
    wl = torch.randn(512, 2048, generator=g2, requires_grad=True)
    yl = F.linear(xl, wl)
    dxl, dwl = torch.autograd.grad(yl, (xl, wl), torch.randn(yl.shape, generator=g2))
    out["linear 2048->512, batch 64: forward"] = digest(yl.detach().numpy())
    out["linear 2048->512, batch 64: backward"] = digest(dxl.numpy(), dwl.numpy())
    xb = torch.randn(64, 32, 16, 16, generator=g2, requires_grad=True)
    bn, pr = torch.nn.BatchNorm2d(32), torch.nn.PReLU(32)
    yb = pr(bn(xb))
    gb = torch.autograd.grad(yb, (xb, bn.weight, pr.weight), torch.randn(yb.shape, generator=g2))
    out["batch norm + PReLU (training): forward"] = digest(yb.detach().numpy())
    out["batch norm + PReLU (training): backward"] = digest(*(t.numpy() for t in gb))

    x = torch.randn(16, 16, 32, 32, generator=g, requires_grad=True)
    w = torch.randn(32, 16, 3, 3, generator=g, requires_grad=True)
    for stride in (1, 2):
        y = F.conv2d(x, w, stride=stride, padding=1)
        gy = torch.randn(y.shape, generator=g)
        dx, dw = torch.autograd.grad(y, (x, w), gy)
        out[f"oneDNN conv 3x3 stride {stride} forward"] = digest(y.detach().numpy())
        out[f"oneDNN conv 3x3 stride {stride} backward data"] = digest(dx.numpy())
        out[f"oneDNN conv 3x3 stride {stride} backward weight"] = digest(dw.numpy())
    with torch.backends.mkldnn.flags(enabled=False):
        y = F.conv2d(x, w, padding=1)
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        out["native conv 3x3 (oneDNN off) forward"] = digest(y.detach().numpy())
        out["native conv 3x3 (oneDNN off) backward"] = digest(dx.numpy(), dw.numpy())
        y = F.conv2d(x, w, stride=2, padding=1)
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        out["native conv 3x3 stride 2 (oneDNN off) forward"] = digest(y.detach().numpy())
        out["native conv 3x3 stride 2 (oneDNN off) backward"] = digest(dx.numpy(), dw.numpy())

    # the primary id encoder of the embedded default, built as pipelines.id_training.train_encoder builds it
    from stages._common import load_params

    c = load_params(REPO / "params.yaml", "train_id_encoder")["train_id_encoder"]
    arch = c.primary
    cfg = IRConfig(
        c.input_size, tuple(arch.units), tuple(arch.widths), c.embedding_dim, 0.2, arch.stem_stride
    )
    for mkldnn in (True, False):
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            torch.manual_seed(arch.seed)
            m = IRBackbone(cfg)
            batch = torch.randn(
                c.batch_size, 3, c.input_size, c.input_size, generator=torch.Generator().manual_seed(1)
            )
            emb = m(batch)[0]
            emb.square().mean().backward()
            grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
            name = "id encoder step" + ("" if mkldnn else " (oneDNN off)")
            out[f"{name}: embeddings"] = digest(emb.detach().numpy())
            out[f"{name}: gradients"] = digest(grads.numpy())

    rng = np.random.default_rng(0)
    v = rng.standard_normal((256, 256))
    out["numpy exp float64"] = digest(np.exp(v))
    out["OpenBLAS dgemm (numpy 256x256)"] = digest(v @ v.T)
    return out


def onednn_kernels(threads: int) -> list[str]:
    """oneDNN's implementation per primitive kind in the probes (its verbose log, a subprocess)."""
    import subprocess

    code = f"import runpy, sys; sys.argv = ['x', '--threads', '{threads}', '--no-kernels']; runpy.run_path({__file__!r}, run_name='__main__')"
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    log = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    kinds = set()
    for line in log.splitlines():
        f = line.split(",")
        if len(f) > 7 and f[2] == "primitive" and f[3] == "exec" and f[5] == "convolution":
            kinds.add(f"{f[6]} {f[7]}")
    return sorted(kinds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch's threads (the stages' default: 2)")
    p.add_argument("--out", type=Path, help="also write the fingerprint as JSON")
    p.add_argument("--no-kernels", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="TF32 acceleration")  # torch.backends.mkldnn.flags on CPU
    if args.no_kernels:  # the subprocess of onednn_kernels: only the probes, under ONEDNN_VERBOSE
        probes(args.threads)
        return
    from pipelines.cpu_pins import pins_in_effect  # its probe turns oneDNN's verbose log off

    result = {"cpu": cpu_info(), "threads": args.threads, "problems": pins_in_effect().get("problems", [])}
    result["probes"] = probes(args.threads)
    result["onednn_convolutions"] = onednn_kernels(args.threads)
    cpu = result["cpu"]
    print(
        f"{cpu.get('model', '?')}; {' '.join(cpu.get('flags', []))}; "
        + ", ".join(f"{k} {v}" for k, v in cpu.get("caches", {}).items())
    )
    print(
        f"pins: {result['problems'] or 'no problem'}; oneDNN convolutions: {', '.join(result['onednn_convolutions'])}"
    )
    width = max(map(len, result["probes"]))
    for name, d in result["probes"].items():
        print(f"{name:<{width}}  {d}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cpu_fingerprint: {len(result['probes'])} probes on {args.threads} threads")


if __name__ == "__main__":
    main()
