"""Hand-written operators against their formulas; presets: determinism, ranges, logged parameters."""

import math

import numpy as np
import pytest
from conftest import rgb
from scipy import special

from pipelines import degradations as D


def test_isotropic_gaussian_matches_the_formula():
    k = D.isotropic_gaussian_kernel(21, 2.0)
    x, y = np.meshgrid(np.arange(21) - 10, np.arange(21) - 10)
    want = np.exp(-(x**2 + y**2) / (2 * 2.0**2))
    assert k.shape == (21, 21) and k.dtype == np.float32
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(k, want / want.sum(), atol=1e-7)
    assert np.allclose(k, k.T) and np.allclose(k, k[::-1, ::-1])


def test_anisotropic_gaussian_rotation_and_axes():
    k0 = D.anisotropic_gaussian_kernel(21, 4.0, 1.0, 0.0)
    # wider along x: the centre row holds more mass than the centre column
    assert k0[10].sum() > 3 * k0[:, 10].sum()
    k90 = D.anisotropic_gaussian_kernel(21, 4.0, 1.0, math.pi / 2)
    assert np.allclose(k90, k0.T, atol=1e-7)
    # covariance of the kernel equals R diag(sx², sy²) Rᵀ (up to truncation)
    th = 0.6
    k = D.anisotropic_gaussian_kernel(41, 3.0, 1.5, th).astype(np.float64)
    x, y = np.meshgrid(np.arange(41) - 20, np.arange(41) - 20)
    cov = np.array([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    r = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    assert np.allclose(cov, r @ np.diag([9.0, 2.25]) @ r.T, atol=0.02)


def test_generalized_gaussian_and_plateau_formulas():
    x, y = np.meshgrid(np.arange(15) - 7, np.arange(15) - 7)
    q = (x / 2.0) ** 2 + (y / 3.0) ** 2
    g = D.generalized_gaussian_kernel(15, 2.0, 3.0, 0.0, 1.7)
    want = np.exp(-0.5 * q**1.7)
    assert np.allclose(g, want / want.sum(), atol=1e-7)
    assert np.allclose(
        D.generalized_gaussian_kernel(15, 2.0, 3.0, 0.0, 1.0),
        D.anisotropic_gaussian_kernel(15, 2.0, 3.0, 0.0),
    )
    p = D.plateau_kernel(15, 2.0, 3.0, 0.0, 1.5)
    want = 1 / (1 + q**1.5)
    assert np.allclose(p, want / want.sum(), atol=1e-7)
    # heavier tail than the Gaussian of the same σ
    assert (
        p[0, 0] / p[7, 7]
        > D.anisotropic_gaussian_kernel(15, 2.0, 3.0, 0.0)[0, 0]
        / D.anisotropic_gaussian_kernel(15, 2.0, 3.0, 0.0)[7, 7]
    )


def test_sinc_kernel_formula():
    w = math.pi / 2
    k = D.sinc_kernel(21, w).astype(np.float64)
    x, y = np.meshgrid(np.arange(21) - 10, np.arange(21) - 10)
    r = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = w * special.j1(w * r) / (2 * math.pi * r)
    want[10, 10] = w**2 / (4 * math.pi)
    assert np.allclose(k, want / want.sum(), atol=1e-7)
    assert k.sum() == pytest.approx(1.0, abs=1e-6) and (k < 0).any()  # ringing lobes


def test_kernel_sizes_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        D.isotropic_gaussian_kernel(4, 1.0)


def test_gaussian_noise_statistics():
    rng = np.random.default_rng(0)
    img = np.full((128, 128, 3), 0.5, np.float32)
    n = D.gaussian_noise(img, 10.0, False, rng) - img
    assert n.std() == pytest.approx(10 / 255, rel=0.03) and abs(n.mean()) < 1e-3
    g = D.gaussian_noise(img, 10.0, True, rng) - img
    assert np.allclose(g[..., 0], g[..., 1]) and np.allclose(g[..., 1], g[..., 2])


def test_poisson_noise_scales_with_intensity():
    rng = np.random.default_rng(0)
    dark = D.poisson_noise(np.full((128, 128, 3), 0.1, np.float32), 1.0, False, rng) - 0.1
    bright = D.poisson_noise(np.full((128, 128, 3), 0.8, np.float32), 1.0, False, rng) - 0.8
    assert bright.std() > dark.std() > 0  # variance ∝ intensity (Poisson)
    assert np.allclose(D.poisson_noise(np.full((8, 8, 3), 0.3, np.float32), 0.0, False, rng), 0.3)
    gray = D.poisson_noise(np.full((32, 32, 3), 0.5, np.float32), 1.0, True, rng)
    assert np.allclose(gray[..., 0], gray[..., 2])


def test_resize_and_jpeg():
    img = np.asarray(rgb(1), np.float32) / 255
    small = D.resize(img, 16, 16, "area")
    assert small.shape == (16, 16, 3) and np.allclose(small.mean(), img.mean(), atol=0.01)
    with pytest.raises(ValueError, match="unknown resize mode"):
        D.resize(img, 8, 8, "nearest-ish")
    hi, lo = D.jpeg(img, 95), D.jpeg(img, 10)
    assert np.abs(hi - img).mean() < np.abs(lo - img).mean()


@pytest.mark.parametrize("name", sorted(D.PRESETS))
def test_presets_are_deterministic_per_seed_key_epoch(name):
    img = np.asarray(rgb(2))
    a = D.degrade(img, name, 1, "sample_a", 0)
    b = D.degrade(img, name, 1, "sample_a", 0)
    assert a.image.dtype == np.uint8 and a.image.shape == img.shape
    assert a.image.tobytes() == b.image.tobytes() and a.params == b.params
    others = [
        D.degrade(img, name, 1, "sample_a", 1),
        D.degrade(img, name, 1, "sample_b", 0),
        D.degrade(img, name, 2, "sample_a", 0),
    ]
    assert all(o.image.tobytes() != a.image.tobytes() for o in others)
    assert a.params["preset"] == name


def test_refldm_ranges_are_respected():
    img = np.asarray(rgb(3))
    for i in range(50):
        p = D.degrade(img, "refldm_severe", 0, f"k{i}", 0).params
        assert (
            8 <= p["sigma"] <= 16
            and 8 <= p["down"] <= 32
            and 0 <= p["noise"] <= 20
            and 30 <= p["jpeg"] <= 100
        )
        p = D.degrade(img, "refldm_moderate", 0, f"k{i}", 0).params
        assert (
            0 <= p["sigma"] <= 8 and 1 <= p["down"] <= 8 and 0 <= p["noise"] <= 15 and 60 <= p["jpeg"] <= 100
        )


def test_severe_destroys_more_than_moderate():
    img = np.asarray(rgb(4))
    err = {
        n: np.mean(
            [np.abs(D.degrade(img, n, 0, f"k{i}", 0).image.astype(float) - img).mean() for i in range(20)]
        )
        for n in ("refldm_moderate", "refldm_severe")
    }
    assert err["refldm_severe"] > err["refldm_moderate"]


def test_iconface_strength_buckets():
    rng = np.random.default_rng(0)
    s = np.array([D.draw_strength(rng) for _ in range(20000)])
    assert s.min() >= 0 and s.max() <= 16
    frac = [((s >= 0) & (s <= 3)).mean(), ((s >= 4) & (s <= 8)).mean(), ((s >= 9) & (s <= 16)).mean()]
    assert np.allclose(frac, [0.5, 0.3, 0.2], atol=0.015)
    p = D.degrade(np.asarray(rgb(5)), "iconface_mixed", 0, "k", 0).params
    assert p["chain"]["preset"] in ("realesrgan", "bsrgan") and 0 <= p["strength"] <= 16


def test_iconface_refldm_mixes_the_mild_chain_and_refldm_train_half_and_half():
    img = np.asarray(rgb(5))
    drawn = [D.degrade(img, "iconface_refldm", 0, f"k{i}", 0) for i in range(200)]
    chains = [d.params["chain"]["preset"] for d in drawn]
    assert set(chains) == {"iconface_mixed", "refldm_train"}
    assert 0.4 < chains.count("refldm_train") / len(chains) < 0.6
    again = D.degrade(img, "iconface_refldm", 0, "k7", 0)  # seed + key decide the draw
    assert np.array_equal(again.image, drawn[7].image) and again.params == drawn[7].params
    # the ReF-LDM half reaches the severe test set's downscaling (×8–32), which iconface_mixed never draws
    down = [d.params["chain"]["down"] for d in drawn if d.params["chain"]["preset"] == "refldm_train"]
    assert max(down) > 8


def test_unknown_preset():
    with pytest.raises(ValueError, match="valid: realesrgan"):
        D.get_preset("gfpgan")


def test_separable_fast_path_equals_the_2d_convolution():
    import cv2

    img = np.asarray(rgb(6), np.float32) / 255
    for k in (D.isotropic_gaussian_kernel(21, 3.0), D.anisotropic_gaussian_kernel(15, 3.0, 1.0, 0.0)):
        want = cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT_101)
        assert np.allclose(D.filter2d(img, k), want, atol=1e-5)
    rotated = D.anisotropic_gaussian_kernel(15, 3.0, 1.0, 0.7)  # not separable: the 2-D path
    assert np.array_equal(
        D.filter2d(img, rotated), cv2.filter2D(img, -1, rotated, borderType=cv2.BORDER_REFLECT_101)
    )


def test_color_jitter_by_its_formula():
    """Brightness multiplies, contrast blends with the mean gray, saturation with the gray image;
    factors of 1 (hue 0) leave the image as it is."""
    import numpy as np

    from pipelines.degradations import color_jitter

    f = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    same = color_jitter(f, 1.0, 1.0, 1.0, 0.0, [0, 1, 2, 3])
    assert np.abs(same - f).max() < 1e-6
    np.testing.assert_allclose(
        color_jitter(f, 1.3, 1.0, 1.0, 0.0, [0, 1, 2, 3]), np.clip(f * 1.3, 0, 1), atol=1e-6
    )
    gray = f @ np.array([0.299, 0.587, 0.114], np.float32)
    desat = color_jitter(f, 1.0, 1.0, 0.0, 0.0, [0, 1, 2, 3])
    np.testing.assert_allclose(desat, np.repeat(gray[..., None], 3, 2), atol=2e-3)


def test_face_classic_applies_gfpgans_colour_augmentation():
    """face_classic = the classic chain + GFPGAN's colour jitter (shift p 0.3 up to 20/255, ColorJitter
    p 0.3, gray p 0.01), logged, deterministic for a seed."""
    import numpy as np

    from pipelines.degradations import GFPGAN_COLOUR, get_preset

    img = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    logs = [get_preset("face_classic")(img, np.random.default_rng(i))[1] for i in range(400)]
    shifts = [x["color_shift"] for x in logs if "color_shift" in x]
    jitters = [x["color_jitter"] for x in logs if "color_jitter" in x]
    assert 0.22 < len(shifts) / 400 < 0.38 and 0.22 < len(jitters) / 400 < 0.38
    assert max(abs(v) for s in shifts for v in s) <= GFPGAN_COLOUR["shift"]
    assert all(
        0.5 <= j["brightness"] <= 1.5 and abs(j["hue"]) <= 0.1 and sorted(j["order"]) == [0, 1, 2, 3]
        for j in jitters
    )
    a = get_preset("face_classic")(img, np.random.default_rng(7))
    b = get_preset("face_classic")(img, np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_to_u8_equals_the_numpy_formula_on_ties_and_out_of_range_values():
    """_to_u8 (clip + cv2.convertScaleAbs) = clip(round(255·x), 0, 255) with round half to even."""
    ties = ((np.arange(256) + 0.5) / 255).astype(np.float32)  # 255·x lands on or next to k + 0.5
    near = np.concatenate([np.nextafter(ties, np.float32(-1)), ties, np.nextafter(ties, np.float32(2))])
    rand = np.random.default_rng(0).uniform(-0.5, 1.5, 30000).astype(np.float32)
    x = np.concatenate([near, rand, np.array([-np.inf, -1e30, -0.0, 0.0, 1.0, 1e30, np.inf], np.float32)])
    x = x[: x.size // 3 * 3].reshape(-1, 1, 3)
    want = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(D._to_u8(x), want)
    assert D._to_u8(x[..., :1]).shape == x[..., :1].shape  # a single channel keeps its axis
    x64 = x.astype(np.float64)  # float64 keeps the numpy formula (its products round differently)
    assert np.array_equal(D._to_u8(x64), np.clip(np.round(x64 * 255.0), 0, 255).astype(np.uint8))
    u = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    assert np.array_equal(D._to_u8(D._to_float(u)), u)  # the round trip gfpgan_colour skips


# Digests of every preset's output bytes, computed with the code BEFORE the degradation speed work
# (commit fb4e122) on this OpenCV build (opencv-python-headless 4.12.0.88, numpy 2.2.6, albumentations
# 2.0.8) on an x86-64 CPU with AVX-512 (OpenCV dispatches SIMD kernels by CPU; another SIMD level may round
# its float filters differently and then needs its own digests). Optimisations must leave them unchanged:
# same (image, seed, key, epoch) -> same bytes. The inputs are smooth random images built here (not the
# face renderer, which may change on its own).
def _digest_inputs(size: int) -> list[np.ndarray]:
    import cv2

    rngs = [np.random.default_rng(s) for s in (0, 1)]
    return [
        cv2.resize(
            r.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8),
            (size, size),
            interpolation=cv2.INTER_CUBIC,
        )
        for r in rngs
    ]


def _preset_digest(name: str, size: int, n: int) -> str:
    import hashlib

    h = hashlib.sha256()
    imgs = _digest_inputs(size)
    for i in range(n):
        h.update(D.degrade(imgs[i % 2], name, 3, f"digest{i}", i % 3).image.tobytes())
    return h.hexdigest()[:16]


PINNED_DIGESTS = {
    ("bsrgan", 64, 48): "44e70ba3079b6c2c",
    ("bsrgan", 512, 8): "c2c3586cb4cae102",
    ("face_classic", 64, 48): "69e130629d4d137c",
    ("face_classic", 512, 8): "f606b88c14003749",
    ("iconface_mixed", 64, 48): "817779c74586260d",
    ("iconface_mixed", 512, 8): "692a0be2f9b12896",
    ("realesrgan", 64, 48): "83ff6e948de4c021",
    ("realesrgan", 512, 8): "41e509d7a9fe0e93",
    ("refldm_moderate", 64, 48): "a4049ffc27fcaa43",
    ("refldm_moderate", 512, 8): "322ed4b1e311c777",
    ("refldm_severe", 64, 48): "137f5c0a96c919fc",
    ("refldm_severe", 512, 8): "689865a1fb718c0d",
    ("refldm_train", 64, 48): "27f9b8c0d92ef2b1",
    ("refldm_train", 512, 8): "ca505809434b5435",
}


@pytest.mark.parametrize("name,size,n", sorted(PINNED_DIGESTS))
def test_preset_outputs_are_pinned(name, size, n):
    """Byte-identical outputs to the pinned digests (speed changes must not change what is computed)."""
    assert _preset_digest(name, size, n) == PINNED_DIGESTS[(name, size, n)]
