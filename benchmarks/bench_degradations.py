"""Degradation throughput, one thread: our face presets against the REAL BasicSR 1.4.2 functions, a per-
operator profile of ours, every preset's rate, and Ray stream scaling.

    python benchmarks/bench_degradations.py [--n 24] [--rounds 3] [--no-profile] [--no-stream]

**Baselines** (rows skipped with a message when `basicsr` is not installed; it is not a dependency of
this project: `pip install --no-deps basicsr==1.4.2` for the benchmark only):
- `face_classic` vs GFPGAN's `FFHQDegradationDataset.__getitem__` LQ path (options/train_gfpgan_v1.yml):
  `basicsr.data.degradations.random_mixed_kernels` (iso/aniso 0.5/0.5, 41×41, σ∈[0.1, 10]),
  `cv2.filter2D`, `cv2.resize` INTER_LINEAR to (w // r, h // r), r∈[0.8, 8],
  `random_add_gaussian_noise` [0, 20], JPEG [60, 100], `cv2.resize` back, GFPGAN's colour shift
  (p 0.3, ±20/255) and gray (p 0.01), BGR→RGB, round to uint8. GFPGAN's `color_jitter_pt` (p 0.3) is
  left out: it is torchvision's `adjust_*` on tensors and torchvision is not installed here. Ours keeps its
  ColorJitter (p 0.3), so the comparison favours the baseline.
- `refldm_severe` vs ReF-LDM's `sample_degraded_image` (ldm/data/ir.py) with the severe options (iso/aniso
  0.5/0.5, 41×41, σ∈[8, 16], r∈[8, 32], noise [0, 20], JPEG [30, 100]) on float32 input as their LQ
  script feeds it (their training loader feeds uint8, which `/ 255` makes float64: slower still).
- JPEG: BasicSR's `random_add_jpg_compression` passes a float quality, which OpenCV ≥ 4.7 rejects
  ("Can't parse 'params'"); ReF-LDM's copy fixes it with `int(quality)`. Both baselines call BasicSR's
  `add_jpg_compression(img, int(np.random.uniform(lo, hi)))`, i.e. ReF-LDM's fix.
- Import: `basicsr/__init__.py` imports every submodule, several of them torchvision. The benchmark loads
  only `basicsr/data/degradations.py` by file path; its one torchvision import
  (`torchvision.transforms.functional_tensor.rgb_to_grayscale`, used by the torch-tensor noise functions,
  not on these paths) is satisfied by a shim: `sys.modules` entries for the three missing torchvision
  modules whose `rgb_to_grayscale` raises, removed again once the file is loaded. Nothing of BasicSR is
  copied into `pipelines/`.

Same synthetic faces (512² renders) for every row; each rate is images/s over `--n` images; the rows are
run interleaved for `--rounds` rounds and the median is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import statistics
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # BasicSR hands imencode a float image: a warning a call

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from pipelines import degradations as D  # noqa: E402
from pipelines.synthetic import face_spec, render  # noqa: E402

cv2.setNumThreads(1)

# ==================================================================================================
# The real BasicSR 1.4.2 functions (benchmark only)
# ==================================================================================================


def load_basicsr_degradations() -> types.ModuleType | None:
    """`basicsr/data/degradations.py` of the installed basicsr, or None (with a message) if absent."""
    spec = importlib.util.find_spec("basicsr")
    if spec is None or not spec.submodule_search_locations:
        print(
            "basicsr is not installed: BasicSR baseline rows skipped (pip install --no-deps basicsr==1.4.2)"
        )
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "degradations.py"
    # Import shim (benchmark only): the file's single torchvision import; see the module docstring.
    shim = {}
    if importlib.util.find_spec("torchvision") is None:

        def rgb_to_grayscale(*args, **kwargs):
            raise NotImplementedError(
                "torchvision shim of bench_degradations.py: not on the benchmarked path"
            )

        ft = types.ModuleType("torchvision.transforms.functional_tensor")
        ft.rgb_to_grayscale = rgb_to_grayscale
        shim = {
            "torchvision": types.ModuleType("torchvision"),
            "torchvision.transforms": types.ModuleType("torchvision.transforms"),
            "torchvision.transforms.functional_tensor": ft,
        }
    sys.modules.update(shim)
    try:
        mspec = importlib.util.spec_from_file_location("basicsr_data_degradations", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    finally:
        for name in shim:
            sys.modules.pop(name, None)
    from importlib.metadata import version

    print(f"baseline: basicsr {version('basicsr')} ({path})")
    return mod


def gfpgan_lq(bd: types.ModuleType, img_rgb: np.ndarray) -> np.ndarray:
    """GFPGAN FFHQDegradationDataset's LQ path (train_gfpgan_v1.yml) on the real BasicSR functions."""
    img = cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR).astype(np.float32) / 255.0  # imfrombytes(float32=True)
    h, w = img.shape[:2]
    kernel = bd.random_mixed_kernels(
        ["iso", "aniso"], [0.5, 0.5], 41, [0.1, 10], [0.1, 10], [-math.pi, math.pi], noise_range=None
    )
    lq = cv2.filter2D(img, -1, kernel)
    scale = np.random.uniform(0.8, 8)
    lq = cv2.resize(lq, (int(w // scale), int(h // scale)), interpolation=cv2.INTER_LINEAR)
    lq = bd.random_add_gaussian_noise(lq, [0, 20])
    lq = bd.add_jpg_compression(lq, int(np.random.uniform(60, 100)))
    lq = cv2.resize(lq, (w, h), interpolation=cv2.INTER_LINEAR)
    if np.random.uniform() < 0.3:  # GFPGAN's color_jitter (numpy), shift 20/255
        lq = np.clip(lq + np.random.uniform(-20 / 255, 20 / 255, 3).astype(np.float32), 0, 1)
    if np.random.uniform() < 0.01:  # GFPGAN's gray_prob
        lq = np.tile(cv2.cvtColor(lq, cv2.COLOR_BGR2GRAY)[:, :, None], [1, 1, 3])
    lq = cv2.cvtColor(lq, cv2.COLOR_BGR2RGB)  # img2tensor(bgr2rgb=True); color_jitter_pt left out
    return np.clip((lq * 255.0).round(), 0, 255).astype(np.uint8)


def refldm_severe_lq(bd: types.ModuleType, img_rgb: np.ndarray) -> np.ndarray:
    """ReF-LDM's `sample_degraded_image` (ldm/data/ir.py) with the severe options, float32 input."""
    lq = img_rgb.astype(np.float32)
    h, w, _ = lq.shape
    lq = cv2.cvtColor(lq, cv2.COLOR_RGB2BGR)
    lq = lq / 255
    kernel = bd.random_mixed_kernels(["iso", "aniso"], [0.5, 0.5], 41, [8, 16], [8, 16])
    lq = cv2.filter2D(lq, -1, kernel)
    scale = np.random.uniform(8, 32)
    lq = cv2.resize(lq, (int(w // scale), int(h // scale)), interpolation=cv2.INTER_LINEAR)
    lq = bd.random_add_gaussian_noise(lq, [0, 20])
    lq = bd.add_jpg_compression(lq, int(np.random.uniform(30, 100)))
    lq = cv2.resize(lq, (w, h), interpolation=cv2.INTER_LINEAR)
    lq = cv2.cvtColor(lq, cv2.COLOR_BGR2RGB)
    return np.clip((lq * 255).round(), 0, 255).astype(np.uint8)


# ==================================================================================================
# Timing
# ==================================================================================================


def faces(size: int, count: int = 4) -> list[np.ndarray]:
    return [render(face_spec(i, "album", i, 0), size, size) for i in range(count)]


def rate(fn, imgs: list[np.ndarray], n: int) -> tuple[float, float]:
    """(images/s by the wall clock, images/s by this process's CPU time) of fn(image, i), i < n, after one
    warm-up call. One thread, so CPU time is the per-core cost, less exposed to other load on the machine."""
    fn(imgs[0], 0)
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(imgs[i % len(imgs)], i)
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def balanced(n: int, kind_of) -> list:
    """The first n/2 draws of each kernel kind ("iso", "aniso") among i = 0, 1, ...: the recipes' 50/50
    mix exactly. The 2-D blur of an anisotropic kernel costs ~10x the separable one, so a small sample
    that is not balanced would tilt the rate (the first 24 keys hold only 8 anisotropic draws)."""
    got: dict[str, list] = {"iso": [], "aniso": []}
    i = 0
    while min(len(v) for v in got.values()) < n // 2:
        k = kind_of(i)
        if len(got[k]) < n // 2:
            got[k].append(i)
        i += 1
    return sorted(got["iso"] + got["aniso"])


def ours(name: str, n: int):
    preset, tiny = D.PRESETS[name], np.zeros((16, 16, 3), np.uint8)
    keys = [f"k{i}" for i in balanced(n, lambda i: preset(tiny, D.sample_rng(0, f"k{i}", 0))[1]["kernel"])]
    return lambda img, i: preset(img, D.sample_rng(0, keys[i], 0))


def theirs(fn, bd, n: int):
    def kind_of(i):  # random_mixed_kernels' first draw: random.choices(kernel_list, kernel_prob)
        random.seed(i)
        return random.choices(["iso", "aniso"], [0.5, 0.5])[0]

    seeds = balanced(n, kind_of)

    def run(img, i):
        np.random.seed(seeds[i])  # BasicSR draws from the global numpy and `random` generators
        random.seed(seeds[i])
        return fn(bd, img)

    return run


def interleaved(rows: dict, imgs: list[np.ndarray], n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) images/s of each row, the rows run one after the other in each of `rounds` rounds."""
    got = defaultdict(list)
    for _ in range(rounds):
        for name, fn in rows.items():
            got[name].append(rate(fn, imgs, n))
    return {name: tuple(statistics.median(x) for x in zip(*v, strict=True)) for name, v in got.items()}


# ==================================================================================================
# Per-operator profile of ours
# ==================================================================================================

# Module-level operators of pipelines.degradations -> profile label. Times are exclusive (a child's
# time is not counted in its caller), so the shares add up to the total.
OPS = {
    "isotropic_gaussian_kernel": "blur kernel build",
    "anisotropic_gaussian_kernel": "blur kernel build",
    "filter2d": "blur: separability check (SVD) + glue",
    "resize": "resize",
    "gaussian_noise": "noise",
    "jpeg": "JPEG encode/decode",
    "color_jitter": "colour: ColorJitter",
    "gfpgan_colour": "colour: shift/gray + glue",
    "_to_float": "dtype conversion",
    "_to_u8": "dtype conversion",
}
CV2_OPS = {"sepFilter2D": "blur: cv2.sepFilter2D (separable)", "filter2D": "blur: cv2.filter2D (2-D)"}


def profile(name: str, imgs: list[np.ndarray], n: int) -> tuple[float, dict[str, float]]:
    """(ms per image, {label: ms per image}) of preset `name`, by wrapping the module's operators; process
    CPU time (one thread), so that other load on the machine does not land in whichever op it interrupts."""
    spent: dict[str, float] = defaultdict(float)
    stack: list[float] = []  # child time accumulated by the frames on the call stack

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            stack.append(0.0)
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.process_time() - t
                child = stack.pop()
                lab = label
                if label == "resize":  # down or back, told apart by the output size
                    lab = "resize down" if args[1] < args[0].shape[0] else "resize back"
                spent[lab] += dt - child
                if stack:
                    stack[-1] += dt

        return wrapper

    saved = {k: getattr(D, k) for k in OPS}
    real_cv2 = D.cv2
    proxy = types.SimpleNamespace(
        **{k: getattr(real_cv2, k) for k in dir(real_cv2) if not k.startswith("__")}
    )
    for k, label in CV2_OPS.items():
        setattr(proxy, k, timed(label, getattr(real_cv2, k)))
    try:
        for k, label in OPS.items():
            setattr(D, k, timed(label, saved[k]))
        D.cv2 = proxy
        run = ours(name, n)  # the presets look the operators up at call time
        run(imgs[0], 0)
        spent.clear()
        t = time.process_time()
        for i in range(n):
            run(imgs[i % len(imgs)], i)
        total = time.process_time() - t
    finally:
        for k, f in saved.items():
            setattr(D, k, f)
        D.cv2 = real_cv2
    out = {k: v / n * 1000 for k, v in spent.items()}
    out["other (RNG draws, Python glue)"] = total / n * 1000 - sum(out.values())
    return total / n * 1000, out


def print_profile(name: str, imgs: list[np.ndarray], n: int) -> None:
    total, ops = profile(name, imgs, n)
    print(f"--- profile of ours: {name}, 512², one thread, {n} images: {total:.2f} ms/image (CPU time) ---")
    for label, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {ms:7.2f} ms  {100 * ms / total:5.1f} %")


# ==================================================================================================
# Proposal (not used by the package): the 2-D blur as one float64 FFT
# ==================================================================================================


def fft_filter2d_f64(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D's correlation (reflect-101 borders) as one float64 FFT over the whole image, all
    channels at once, cast to float32. OpenCV's DFT path computes the same sum in float64 too (256² tiles,
    one channel at a time, its own slower float64 DFT), so the two differ only where the float64 results,
    ~1e-16 apart, fall on opposite sides of a float32 rounding boundary."""
    import scipy.fft as sf

    kh, kw = kernel.shape
    h, w = img.shape[:2]
    pad = cv2.copyMakeBorder(img, kh // 2, kh // 2, kw // 2, kw // 2, cv2.BORDER_REFLECT_101)
    size = (sf.next_fast_len(pad.shape[0], real=True), sf.next_fast_len(pad.shape[1], real=True))
    spec = sf.rfft2(pad.astype(np.float64), s=size, axes=(0, 1), workers=1)
    spec *= sf.rfft2(kernel[::-1, ::-1].astype(np.float64), s=size, workers=1)[..., None]
    out = sf.irfft2(spec, s=size, axes=(0, 1), workers=1)
    return out[kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w].astype(np.float32)


def proposal_figures(imgs: list[np.ndarray], n: int, rounds: int, bd) -> None:
    """What replacing the 2-D `cv2.filter2D` of `filter2d` by `fft_filter2d_f64` would change: blurred
    float32 values, preset output bytes (anisotropic draws only: the iso ones do not take that path),
    and the rates against BasicSR."""
    rng = np.random.default_rng(0)
    floats = [D._to_float(x) for x in imgs]
    diff = total = 0
    t_cv = t_fft = 0.0
    for i in range(n):
        lo, hi = ((0.1, 10.0), (8.0, 16.0))[i % 2]  # face_classic's and refldm_severe's σ ranges
        k = D.anisotropic_gaussian_kernel(
            41, rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(-3.14, 3.14)
        )
        x = floats[i % len(floats)]
        c = time.process_time()
        a = cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REFLECT_101)
        t_cv += time.process_time() - c
        c = time.process_time()
        b = fft_filter2d_f64(x, k)
        t_fft += time.process_time() - c
        diff += int(np.count_nonzero(a != b))
        total += a.size
    print(f"--- proposal: 2-D blur as one float64 FFT ({n} anisotropic 41×41 kernels, 512²) ---")
    print(
        f"blurred float32 values differing from cv2.filter2D: {diff} of {total}; CPU ms per call: "
        f"cv2.filter2D {t_cv / n * 1000:.1f}, float64 FFT {t_fft / n * 1000:.1f}"
    )
    real_cv2 = D.cv2
    proxy = types.SimpleNamespace(
        **{k: getattr(real_cv2, k) for k in dir(real_cv2) if not k.startswith("__")}
    )
    proxy.filter2D = lambda x, ddepth, kernel, borderType: fft_filter2d_f64(x, kernel)
    for name in ("face_classic", "refldm_severe"):
        preset, tiny = D.PRESETS[name], np.zeros((16, 16, 3), np.uint8)
        keys = [
            f"k{i}" for i in range(4 * n) if preset(tiny, D.sample_rng(0, f"k{i}", 0))[1]["kernel"] == "aniso"
        ]
        keys = keys[:n]
        old = [preset(imgs[i % len(imgs)], D.sample_rng(0, k, 0))[0] for i, k in enumerate(keys)]
        D.cv2 = proxy
        try:
            new = [preset(imgs[i % len(imgs)], D.sample_rng(0, k, 0))[0] for i, k in enumerate(keys)]
            rows = {name: ours(name, n)}
            if bd is not None:  # BasicSR calls cv2 itself: the patch of D.cv2 does not reach it
                rows["BasicSR"] = theirs(
                    {"face_classic": gfpgan_lq, "refldm_severe": refldm_severe_lq}[name], bd, n
                )
            med = interleaved(rows, imgs, n, rounds)
        finally:
            D.cv2 = real_cv2
        bad = [(a, b) for a, b in zip(old, new, strict=True) if not np.array_equal(a, b)]
        line = f"{name}: {len(bad)} of {len(keys)} anisotropic outputs differ"
        if bad:
            d = np.concatenate([(a.astype(np.int16) - b).ravel() for a, b in bad])
            mse = float(np.mean(d.astype(np.float64) ** 2))
            line += (
                f" ({np.count_nonzero(d)} bytes, max |diff| {np.abs(d).max()}, PSNR over them "
                f"{10 * math.log10(255**2 / mse):.1f} dB)"
            )
        print(line)
        fast = med[name]
        line = f"  {name} with the proposal: {fast[0]:.1f} | {fast[1]:.1f} images/s (wall | CPU)"
        if "BasicSR" in med:
            base = med["BasicSR"]
            line += f", BasicSR {base[0]:.1f} | {base[1]:.1f}: {fast[0] / base[0]:.2f}x | {fast[1] / base[1]:.2f}x"
        print(line)


# ==================================================================================================
# Ray stream
# ==================================================================================================


def stream_figures(n_samples: int = 512) -> None:
    import ray

    from pipelines.images import png_bytes
    from pipelines.shards import npy_bytes, write_split
    from pipelines.stream import DegradationStream

    with tempfile.TemporaryDirectory() as d:
        pngs = [png_bytes(render(face_spec(1, "album", i, 0), 128, 64)) for i in range(32)]

        def samples():
            for i in range(n_samples):
                yield {
                    "__key__": f"s{i:05d}",
                    "gt.png": pngs[i % 32],
                    "ref0.png": pngs[(i + 1) % 32],
                    "meta.json": b'{"ref_count": 1}',
                    "gt_emb.npy": npy_bytes(np.zeros(4, np.float32)),
                    "ref_emb.npy": npy_bytes(np.zeros((1, 4), np.float32)),
                }

        paths = [str(Path(d) / e["name"]) for e in write_split(Path(d), "train", samples(), 128)]
        results = {}
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            s = DegradationStream(paths, "realesrgan", 0, batch_size=16, max_in_flight=2 * workers)
            list(s.epoch(99))  # warm the workers
            t = time.perf_counter()
            n = sum(len(b["keys"]) for b in s.epoch(0))
            dt = time.perf_counter() - t
            results[workers] = (n / dt, s.stats["wait_s"] / max(s.stats["batches"], 1))
            ray.shutdown()
        r1, r2 = results[1][0], results[2][0]
        print(
            f"stream realesrgan 64 px: 1 worker {r1:7.1f} samples/s, 2 workers {r2:7.1f} samples/s, "
            f"scaling efficiency {r2 / (2 * r1):.2f}"
        )
        for w, (_, wait) in results.items():
            print(
                f"  consumer wait per batch of 16 (consuming as fast as it can), {w} worker(s): {wait * 1000:.1f} ms"
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=24, help="images per rate measurement (even)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--no-presets", action="store_true", help="skip the rate of every preset")
    p.add_argument("--proposal", action="store_true", help="measure the float64-FFT 2-D blur proposal")
    args = p.parse_args()
    imgs = faces(512)
    bd = load_basicsr_degradations()
    n = args.n
    rows = {"face_classic": ours("face_classic", n), "refldm_severe": ours("refldm_severe", n)}
    if bd is not None:
        rows["BasicSR GFPGAN"] = theirs(gfpgan_lq, bd, n)
        rows["BasicSR ReF-LDM severe"] = theirs(refldm_severe_lq, bd, n)
    med = interleaved(rows, imgs, n, args.rounds)
    print(
        f"--- 512², one thread, {n} images (half iso, half aniso kernels) × {args.rounds} interleaved "
        "rounds, median images/s (wall clock | process CPU time) ---"
    )
    for o, b in (("face_classic", "BasicSR GFPGAN"), ("refldm_severe", "BasicSR ReF-LDM severe")):
        line = f"{o:14s} ours {med[o][0]:6.1f} | {med[o][1]:6.1f}"
        if b in med:
            line += (
                f"   {b:22s} {med[b][0]:6.1f} | {med[b][1]:6.1f}   ratio "
                f"{med[o][0] / med[b][0]:.2f}x | {med[o][1] / med[b][1]:.2f}x"
            )
        print(line)
    if not args.no_profile:
        for name in ("face_classic", "refldm_severe"):
            print_profile(name, imgs, 2 * args.n)
    if args.proposal:
        proposal_figures(imgs, args.n, args.rounds, bd)
    if not args.no_presets:
        for size in (512, 64):
            small = imgs if size == 512 else faces(size)
            n = args.n if size == 512 else args.n * 10
            print(f"--- every preset, {size}x{size}, one thread ---")
            for name in D.PRESETS:
                preset = D.PRESETS[name]
                wall, cpu = rate(lambda x, i, p=preset: p(x, D.sample_rng(0, f"k{i}", 0)), small, n)
                print(f"{name:16s} {wall:8.1f} images/s (CPU time: {cpu:8.1f})")
    if not args.no_stream:
        stream_figures()


if __name__ == "__main__":
    main()
