"""Image-quality metrics that need network weights, loaded from local files only (nothing is downloaded).

* LPIPS v0.1 — Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable Effectiveness of Deep Features as a
  Perceptual Metric", CVPR 2018. Backbone: torchvision's AlexNet or VGG16 file; linear heads: the
  `lpips` package's `weights/v0.1/{alex,vgg}.pth`.
* DISTS — Ding, Ma, Wang, Simoncelli, "Image Quality Assessment: Unifying Structure and Texture
  Similarity", IEEE TPAMI 2020. Backbone: torchvision's VGG16 file with L2 pooling in place of the
  max-pools; weights: the official `weights.pt` (`alpha`, `beta`).
* FID — Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium", NeurIPS 2017. Features: the TorchScript Inception-v3
  (`inception-2015-12-05.pt`, the file clean-fid and StyleGAN2-ADA use), 2048-d pool features.
* CLIP-IQA — Wang, Chan, Loy, "Exploring CLIP for Assessing the Look and Feel of Images", AAAI 2023:
  softmax over the cosine similarities (× 100) of the image with the antonym prompts "Good photo." /
  "Bad photo."; any local `transformers` CLIP folder.
* MUSIQ and MANIQA are not built; `NOT_BUILT` says why.

Conventions: user-facing functions take uint8 numpy images (N, H, W, 3) and return per-image float
arrays (N,). A missing file raises FileNotFoundError naming it; a file that is unreadable or has wrong
keys or shapes raises ValueError naming the file and the problem.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NOT_BUILT = {
    "musiq": (
        "not built: MUSIQ (Ke et al., ICCV 2021) was released as TensorFlow/JAX checkpoints; the only "
        "PyTorch weights are pyiqa's conversions, laid out for pyiqa's own multi-scale patch transformer "
        "code (which needs torchvision), so there is no standalone PyTorch checkpoint format to load here."
    ),
    "maniqa": (
        "not built: MANIQA (Yang et al., CVPRW 2022) is a timm ViT-B/8 backbone with transposed-attention "
        "and Swin blocks on top; its official code builds the backbone with timm and preprocesses with "
        "torchvision transforms, and torchvision is not allowed in this project."
    ),
}

# ---------------------------------------------------------------------------------------------------------
# file handling


def _need_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _load_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a torch file, or ValueError naming the file."""
    p = _need_file(path, what)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, not a torch file, ...
        raise ValueError(f"{what} {p}: cannot read the file ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{what} {p}: expected a state dict of tensors, got {type(sd).__name__}")
    return sd


def _check_state(
    sd: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    path: str | Path,
    what: str,
    ignore: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """The entries of `sd` named in `expected`, checked for presence and shape; keys starting with a
    prefix in `ignore` are dropped, any other extra key is an error."""
    for k, shape in expected.items():
        if k not in sd:
            raise ValueError(f"{what} {path}: missing key {k}")
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(
                f"{what} {path}: {k} has shape {tuple(sd[k].shape)}, expected shape {tuple(shape)}"
            )
    extra = sorted(k for k in sd if k not in expected and not k.startswith(ignore))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{what} {path}: unexpected key {extra[0]}{more}")
    return {k: sd[k].float() for k in expected}


def _u8_batch(images: np.ndarray, name: str = "images") -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 (N, H, W, 3), got {a.dtype} {a.shape}")
    return a


def _to_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device).permute(0, 3, 1, 2).float() / 255.0


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _u8_batch(a, "a"), _u8_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {a.shape} vs {b.shape}")
    return a, b


# ---------------------------------------------------------------------------------------------------------
# backbones with torchvision's parameter names


def _conv_shapes(features: nn.Sequential) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for i, m in enumerate(features):
        if isinstance(m, nn.Conv2d):
            out[f"features.{i}.weight"] = tuple(m.weight.shape)
            out[f"features.{i}.bias"] = tuple(m.bias.shape)
    return out


class _TorchvisionFeatures(nn.Module):
    features: nn.Sequential
    taps: tuple[int, ...]  # indices into `features` whose outputs are returned
    what: str

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, m in enumerate(self.features):
            x = m(x)
            if i in self.taps:
                outs.append(x)
                if len(outs) == len(self.taps):
                    break
        return outs

    def load_file(self, path: str | Path) -> _TorchvisionFeatures:
        """Load the `features.*` weights of a torchvision-format file (`classifier.*` is ignored)."""
        expected = _conv_shapes(self.features)
        sd = _check_state(_load_state(path, self.what), expected, path, self.what, ignore=("classifier.",))
        self.load_state_dict(sd, strict=False)
        return self


class AlexNetFeatures(_TorchvisionFeatures):
    """torchvision's AlexNet `features` (convs at 0, 3, 6, 8, 10); returns the outputs of the five ReLUs
    after conv1..conv5, the LPIPS taps. Needs inputs of at least 31 px."""

    what = "AlexNet weights"
    channels = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.taps = (1, 4, 7, 9, 11)

    @classmethod
    def from_file(cls, path: str | Path) -> AlexNetFeatures:
        """From torchvision's `alexnet-owt-7be5be79.pth` (or any file with its `features.*` keys)."""
        return cls().load_file(path).eval()


class L2Pool(nn.Module):
    """DISTS's L2 pooling: sqrt(conv(x², g)) with stride 2, g the outer product of a 5-point Hann window
    with its zero end points dropped (so a 3×3 kernel [.5, 1, .5]ᵀ[.5, 1, .5] / 4), padding 1, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.hann_window(5, periodic=False, dtype=torch.float64)[1:-1]  # numpy.hanning(5)[1:-1]
        g = a[:, None] * a[None, :]
        g = (g / g.sum()).float()
        self.register_buffer("filter", g.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Features(_TorchvisionFeatures):
    """torchvision's VGG16 `features` (convs at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28); returns
    relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. `l2_pool=True` replaces the max-pools by DISTS's L2
    pooling (non-persistent buffers: the state-dict keys stay torchvision's)."""

    what = "VGG16 weights"
    channels = (64, 128, 256, 512, 512)

    def __init__(self, l2_pool: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(L2Pool(c) if l2_pool else nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.taps = (3, 8, 15, 22, 29)

    @classmethod
    def from_file(cls, path: str | Path, l2_pool: bool = False) -> VGG16Features:
        """From torchvision's `vgg16-397923af.pth` (or any file with its `features.*` keys)."""
        return cls(l2_pool).load_file(path).eval()


# ---------------------------------------------------------------------------------------------------------
# LPIPS


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): scaling layer on [-1, 1] inputs, backbone features normalised to
    unit length along channels, squared difference, 1×1 linear heads (`lin{k}.model.1.weight`, shape
    (1, C_k, 1, 1), no bias), spatial mean, summed over the five layers."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net_name = net
        self.net = AlexNetFeatures() if net == "alex" else VGG16Features()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.heads = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in self.net.channels])

    def load_heads(self, path: str | Path) -> LPIPS:
        what = f"LPIPS v0.1 {self.net_name} heads"
        expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(self.net.channels)}
        sd = _check_state(_load_state(path, what), expected, path, what)
        with torch.no_grad():
            for k, w in enumerate(sd.values()):
                self.heads[k].copy_(w)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances (N,) of float images (N, 3, H, W) in [-1, 1]."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for a, b, w in zip(fx, fy, self.heads):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((a - b) ** 2, w).mean((1, 2, 3))
        return total

    @torch.no_grad()
    def score(self, a: np.ndarray, b: np.ndarray, batch: int = 16) -> np.ndarray:
        """Per-image LPIPS (N,) between uint8 batches (N, H, W, 3)."""
        a, b = _pair(a, b)
        dev = self.shift.device
        out = [
            self(_to_tensor(a[i : i + batch], dev) * 2 - 1, _to_tensor(b[i : i + batch], dev) * 2 - 1)
            for i in range(0, len(a), batch)
        ]
        return torch.cat(out).double().cpu().numpy()


def lpips_heads_path(net: str) -> Path:
    """The `lpips` package's shipped `weights/v0.1/{net}.pth`, found without importing the package."""
    hint = (
        f"pass heads_path= the LPIPS v0.1 linear-head file {net}.pth (from the lpips package, "
        f"lpips/weights/v0.1/{net}.pth), or install the lpips package"
    )
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(
            f"LPIPS heads weights/v0.1/{net}.pth not found: the lpips package is not installed; {hint}"
        )
    roots = list(spec.submodule_search_locations or []) or (
        [str(Path(spec.origin).parent)] if spec.origin else []
    )
    for r in roots:
        p = Path(r) / "weights" / "v0.1" / f"{net}.pth"
        if p.is_file():
            return p
    where = Path(roots[0]) / "weights" / "v0.1" / f"{net}.pth" if roots else f"lpips/weights/v0.1/{net}.pth"
    raise FileNotFoundError(f"LPIPS heads not found: {where}; {hint}")


def load_lpips(backbone_path: str | Path, net: str = "alex", heads_path: str | Path | None = None) -> LPIPS:
    """LPIPS v0.1 with a torchvision backbone file (`alexnet-owt-7be5be79.pth` or `vgg16-397923af.pth`)
    and the v0.1 linear heads (`heads_path`, else the installed lpips package's file)."""
    model = LPIPS(net)
    _need_file(backbone_path, f"LPIPS {net} backbone")
    if heads_path is None:
        heads_path = lpips_heads_path(net)
    model.net.load_file(backbone_path)
    model.load_heads(heads_path)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# DISTS


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020): VGG16 with L2 pooling, ImageNet mean/std normalisation, six stages (the
    [0, 1] input itself, then relu1_2 .. relu5_3: 3, 64, 128, 256, 512, 512 channels), per-channel
    structure (2μxμy + c1)/(μx² + μy² + c1) and texture (2σxy + c2)/(σx² + σy² + c2) terms, c1 = c2 = 1e-6,
    weighted by alpha and beta normalised by their joint sum; score = 1 − Σ(α·S1 + β·S2).
    Images are used at the size given (the official demo first resizes to a 256-px short side)."""

    chns = (3, 64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        self.net = VGG16Features(l2_pool=True)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        n = sum(self.chns)
        self.alpha = nn.Parameter(torch.full((1, n, 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, n, 1, 1), 0.1))

    def load_alpha_beta(self, path: str | Path) -> DISTS:
        what = "DISTS alpha/beta weights"
        shape = (1, sum(self.chns), 1, 1)
        sd = _check_state(_load_state(path, what), {"alpha": shape, "beta": shape}, path, what)
        with torch.no_grad():
            self.alpha.copy_(sd["alpha"])
            self.beta.copy_(sd["beta"])
        return self

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, *self.net((x - self.mean) / self.std)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances (N,) of float images (N, 3, H, W) in [0, 1]."""
        c1 = c2 = 1e-6
        w = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w, self.chns, dim=1)
        betas = torch.split(self.beta / w, self.chns, dim=1)
        total = x.new_zeros(x.shape[0])
        for fx, fy, al, be in zip(self.stages(x), self.stages(y), alphas, betas):
            mx, my = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            s1 = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
            vx = ((fx - mx) ** 2).mean((2, 3), keepdim=True)
            vy = ((fy - my) ** 2).mean((2, 3), keepdim=True)
            cxy = (fx * fy).mean((2, 3), keepdim=True) - mx * my
            s2 = (2 * cxy + c2) / (vx + vy + c2)
            total = total + (al * s1 + be * s2).sum((1, 2, 3))
        return 1 - total

    @torch.no_grad()
    def score(self, a: np.ndarray, b: np.ndarray, batch: int = 16) -> np.ndarray:
        """Per-image DISTS (N,) between uint8 batches (N, H, W, 3)."""
        a, b = _pair(a, b)
        dev = self.mean.device
        out = [
            self(_to_tensor(a[i : i + batch], dev), _to_tensor(b[i : i + batch], dev))
            for i in range(0, len(a), batch)
        ]
        return torch.cat(out).double().cpu().numpy()


def load_dists(vgg_path: str | Path, alpha_beta_path: str | Path) -> DISTS:
    """DISTS from torchvision's `vgg16-397923af.pth` and the official `weights.pt` (alpha, beta)."""
    model = DISTS()
    _need_file(vgg_path, "DISTS VGG16 backbone")
    _need_file(alpha_beta_path, "DISTS alpha/beta weights")
    model.net.load_file(vgg_path)
    model.load_alpha_beta(alpha_beta_path)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# FID


class InceptionFeatures:
    """2048-d Inception-v3 pool features from the TorchScript `inception-2015-12-05.pt` (clean-fid /
    StyleGAN2-ADA), called as `model(x, return_features=True)` on float (B, 3, 299, 299) in [0, 255].
    Images are resized to 299 bilinearly (align_corners=False), the resize that file applies itself."""

    what = "Inception TorchScript"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        p = _need_file(path, self.what)
        try:
            with (
                warnings.catch_warnings()
            ):  # torch >= 2.9 marks TorchScript deprecated; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise ValueError(f"{self.what} {p}: cannot load as TorchScript ({type(e).__name__}: {e})") from e
        try:
            schema = str(model.forward.schema)
        except Exception:  # not a scripted forward with a schema: checked on the first call instead
            schema = "return_features"
        if "return_features" not in schema:
            raise ValueError(f"{self.what} {p}: forward has no return_features argument ({schema})")
        self.path = p
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def features(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        """Features (N, 2048) float64 of uint8 images (N, H, W, 3)."""
        a = _u8_batch(images)
        out = []
        for i in range(0, len(a), batch):
            x = _to_tensor(a[i : i + batch], self.device) * 255.0
            if x.shape[-2:] != (299, 299):
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            f = self.model(x, return_features=True)
            if not isinstance(f, torch.Tensor) or f.shape != (x.shape[0], 2048):
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(
                    f"{self.what} {self.path}: returned {got}, expected shape ({x.shape[0]}, 2048)"
                )
            out.append(f.double().cpu())
        return torch.cat(out).numpy()

    def stats(self, images: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the features of `images`."""
        return feature_stats(self.features(images, batch))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D), N >= 2."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features: expected (N >= 2, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) in float64 with scipy.linalg.sqrtm; when the product has no
    finite square root, eps is added to both diagonals; imaginary parts from rounding are dropped (an
    imaginary diagonal above 1e-3 is an error)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"FID statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"FID: sqrtm has an imaginary diagonal component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    return frechet_distance(mu1, s1, mu2, s2)


def load_fid_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 from an `.npz` holding `mu` (D,) and `sigma` (D, D) (pytorch-fid's format)."""
    what = "FID statistics"
    p = _need_file(path, what)
    try:
        with np.load(p, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise ValueError(f"missing key {missing[0]} (has {sorted(z.files)})")
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except ValueError as e:
        raise ValueError(f"{what} {p}: {e}") from e
    except Exception as e:
        raise ValueError(f"{what} {p}: cannot read the file ({type(e).__name__}: {e})") from e
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(
            f"{what} {p}: mu has shape {mu.shape}, sigma {sigma.shape}, expected shape (D,) and (D, D)"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{what} {p}: non-finite values")
    return mu, sigma


# ---------------------------------------------------------------------------------------------------------
# CLIP-IQA


class CLIPIQA:
    """CLIP-IQA (Wang et al. 2023) with a local `transformers` CLIP folder: the probability of the
    positive prompt under a softmax over 100 × the cosine similarities of the image with the antonym
    pair ("Good photo.", "Bad photo."). Images go through the folder's own image processor (resize and
    centre crop); the paper's variant of RN50 without positional embeddings is not reproduced."""

    what = "CLIP model folder"

    def __init__(
        self,
        folder: str | Path,
        prompts: tuple[str, str] = ("Good photo.", "Bad photo."),
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        d = Path(folder)
        if not d.is_dir():
            raise FileNotFoundError(f"{self.what} not found: {d}")
        cfg = _need_file(d / "config.json", f"{self.what} config")
        weights = (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
        if not any((d / w).is_file() for w in weights):
            raise FileNotFoundError(
                f"{self.what} weights not found: {d / weights[0]} (or {', '.join(weights[1:])})"
            )
        _need_file(d / "preprocessor_config.json", f"{self.what} image processor config")
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except Exception as e:
            raise ValueError(f"{self.what} {cfg}: cannot read ({type(e).__name__}: {e})") from e
        if model_type != "clip":
            raise ValueError(f"{self.what} {cfg}: model_type is {model_type!r}, expected 'clip'")
        try:
            self.model = CLIPModel.from_pretrained(d, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(d, local_files_only=True)
        except Exception as e:
            raise ValueError(f"{self.what} {d}: cannot load ({type(e).__name__}: {e})") from e
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.prompts = tuple(prompts)
        with torch.no_grad():
            tok = self.tokenizer(list(self.prompts), padding=True, return_tensors="pt").to(self.device)
            t = _pooled(self.model.get_text_features(**tok))
        self.text = F.normalize(t.float(), dim=-1)

    @torch.no_grad()
    def score(self, images: np.ndarray, batch: int = 16) -> np.ndarray:
        """Per-image CLIP-IQA (N,) in [0, 1] of uint8 images (N, H, W, 3)."""
        a = _u8_batch(images)
        out = []
        for i in range(0, len(a), batch):
            px = self.processor(images=list(a[i : i + batch]), return_tensors="pt")["pixel_values"]
            f = _pooled(self.model.get_image_features(pixel_values=px.to(self.device)))
            logits = 100.0 * F.normalize(f.float(), dim=-1) @ self.text.T
            out.append(logits.softmax(-1)[:, 0].double().cpu())
        return torch.cat(out).numpy()


def _pooled(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output with pooler_output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


__all__ = [
    "NOT_BUILT",
    "AlexNetFeatures",
    "VGG16Features",
    "L2Pool",
    "LPIPS",
    "load_lpips",
    "lpips_heads_path",
    "DISTS",
    "load_dists",
    "InceptionFeatures",
    "feature_stats",
    "frechet_distance",
    "fid_from_features",
    "load_fid_stats",
    "CLIPIQA",
]
