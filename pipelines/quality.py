"""The papers' metrics that need network weights, as `evaluate` uses them (weights in pipelines.iqa).

`evaluate.weights` names local files (nothing is downloaded at run time):

    lpips         torchvision's AlexNet state dict, alexnet-owt-7be5be79.pth   → column lpips (v0.1, alex)
    lpips_vgg     torchvision's VGG16 state dict, vgg16-397923af.pth           → column lpips_vgg
    lpips_heads   the lpips package's weights/v0.1 folder (alex.pth, vgg.pth); default: an installed lpips
    dists         torchvision's VGG16 state dict, vgg16-397923af.pth           → column dists
    dists_weights DISTS' weights.pt (alpha, beta)
    fid           clean-fid's TorchScript Inception, inception-2015-12-05.pt   → column fid (per row)
    fid_stats     optional .npz (mu, sigma) of published reference statistics; default: the statistics
                  of the evaluation set's clean targets, computed here
    clipiqa       a local transformers CLIP folder                             → column clipiqa
    musiq, maniqa not built (pipelines.iqa.NOT_BUILT says why)

LPIPS, DISTS and CLIP-IQA are per target, so every mode row gets a paired interval against the blind
mode; FID is a statistic of a whole row (one number per row, no interval: on tens of targets it is
dominated by its own sampling error, which the report says).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# evaluate.weights keys, and what each file is (for messages that say where to put what)
WEIGHT_FILES = {
    "lpips": "torchvision's AlexNet state dict alexnet-owt-7be5be79.pth",
    "lpips_vgg": "torchvision's VGG16 state dict vgg16-397923af.pth",
    "lpips_heads": "the lpips package's weights/v0.1 folder (alex.pth, vgg.pth)",
    "dists": "torchvision's VGG16 state dict vgg16-397923af.pth",
    "dists_weights": "DISTS' weights.pt (alpha, beta)",
    "fid": "clean-fid's TorchScript Inception inception-2015-12-05.pt",
    "fid_stats": "an .npz with mu and sigma of published reference statistics (optional)",
    "clipiqa": "a local transformers CLIP model folder",
    "musiq": "MUSIQ weights",
    "maniqa": "MANIQA weights",
}
LOWER_IS_BETTER = ("lpips", "lpips_vgg", "dists", "fid")
PER_TARGET = ("lpips", "lpips_vgg", "dists", "clipiqa")  # columns with a value per target


def _sha256(path: Path) -> str:
    from pipelines.images import sha256_file

    if path.is_dir():  # a model folder: the hash of its files' hashes, in name order
        import hashlib

        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()} {sha256_file(f)}\n".encode())
        return h.hexdigest()
    return sha256_file(path)


@dataclass
class WeightMetrics:
    """The metrics whose weights are configured and load; `not_computed` says why each other one is not,
    `files` which file (name and sha256) produced each computed column."""

    full_reference: dict = field(default_factory=dict)  # name -> fn(outs, gts) -> (N,)
    no_reference: dict = field(default_factory=dict)  # name -> fn(outs) -> (N,)
    inception: object | None = None
    fid_stats: tuple[np.ndarray, np.ndarray] | None = None
    files: dict[str, list[dict]] = field(default_factory=dict)
    not_computed: dict[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [*self.full_reference, *self.no_reference] + (["fid"] if self.inception is not None else [])

    def per_target(self, outs: np.ndarray, gts: np.ndarray) -> dict[str, np.ndarray]:
        vals = {k: np.asarray(fn(outs, gts), np.float64) for k, fn in self.full_reference.items()}
        vals.update({k: np.asarray(fn(outs), np.float64) for k, fn in self.no_reference.items()})
        return vals

    def fid(self, outs: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
        from pipelines.iqa import frechet_distance

        mu, sigma = self.inception.stats(outs)
        return float(frechet_distance(mu, sigma, *reference))

    def reference_stats(self, gts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Published statistics when `fid_stats` is set, else those of the clean targets."""
        return self.fid_stats if self.fid_stats is not None else self.inception.stats(gts)


def load_weight_metrics(weights: dict[str, str | None]) -> WeightMetrics:
    """Every metric whose files are configured, loaded; a missing or bad file is reported (named) in
    `not_computed`, never a crash of the evaluation."""
    from pipelines import iqa

    wm = WeightMetrics()

    def path(key: str) -> Path | None:
        v = weights.get(key)
        return Path(v) if v else None

    def unset(key: str, also: str = "") -> str:
        return (
            f"no local weights: set evaluate.weights.{key} to {WEIGHT_FILES[key]}{also} "
            "(nothing is downloaded at run time)"
        )

    def record(name: str, *keys_paths: tuple[str, Path]) -> None:
        wm.files[name] = [{"key": k, "file": p.name, "sha256": _sha256(p)} for k, p in keys_paths if p]

    def attempt(name: str, build) -> None:
        try:
            build()
        except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
            wm.not_computed[name] = f"{exc.__class__.__name__}: {exc}"

    heads_dir = path("lpips_heads")
    for name, net in (("lpips", "alex"), ("lpips_vgg", "vgg")):
        backbone = path(name)
        if backbone is None:
            if name == "lpips":  # the paper's column; the vgg variant is optional
                wm.not_computed[name] = unset(name)
            continue

        def build(name=name, net=net, backbone=backbone):
            heads = heads_dir / f"{net}.pth" if heads_dir else iqa.lpips_heads_path(net)
            model = iqa.load_lpips(backbone, net, heads)
            wm.full_reference[name] = model.score
            record(name, (name, backbone), ("lpips_heads", Path(heads)))

        attempt(name, build)

    if path("dists") is None or path("dists_weights") is None:
        missing = [k for k in ("dists", "dists_weights") if path(k) is None]
        wm.not_computed["dists"] = "; ".join(unset(k) for k in missing)
    else:

        def build_dists():
            model = iqa.load_dists(path("dists"), path("dists_weights"))
            wm.full_reference["dists"] = model.score
            record("dists", ("dists", path("dists")), ("dists_weights", path("dists_weights")))

        attempt("dists", build_dists)

    if path("clipiqa") is None:
        wm.not_computed["clipiqa"] = unset("clipiqa")
    else:

        def build_clip():
            model = iqa.CLIPIQA(path("clipiqa"))
            wm.no_reference["clipiqa"] = model.score
            record("clipiqa", ("clipiqa", path("clipiqa")))

        attempt("clipiqa", build_clip)

    if path("fid") is None:
        wm.not_computed["fid"] = unset("fid")
    else:

        def build_fid():
            wm.inception = iqa.InceptionFeatures(path("fid"))
            if path("fid_stats") is not None:
                wm.fid_stats = iqa.load_fid_stats(path("fid_stats"))
            record("fid", ("fid", path("fid")), ("fid_stats", path("fid_stats")))

        attempt("fid", build_fid)

    for name in ("musiq", "maniqa"):
        wm.not_computed[name] = iqa.NOT_BUILT[name] + (
            f" (evaluate.weights.{name} = {weights[name]} is not read)" if weights.get(name) else ""
        )
    return wm
