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


def rate(fn, imgs: list[np.ndarray], n: int) -> float:
    """Images/s of fn(image, i) over n images (after one warm-up call)."""
    fn(imgs[0], -1)
    t = time.perf_counter()
    for i in range(n):
        fn(imgs[i % len(imgs)], i)
    return n / (time.perf_counter() - t)


def ours(name: str):
    preset = D.PRESETS[name]
    return lambda img, i: preset(img, D.sample_rng(0, f"k{i}", 0))


def theirs(fn, bd):
    def run(img, i):
        np.random.seed(i & 0xFFFFFFFF)  # BasicSR draws from the global numpy and `random` generators
        random.seed(i)
        return fn(bd, img)

    return run


def interleaved(rows: dict, imgs: list[np.ndarray], n: int, rounds: int) -> dict[str, float]:
    """Median images/s of each row, the rows run one after the other in each of `rounds` rounds."""
    got = defaultdict(list)
    for _ in range(rounds):
        for name, fn in rows.items():
            got[name].append(rate(fn, imgs, n))
    return {name: statistics.median(v) for name, v in got.items()}


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
    """(ms per image, {label: ms per image}) of preset `name`, by wrapping the module's operators."""
    spent: dict[str, float] = defaultdict(float)
    stack: list[float] = []  # child time accumulated by the frames on the call stack

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
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
        preset = D.PRESETS[name]  # the lambdas look the operators up at call time
        preset(imgs[0], D.sample_rng(0, "warm", 0))
        spent.clear()
        t = time.perf_counter()
        for i in range(n):
            preset(imgs[i % len(imgs)], D.sample_rng(0, f"k{i}", 0))
        total = time.perf_counter() - t
    finally:
        for k, f in saved.items():
            setattr(D, k, f)
        D.cv2 = real_cv2
    out = {k: v / n * 1000 for k, v in spent.items()}
    out["other (RNG draws, Python glue)"] = total / n * 1000 - sum(out.values())
    return total / n * 1000, out


def print_profile(name: str, imgs: list[np.ndarray], n: int) -> None:
    total, ops = profile(name, imgs, n)
    print(f"--- profile of ours: {name}, 512², one thread, {n} images: {total:.2f} ms/image ---")
    for label, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {ms:7.2f} ms  {100 * ms / total:5.1f} %")


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
    p.add_argument("--n", type=int, default=24, help="images per rate measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--no-presets", action="store_true", help="skip the rate of every preset")
    args = p.parse_args()
    if hasattr(cv2.utils, "logging"):  # BasicSR hands imencode a float image: one warning per call
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    imgs = faces(512)
    bd = load_basicsr_degradations()
    rows = {"face_classic": ours("face_classic"), "refldm_severe": ours("refldm_severe")}
    if bd is not None:
        rows["BasicSR GFPGAN"] = theirs(gfpgan_lq, bd)
        rows["BasicSR ReF-LDM severe"] = theirs(refldm_severe_lq, bd)
    med = interleaved(rows, imgs, args.n, args.rounds)
    print(f"--- 512², one thread, {args.n} images × {args.rounds} interleaved rounds, median images/s ---")
    for o, b in (("face_classic", "BasicSR GFPGAN"), ("refldm_severe", "BasicSR ReF-LDM severe")):
        if b in med:
            print(f"{o:14s} ours {med[o]:6.1f}   {b:24s} {med[b]:6.1f}   ratio {med[o] / med[b]:.2f}x")
        else:
            print(f"{o:14s} ours {med[o]:6.1f}")
    if not args.no_profile:
        for name in ("face_classic", "refldm_severe"):
            print_profile(name, imgs, 2 * args.n)
    if not args.no_presets:
        for size in (512, 64):
            small = imgs if size == 512 else faces(size)
            n = args.n if size == 512 else args.n * 10
            print(f"--- every preset, {size}x{size}, one thread ---")
            for name in D.PRESETS:
                print(f"{name:16s} {rate(ours(name), small, n):8.1f} images/s")
    if not args.no_stream:
        stream_figures()


if __name__ == "__main__":
    main()
