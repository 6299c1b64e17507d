"""Degradation operators and the named presets of the field.

Images are float32 (H, W, 3) RGB in [0, 1] between operators and uint8 at the ends. Every random
draw comes from a `numpy.random.Generator` built from (global seed, sample key, epoch) by
`sample_rng`, so the same triple gives byte-identical output on any worker and any machine.

**Operators** written here (each tested against its formula in tests/test_degradations.py): the blur
kernels of Real-ESRGAN (Wang et al. 2021, eqs. 2–4 and the sinc filter of eq. 8): isotropic and
anisotropic Gaussian, generalized Gaussian exp(−½(xᵀΣ⁻¹x)^β), plateau 1/(1+(xᵀΣ⁻¹x)^β), and the 2-D
sinc ω_c·J₁(ω_c r)/(2πr); resizing; Gaussian noise (colour or gray); Poisson noise (BasicSR's
`random_add_poisson_noise`). From albumentations 2.0.8, which matches the recipes exactly: JPEG
(`ImageCompression`, libjpeg, integer quality) and colour jitter (`ColorJitter`, GFPGAN's
`color_jitter_pt`, used by `face_classic` with GFPGAN's shift jitter and grayscale).

**Resolution.** The published parameters are for 512² images. At another size S every spatial
parameter (blur σ, kernel size, downscale factor) is multiplied by S/512 (factors clamped at 1,
kernels at 3 px), so a degradation removes the same fraction of the face at any resolution. Noise
levels and JPEG qualities are not spatial and stay as published.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
from scipy import special

REFERENCE_SIZE = 512
_INTERP = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}

# ==================================================================================================
# Seeding
# ==================================================================================================


def sample_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    """The generator of one draw: a pure function of (global seed, sample key, epoch).

    The key is hashed with CRC-32 (stable across processes and machines, unlike `hash`).
    """
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(key.encode()), epoch & 0xFFFFFFFF])


# ==================================================================================================
# Blur kernels (Real-ESRGAN, eqs. 2–4, 8)
# ==================================================================================================


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size % 2 == 0 or size < 1:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    r = np.arange(size, dtype=np.float64) - size // 2
    return np.meshgrid(r, r)  # (k, k) x to the right, y down


def _quadratic(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """xᵀ Σ⁻¹ x on the kernel grid, Σ = R diag(σx², σy²) Rᵀ with R the rotation by θ."""
    x, y = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u = c * x + s * y  # coordinates along the kernel's principal axes
    v = -s * x + c * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalise(k: np.ndarray) -> np.ndarray:
    return (k / k.sum()).astype(np.float32)


def isotropic_gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """k(x) ∝ exp(−|x|²/(2σ²)), summing to 1. (k, k) float32."""
    return anisotropic_gaussian_kernel(size, sigma, sigma, 0.0)


def anisotropic_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """k(x) ∝ exp(−½ xᵀΣ⁻¹x) with principal σ's and rotation θ (Real-ESRGAN eq. 2)."""
    return _normalise(np.exp(-0.5 * _quadratic(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """k(x) ∝ exp(−½ (xᵀΣ⁻¹x)^β) (Real-ESRGAN eq. 3); β = 1 is the Gaussian."""
    return _normalise(np.exp(-0.5 * _quadratic(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """k(x) ∝ 1 / (1 + (xᵀΣ⁻¹x)^β) (Real-ESRGAN eq. 4): flat top, heavy tail."""
    return _normalise(1.0 / (1.0 + _quadratic(size, sigma_x, sigma_y, theta) ** beta))


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Ideal circular low-pass k(r) = ω_c J₁(ω_c r) / (2π r), k(0) = ω_c²/(4π) (Real-ESRGAN eq. 8).

    Normalised to sum 1 (the continuous filter has unit DC gain; the truncated one nearly so).
    """
    x, y = _grid(size)
    r = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * special.j1(omega_c * r) / (2 * math.pi * r)
    k[size // 2, size // 2] = omega_c**2 / (4 * math.pi)
    return _normalise(k)


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve every channel with `kernel` (reflect-101 borders, as BasicSR's filter2D).

    A separable kernel (rank 1: isotropic or axis-aligned Gaussians, half of the classic face recipes'
    41×41 blurs) runs as two 1-D passes (ours), O(k) instead of O(k²) per pixel; the result equals the
    2-D convolution up to float rounding. Any other kernel goes to `cv2.filter2D`, which for k² ≥ 130
    (float32) takes OpenCV's DFT path (`crossCorr`: float64 DFTs of 256² tiles, channel by channel): at
    512² that one call is ~90 % of a `refldm_severe` image with an anisotropic kernel. BasicSR calls
    `cv2.filter2D` for every kernel. See benchmarks/bench_degradations.py for the per-op profile.
    """
    if kernel.shape[0] >= 7:
        u, sv, vt = np.linalg.svd(kernel.astype(np.float64))
        if sv[1] <= 1e-7 * sv[0]:
            col = (u[:, 0] * math.sqrt(sv[0])).astype(np.float32)
            row = (vt[0] * math.sqrt(sv[0])).astype(np.float32)
            return cv2.sepFilter2D(img, -1, row, col, borderType=cv2.BORDER_REFLECT_101)
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


# ==================================================================================================
# Other operators
# ==================================================================================================


def resize(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize to (height, width) with `mode` in area | bilinear | bicubic."""
    if mode not in _INTERP:
        raise ValueError(f"unknown resize mode {mode!r}; valid: {', '.join(_INTERP)}")
    height, width = max(1, int(round(height))), max(1, int(round(width)))
    if img.shape[0] == height and img.shape[1] == width:
        return img
    # cv2's INTER_AREA only averages when shrinking; when enlarging it behaves as bilinear.
    return cv2.resize(img, (width, height), interpolation=_INTERP[mode])


def gaussian_noise(img: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """img + n, n ~ N(0, (σ/255)²) per pixel; `gray` uses one noise map for all channels. Clipped to [0, 1].

    The draws are float64 standard normals cast to float32 (kept as they are: the stream of a seed).
    """
    h, w, c = img.shape
    n = rng.standard_normal((h, w, 1) if gray else (h, w, c)).astype(np.float32)
    n *= sigma / 255.0  # in place (ours): the same float32 products as `n * (sigma / 255.0)`
    if gray:
        n = img + n
    else:
        n += img
    return np.clip(n, 0.0, 1.0, out=n)


def poisson_noise(img: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """BasicSR's Poisson noise: quantise to v = 2^⌈log2(#levels)⌉ levels, draw Poisson(img·v)/v, and add
    `scale` times the difference. `gray` draws it on the luminance only."""
    src = img.mean(axis=2, keepdims=True) if gray else img
    q8 = np.clip(np.round(src * 255.0), 0, 255).astype(np.uint8)
    levels = int(np.count_nonzero(np.bincount(q8.ravel(), minlength=256)))  # = len(np.unique), O(n)
    q = q8.astype(np.float32) / 255.0
    v = 2 ** math.ceil(math.log2(max(levels, 2)))
    noisy = rng.poisson(q * v).astype(np.float32) / v
    return np.clip(img + (noisy - q).astype(np.float32) * scale, 0.0, 1.0)


_JPEG = A.ImageCompression(p=1.0)
_JITTER = A.ColorJitter(p=1.0)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip at integer `quality` (albumentations ImageCompression: libjpeg via OpenCV)."""
    return _to_float(_JPEG.apply(_to_u8(img), quality=int(quality), image_type=".jpg"))


def color_jitter(
    img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float, order: list[int]
) -> np.ndarray:
    """Colour jitter with explicit factors (albumentations ColorJitter)."""
    return _JITTER.apply(
        img, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, order=order
    )


# ==================================================================================================
# Random kernels (Real-ESRGAN's `random_mixed_kernels`)
# ==================================================================================================

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
REALESRGAN_KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


def random_kernel(
    rng: np.random.Generator,
    size: int,
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float] = (0.5, 4.0),
    betap_range: tuple[float, float] = (1.0, 2.0),
    probs: tuple[float, ...] = REALESRGAN_KERNEL_PROBS,
    log: dict | None = None,
) -> np.ndarray:
    """A kernel of a random type (probabilities over KERNEL_TYPES) with random σ's, θ and β."""
    kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=np.asarray(probs) / sum(probs)))]
    sx = float(rng.uniform(*sigma_range))
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sy = sx if iso else float(rng.uniform(*sigma_range))
    theta = 0.0 if iso else float(rng.uniform(-math.pi, math.pi))
    if kind in ("iso", "aniso"):
        k, beta = anisotropic_gaussian_kernel(size, sx, sy, theta), None
    elif kind.startswith("generalized"):
        beta = (
            float(rng.uniform(*betag_range))
            if rng.uniform() < 0.5
            else float(rng.uniform(betag_range[0], 1.0))
        )
        k = generalized_gaussian_kernel(size, sx, sy, theta, beta)
    else:
        beta = float(rng.uniform(*betap_range))
        k = plateau_kernel(size, sx, sy, theta, beta)
    if log is not None:
        log.update({"kernel": kind, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta, "beta": beta})
    return k


def _odd(x: float, lo: int = 3) -> int:
    k = max(lo, int(round(x)))
    return k if k % 2 else k + 1


# ==================================================================================================
# Presets
# ==================================================================================================


@dataclass(frozen=True)
class Degraded:
    image: np.ndarray  # (H, W, 3) uint8, same size as the input
    params: dict  # what was drawn, for logging


Preset = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict]]


def _to_float(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 x / 255 (the division in place: one array fewer than `astype(...) / 255.0`)."""
    out = img.astype(np.float32)
    out /= 255.0
    return out


def _to_u8(img: np.ndarray) -> np.ndarray:
    """float -> uint8 round(255·clip(x, 0, 1)), rounding half to even.

    Ours: cv2.convertScaleAbs (multiply by 255 in float32, round half to even, saturate) after the clip
    gives the same bytes as `np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)` for every non-NaN float32
    (checked for all 1,065,353,217 float32 values in [0, 1]; below 0 and above 1 both saturate) in two
    passes instead of four. Its absolute value is never reached: the clip comes first. Other dtypes take
    the numpy formula (OpenCV would scale a float64 in float32).
    """
    if img.dtype != np.float32:
        return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return cv2.convertScaleAbs(np.clip(img, 0.0, 1.0), alpha=255.0).reshape(img.shape)


def _noise(img, rng, gauss_prob, gauss_range, poisson_range, gray_prob, log):
    gray = bool(rng.uniform() < gray_prob)
    if rng.uniform() < gauss_prob:
        s = float(rng.uniform(*gauss_range))
        log.update({"noise": "gaussian", "sigma": s, "gray": gray})
        return gaussian_noise(img, s, gray, rng)
    s = float(rng.uniform(*poisson_range))
    log.update({"noise": "poisson", "scale": s, "gray": gray})
    return poisson_noise(img, s, gray, rng)


def _sinc_or_kernel(img, rng, f, sigma_range, sinc_prob, log):
    size = _odd(rng.choice(np.arange(7, 22, 2)) * f)
    if rng.uniform() < sinc_prob:
        omega = float(rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi))
        log.update({"kernel": "sinc", "size": size, "omega_c": omega})
        return filter2d(img, sinc_kernel(size, omega))
    return filter2d(img, random_kernel(rng, size, (sigma_range[0] * f, sigma_range[1] * f), log=log))


def _random_resize(img, rng, probs, down_range, up_max, h0, w0, log):
    kind = ("up", "down", "keep")[int(rng.choice(3, p=probs))]
    s = (
        float(rng.uniform(1.0, up_max))
        if kind == "up"
        else float(rng.uniform(*down_range))
        if kind == "down"
        else 1.0
    )
    mode = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
    log.update({"resize": kind, "scale": s, "mode": mode})
    h, w = img.shape[:2]
    return resize(img, h * s, w * s, mode)


def realesrgan(
    img_u8: np.ndarray, rng: np.random.Generator, strength: float | None = None
) -> tuple[np.ndarray, dict]:
    """Real-ESRGAN's second-order degradation (BasicSR `RealESRGANDataset` + `RealESRGANModel`).

    Stage 1: blur (kernel 7–21, mixed types, σ∈[0.2, 3], sinc p=0.1) → resize (up/down/keep
    0.2/0.7/0.1 over [0.15, 1.5]) → Gaussian σ∈[1, 30] (p=0.5) or Poisson [0.05, 3], gray p=0.4 →
    JPEG [30, 95]. Stage 2: blur p=0.8 (σ∈[0.2, 1.5]) → resize (0.3/0.4/0.3 over [0.3, 1.2]) → noise
    (σ∈[1, 25] / [0.05, 2.5]) → in random order {resize back + sinc (p=0.8), JPEG [30, 95]}.
    Restoration keeps the size: the final resize returns to the input size (scale 1).
    `strength` (0–16, iconface_mixed) scales σ's, noise and JPEG damage linearly with strength/16.
    """
    h0, w0 = img_u8.shape[:2]
    f = h0 / REFERENCE_SIZE
    t = 1.0 if strength is None else strength / 16.0
    img = _to_float(img_u8)
    log: dict = {"preset": "realesrgan", "stage1": {}, "stage2": {}}
    l1, l2 = log["stage1"], log["stage2"]
    img = _sinc_or_kernel(img, rng, f, (0.2, 0.2 + 2.8 * t), 0.1, l1)
    img = _random_resize(img, rng, [0.2, 0.7, 0.1], (1 - 0.85 * t, 1.0), 1.5, h0, w0, l1)
    img = _noise(img, rng, 0.5, (1, 1 + 29 * t), (0.05, 0.05 + 2.95 * t), 0.4, l1)
    q1 = int(rng.integers(round(95 - 65 * t), 96))
    l1["jpeg"] = q1
    img = jpeg(img, q1)
    if rng.uniform() < 0.8:
        img = _sinc_or_kernel(img, rng, f, (0.2, 0.2 + 1.3 * t), 0.1, l2)
    img = _random_resize(img, rng, [0.3, 0.4, 0.3], (1 - 0.7 * t, 1.0), 1.2, h0, w0, l2)
    img = _noise(img, rng, 0.5, (1, 1 + 24 * t), (0.05, 0.05 + 2.45 * t), 0.4, l2)
    q2 = int(rng.integers(round(95 - 65 * t), 96))
    sinc_final = rng.uniform() < 0.8
    omega = float(rng.uniform(math.pi / 3, math.pi))
    mode = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
    jpeg_first = bool(rng.uniform() < 0.5)
    l2.update(
        {
            "jpeg": q2,
            "final_sinc": bool(sinc_final),
            "omega_c": omega,
            "final_mode": mode,
            "jpeg_first": jpeg_first,
        }
    )

    def back(x):
        x = resize(x, h0, w0, mode)
        return filter2d(x, sinc_kernel(_odd(21 * f), omega)) if sinc_final else x

    img = back(jpeg(img, q2)) if jpeg_first else jpeg(back(img), q2)
    return _to_u8(img), log


def bsrgan(
    img_u8: np.ndarray, rng: np.random.Generator, strength: float | None = None
) -> tuple[np.ndarray, dict]:
    """BSRGAN's degradation (Zhang et al. 2021, `degradation_bsrgan`), restoration variant.

    Shuffled order of: blur ×2 (isotropic, kernel 2·U{2..11}+3, σ∈[0.1, 2.8], or anisotropic with
    σ's ∈[0.5, 8]·0.5 and random θ), downsampling (factor 1–4 at 512², random interpolation), Gaussian
    noise σ∈[2, 25] (colour, gray or channel-correlated), JPEG [30, 95]; then a final JPEG [30, 95] and
    a resize back to the input size.
    """
    h0, w0 = img_u8.shape[:2]
    f = h0 / REFERENCE_SIZE
    t = 1.0 if strength is None else strength / 16.0
    img = _to_float(img_u8)
    log: dict = {"preset": "bsrgan", "ops": []}
    ops = ["blur", "blur", "down", "noise", "jpeg"]
    order = [ops[i] for i in rng.permutation(len(ops))]
    for op in order:
        entry: dict = {"op": op}
        if op == "blur":
            size = _odd((2 * int(rng.integers(2, 12)) + 3) * f)
            if rng.uniform() < 0.5:
                s = float(rng.uniform(0.1, 0.1 + 2.7 * t)) * f
                k = isotropic_gaussian_kernel(size, max(s, 1e-3))
                entry.update({"kernel": "iso", "size": size, "sigma": s})
            else:
                sx, sy = (float(rng.uniform(0.25, 0.25 + 3.75 * t)) * f for _ in range(2))
                th = float(rng.uniform(-math.pi, math.pi))
                k = anisotropic_gaussian_kernel(size, max(sx, 1e-3), max(sy, 1e-3), th)
                entry.update({"kernel": "aniso", "size": size, "sigma_x": sx, "sigma_y": sy, "theta": th})
            img = filter2d(img, k)
        elif op == "down":
            r = max(1.0, float(rng.uniform(1.0, 1.0 + 3.0 * t)) * 4 * f)
            mode = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
            img = resize(img, h0 / r, w0 / r, mode)
            entry.update({"factor": r, "mode": mode})
        elif op == "noise":
            s = float(rng.uniform(2, 2 + 23 * t))
            kind = ("colour", "gray", "correlated")[int(rng.integers(3))]
            if kind == "correlated":
                a = rng.standard_normal((3, 3))
                cov = a @ a.T
                cov /= np.trace(cov) / 3
                n = rng.multivariate_normal(np.zeros(3), cov * (s / 255) ** 2, size=img.shape[:2]).astype(
                    np.float32
                )
                img = np.clip(img + n, 0, 1)
            else:
                img = gaussian_noise(img, s, kind == "gray", rng)
            entry.update({"sigma": s, "kind": kind})
        else:
            q = int(rng.integers(round(95 - 65 * t), 96))
            img = jpeg(img, q)
            entry["quality"] = q
        log["ops"].append(entry)
    q = int(rng.integers(round(95 - 65 * t), 96))
    img = jpeg(img, q)
    mode = ("bilinear", "bicubic")[int(rng.integers(2))]
    img = resize(img, h0, w0, mode)
    log.update({"final_jpeg": q, "final_mode": mode})
    return _to_u8(img), log


def classic(
    img_u8: np.ndarray,
    rng: np.random.Generator,
    sigma: tuple[float, float],
    down: tuple[float, float],
    noise: tuple[float, float],
    quality: tuple[int, int],
    name: str,
    kernel_size: int = 41,
) -> tuple[np.ndarray, dict]:
    """The GFPGAN-family face recipe: y = [(x ⊛ k_σ)↓r + n_δ]_JPEG_q ↑r.

    41×41 isotropic or anisotropic (p = 0.5 each) Gaussian blur with σ in `sigma`, bilinear downscale by
    r in `down`, Gaussian noise δ in `noise` (/255), JPEG quality q in `quality`, bilinear upscale back.
    """
    h0, w0 = img_u8.shape[:2]
    f = h0 / REFERENCE_SIZE
    img = _to_float(img_u8)
    size = _odd(kernel_size * f)
    s = float(rng.uniform(*sigma))
    if rng.uniform() < 0.5:
        k = isotropic_gaussian_kernel(size, max(s * f, 1e-3))
        kinfo = {"kernel": "iso", "sigma": s}
    else:
        s2 = float(rng.uniform(*sigma))
        th = float(rng.uniform(-math.pi, math.pi))
        k = anisotropic_gaussian_kernel(size, max(s * f, 1e-3), max(s2 * f, 1e-3), th)
        kinfo = {"kernel": "aniso", "sigma": s, "sigma_y": s2, "theta": th}
    img = filter2d(img, k)
    r = float(rng.uniform(*down))
    r_eff = max(1.0, r * f)
    img = resize(img, h0 / r_eff, w0 / r_eff, "bilinear")
    n = float(rng.uniform(*noise))
    img = gaussian_noise(img, n, False, rng)
    q = int(rng.integers(quality[0], quality[1] + 1))
    img = jpeg(img, q)
    img = resize(img, h0, w0, "bilinear")
    return _to_u8(img), {
        "preset": name,
        **kinfo,
        "kernel_size": size,
        "down": r,
        "down_effective": r_eff,
        "noise": n,
        "jpeg": q,
    }


# GFPGAN options/train_gfpgan_v1.yml: color_jitter_prob 0.3 with color_jitter_shift 20 (a per-channel
# shift of up to 20/255), color_jitter_pt_prob 0.3 (brightness 0.5, contrast 0.5, saturation 0.5,
# hue 0.1, in random order), gray_prob 0.01; applied to the degraded image only.
GFPGAN_COLOUR = {"shift_p": 0.3, "shift": 20.0, "pt_p": 0.3, "pt": (0.5, 0.5, 0.5, 0.1), "gray_p": 0.01}


def gfpgan_colour(img_u8: np.ndarray, log: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """GFPGAN's colour augmentation of the degraded image (FFHQDegradationDataset): a per-channel shift
    with p 0.3, a ColorJitter with p 0.3, grayscale with p 0.01 (GFPGAN_COLOUR)."""
    c = GFPGAN_COLOUR
    # uint8 -> float -> uint8 is the identity on all 256 values, so the conversion is made only when an
    # operation fires (ours: half of the images pass through untouched, the same bytes).
    img = None
    out = {}
    if rng.uniform() < c["shift_p"]:
        img = _to_float(img_u8)
        shift = rng.uniform(-c["shift"], c["shift"], 3).astype(np.float32) / 255.0
        img = np.clip(img + shift, 0, 1)
        out["color_shift"] = [round(float(v) * 255, 3) for v in shift]
    if rng.uniform() < c["pt_p"]:
        img = _to_float(img_u8) if img is None else img
        b, ct, sat, hue = c["pt"]
        f = {
            "brightness": float(rng.uniform(1 - b, 1 + b)),
            "contrast": float(rng.uniform(1 - ct, 1 + ct)),
            "saturation": float(rng.uniform(1 - sat, 1 + sat)),
            "hue": float(rng.uniform(-hue, hue)),
        }
        order = [int(i) for i in rng.permutation(4)]
        img = color_jitter(img, f["brightness"], f["contrast"], f["saturation"], f["hue"], order)
        out["color_jitter"] = {**f, "order": order}
    if rng.uniform() < c["gray_p"]:
        img = _to_float(img_u8) if img is None else img
        g = img @ np.array([0.299, 0.587, 0.114], np.float32)
        img = np.repeat(g[..., None], 3, axis=2)
        out["gray"] = True
    return (img_u8 if img is None else _to_u8(img)), {**log, **out}


STRENGTH_BUCKETS = ((0.0, 3.0), (4.0, 8.0), (9.0, 16.0))
STRENGTH_PROBS = (0.5, 0.3, 0.2)


def draw_strength(rng: np.random.Generator) -> float:
    """IConFace degradation strength: bucket 0–3 / 4–8 / 9–16 with p 0.5 / 0.3 / 0.2, uniform inside."""
    b = int(rng.choice(3, p=STRENGTH_PROBS))
    return float(rng.uniform(*STRENGTH_BUCKETS[b]))


def iconface_mixed(img_u8: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """IConFace's training degradation: a Real-ESRGAN or BSRGAN chain (p = 0.5 each) at a drawn strength.

    Strength s ∈ [0, 16] (buckets above) maps linearly, t = s/16, onto every operator's damage: upper
    blur σ = lower + t·(published span), downscale range [1 − 0.85t, 1] (Real-ESRGAN) or factor
    1 + 3t (BSRGAN, at 512²), noise σ upper = lower + t·span, JPEG quality lower bound = 95 − 65t.
    At s = 16 the chains are the published ones; at s = 0 only the lower ends remain (near-clean).
    """
    s = draw_strength(rng)
    if rng.uniform() < 0.5:
        out, log = realesrgan(img_u8, rng, strength=s)
    else:
        out, log = bsrgan(img_u8, rng, strength=s)
    log = {"preset": "iconface_mixed", "strength": s, "chain": log}
    return out, log


def iconface_refldm(img_u8: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A mild/severe training mix (ours): per sample, IConFace's mixed chain (`iconface_mixed`, p = 0.5)
    or ReF-LDM's training degradations (`refldm_train`, p = 0.5).

    `iconface_mixed` at its strongest is the published Real-ESRGAN / BSRGAN chains (at most ×4 down,
    blur σ ≤ 3 at 512²); ReF-LDM's severe test set blurs with σ 8–16 and downsamples ×8–32, outside
    that range. ReF-LDM's training degradations (σ 0–16, ×1–32) cover it; half the samples keep the
    mild end, which a unified checkpoint must also serve.
    """
    if rng.uniform() < 0.5:
        out, log = iconface_mixed(img_u8, rng)
    else:
        out, log = PRESETS["refldm_train"](img_u8, rng)
    return out, {"preset": "iconface_refldm", "chain": log}


PRESETS: dict[str, Preset] = {
    "realesrgan": lambda x, r: realesrgan(x, r),
    "bsrgan": lambda x, r: bsrgan(x, r),
    # GFPGAN options/train_gfpgan_v1.yml: blur_sigma [0.1, 10], downsample [0.8, 8], noise [0, 20], jpeg [60, 100]
    "face_classic": lambda x, r: gfpgan_colour(
        *classic(x, r, (0.1, 10.0), (0.8, 8.0), (0.0, 20.0), (60, 100), "face_classic"), r
    ),
    # ReF-LDM (Hsiao et al., arXiv:2412.05043): training and the FFHQ-Ref test degradations
    "refldm_train": lambda x, r: classic(
        x, r, (0.0, 16.0), (1.0, 32.0), (0.0, 20.0), (30, 100), "refldm_train"
    ),
    "refldm_moderate": lambda x, r: classic(
        x, r, (0.0, 8.0), (1.0, 8.0), (0.0, 15.0), (60, 100), "refldm_moderate"
    ),
    "refldm_severe": lambda x, r: classic(
        x, r, (8.0, 16.0), (8.0, 32.0), (0.0, 20.0), (30, 100), "refldm_severe"
    ),
    "iconface_mixed": iconface_mixed,
    "iconface_refldm": iconface_refldm,
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown degradation preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def degrade(img_u8: np.ndarray, preset: str, seed: int, key: str, epoch: int) -> Degraded:
    """Degrade one image with a named preset; the draw is a pure function of (seed, key, epoch)."""
    out, params = get_preset(preset)(img_u8, sample_rng(seed, key, epoch))
    return Degraded(out, params)
