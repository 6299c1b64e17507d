"""pipelines.iqa without the real weights: every loader reads a file written here in the official format
(real key names and shapes, random values) and the metrics keep their defining properties."""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import iqa


def images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth colour images: gradients plus a few soft blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.stack(
            [rng.uniform(0.2, 0.8) + rng.uniform(-0.3, 0.3) * (x if c % 2 else y) for c in range(3)], -1
        )
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.25)]
            img = (
                img
                + rng.uniform(-0.4, 0.4, 3)
                * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
            )
        out.append(img)
    return np.clip(np.round(np.stack(out) * 255), 0, 255).astype(np.uint8)


def noisy(a: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    n = np.random.default_rng(seed).normal(0, sigma, a.shape)
    return np.clip(np.round(a + n), 0, 255).astype(np.uint8)


def torchvision_file(path: Path, backbone: torch.nn.Module) -> Path:
    """A torchvision-format file: the real `features.*` keys and shapes, plus `classifier.*` keys (kept
    tiny here: the loaders ignore them)."""
    sd = {k: v.clone() for k, v in backbone.state_dict().items()}
    sd.update({"classifier.1.weight": torch.zeros(4, 4), "classifier.1.bias": torch.zeros(4)})
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("iqa_weights")
    torch.manual_seed(0)
    out = {
        "alex": torchvision_file(d / "alexnet-owt-7be5be79.pth", iqa.AlexNetFeatures()),
        "vgg": torchvision_file(d / "vgg16-397923af.pth", iqa.VGG16Features()),
    }
    for net, chans in (("alex", (64, 192, 384, 256, 256)), ("vgg", (64, 128, 256, 512, 512))):
        heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(chans)}
        out[f"{net}_heads"] = d / f"{net}.pth"
        torch.save(heads, out[f"{net}_heads"])
    out["dists"] = d / "weights.pt"
    torch.save(
        {"alpha": 0.1 + 0.01 * torch.randn(1, 1475, 1, 1), "beta": 0.1 + 0.01 * torch.randn(1, 1475, 1, 1)},
        out["dists"],
    )
    return out


def truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def raises_naming(exc, path: Path, what: str = ""):
    """pytest.raises whose message names `path` and contains `what`, in any order."""
    return pytest.raises(exc, match=f"(?s)(?=.*{re.escape(str(path))})(?=.*{re.escape(what)})")


# ------------------------------------------------------------------------------------------------- LPIPS


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_identity_symmetry_and_noise(files, net):
    m = iqa.load_lpips(files[net], net, heads_path=files[f"{net}_heads"])
    a, b = images(3), images(3, seed=5)
    assert np.all(m.score(a, a) == 0)
    d_ab, d_ba = m.score(a, b), m.score(b, a)
    assert d_ab.shape == (3,) and np.all(d_ab > 0)
    np.testing.assert_allclose(d_ab, d_ba, rtol=1e-5)
    small, large = m.score(a, noisy(a, 4)), m.score(a, noisy(a, 40))
    assert np.all(small > 0) and np.all(large > small)


def test_lpips_heads_from_lpips_package_without_importing_it(files, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('lpips must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    with pytest.raises(FileNotFoundError, match=re.escape(str(pkg / "weights" / "v0.1" / "alex.pth"))):
        iqa.load_lpips(files["alex"], "alex")
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(files["alex_heads"].read_bytes())
    m = iqa.load_lpips(files["alex"], "alex")
    assert "lpips" not in sys.modules
    torch.testing.assert_close(
        m.heads[0].data, torch.load(files["alex_heads"], weights_only=True)["lin0.model.1.weight"]
    )


def test_lpips_heads_without_package(files, monkeypatch):
    monkeypatch.setattr(iqa.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"vgg\.pth.*heads_path"):
        iqa.load_lpips(files["vgg"], "vgg")


# ------------------------------------------------------------------------------------------------- DISTS


def test_dists_identity_and_noise(files):
    m = iqa.load_dists(files["vgg"], files["dists"])
    a = images(3)
    same = m.score(a, a)
    assert same.shape == (3,) and np.all(np.abs(same) < 1e-5)
    small, large = m.score(a, noisy(a, 4)), m.score(a, noisy(a, 40))
    assert np.all(small > 1e-4) and np.all(large > small)


# ------------------------------------------------------------------------------------------------- errors


def test_missing_files_name_the_path(files, tmp_path):
    gone = tmp_path / "nope.pth"
    with raises_naming(FileNotFoundError, gone):
        iqa.load_lpips(gone, "alex", heads_path=files["alex_heads"])
    with raises_naming(FileNotFoundError, gone):
        iqa.load_lpips(files["alex"], "alex", heads_path=gone)
    with raises_naming(FileNotFoundError, gone):
        iqa.load_dists(files["vgg"], gone)
    with raises_naming(FileNotFoundError, gone):
        iqa.InceptionFeatures(gone)
    with raises_naming(FileNotFoundError, gone):
        iqa.load_fid_stats(gone)
    with raises_naming(FileNotFoundError, gone):
        iqa.CLIPIQA(gone)


def test_truncated_files_are_clear_errors(files, tmp_path):
    bad_alex = truncated(files["alex"], tmp_path / "alexnet.pth")
    with raises_naming(ValueError, bad_alex, "cannot read"):
        iqa.load_lpips(bad_alex, "alex", heads_path=files["alex_heads"])
    bad_heads = truncated(files["vgg_heads"], tmp_path / "vgg.pth")
    with raises_naming(ValueError, bad_heads, "cannot read"):
        iqa.load_lpips(files["vgg"], "vgg", heads_path=bad_heads)
    bad_ab = truncated(files["dists"], tmp_path / "weights.pt")
    with raises_naming(ValueError, bad_ab, "cannot read"):
        iqa.load_dists(files["vgg"], bad_ab)


def test_wrong_keys_and_shapes_are_clear_errors(files, tmp_path):
    sd = torch.load(files["alex"], weights_only=True)
    sd["features.10.w"] = sd.pop("features.10.weight")
    torch.save(sd, p := tmp_path / "renamed.pth")
    with raises_naming(ValueError, p, "missing key features.10.weight"):
        iqa.AlexNetFeatures.from_file(p)

    sd = torch.load(files["alex"], weights_only=True)
    sd["features.0.weight"] = sd["features.0.weight"][:32]
    torch.save(sd, p := tmp_path / "shape.pth")
    with raises_naming(ValueError, p, "expected shape (64, 3, 11, 11)"):
        iqa.load_lpips(p, "alex", heads_path=files["alex_heads"])

    # AlexNet heads are not VGG heads
    with raises_naming(ValueError, files["alex_heads"], "expected shape (1, 128, 1, 1)"):
        iqa.load_lpips(files["vgg"], "vgg", heads_path=files["alex_heads"])

    # an AlexNet file is not a VGG16 file
    with raises_naming(ValueError, files["alex"], "VGG16"):
        iqa.load_dists(files["alex"], files["dists"])

    torch.save({"alpha": torch.rand(1, 1475, 1, 1)}, p := tmp_path / "alpha_only.pt")
    with raises_naming(ValueError, p, "missing key beta"):
        iqa.load_dists(files["vgg"], p)


# ------------------------------------------------------------------------------------------------- FID


class _TinyInception(torch.nn.Module):
    """Stand-in for the TorchScript Inception: one linear map from the 8×8 pooled image to 2048-d."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.shape[2] == 299 and x.shape[3] == 299
        f = self.lin(torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 8).flatten(1))
        if return_features:
            return f
        return f[:, :1008]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "inception-2015-12-05.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch >= 2.9, but it is the file's format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    return path


def test_fid_features_zero_for_same_set_and_rising_with_distortion(inception_file):
    ext = iqa.InceptionFeatures(inception_file)
    a = images(40, size=32, seed=2)
    fa = ext.features(a, batch=4)
    assert fa.shape == (40, 2048) and fa.dtype == np.float64
    # 40 samples cannot fill a 2048-d covariance (and sqrtm of 2048² is slow here): use 32 dimensions
    fa = fa[:, :32]
    mu, sigma = iqa.feature_stats(fa)
    same = iqa.fid_from_features(fa, fa)
    assert abs(same) < 1e-6 * np.trace(sigma)

    def fid_to(t: float) -> float:
        b = np.clip(np.round(a * (1 - t) + 128 * t), 0, 255).astype(np.uint8)
        return iqa.fid_from_features(fa, ext.features(b, batch=4)[:, :32])

    weak, strong = fid_to(0.1), fid_to(0.5)
    assert 0 < weak < strong


def test_fid_stats_file_and_errors(tmp_path, inception_file):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 8))
    mu, sigma = iqa.feature_stats(f)
    np.savez(p := tmp_path / "stats.npz", mu=mu, sigma=sigma)
    mu2, sigma2 = iqa.load_fid_stats(p)
    assert abs(iqa.frechet_distance(mu, sigma, mu2, sigma2)) < 1e-8
    assert iqa.frechet_distance(mu, sigma, mu2 + 1, sigma2) == pytest.approx(8.0, rel=1e-6)

    np.savez(q := tmp_path / "m_only.npz", m=mu, sigma=sigma)
    with raises_naming(ValueError, q, "missing key mu"):
        iqa.load_fid_stats(q)
    np.savez(q := tmp_path / "shape.npz", mu=mu, sigma=sigma[:4])
    with raises_naming(ValueError, q, "expected shape"):
        iqa.load_fid_stats(q)
    with raises_naming(ValueError, truncated(p, tmp_path / "cut.npz"), "cannot read"):
        iqa.load_fid_stats(tmp_path / "cut.npz")
    with raises_naming(ValueError, truncated(inception_file, tmp_path / "cut.pt"), "TorchScript"):
        iqa.InceptionFeatures(tmp_path / "cut.pt")


# ------------------------------------------------------------------------------------------------- CLIP-IQA


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    chars = list("abcdefghijklmnopqrstuvwxyz.")
    words = chars + [c + "</w>" for c in chars] + ["ba", "bad</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(words)}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\nb a\nba d</w>\n")
    CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt")).save_pretrained(d)
    eos = vocab["<|endoftext|>"]
    text = dict(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=8, logit_scale_init_value=math.log(100)
    )
    CLIPModel(cfg).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 32},
                "crop_size": {"height": 32, "width": 32},
                "do_resize": True,
                "do_center_crop": True,
                "do_rescale": True,
                "do_normalize": True,
                "do_convert_rgb": True,
                "resample": 3,
                "rescale_factor": 1 / 255,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return d


def test_clipiqa_scores(clip_folder):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    a = images(3, size=40)
    good = iqa.CLIPIQA(clip_folder)
    s = good.score(a, batch=2)
    assert s.shape == (3,) and np.all((s >= 0) & (s <= 1))
    bad = iqa.CLIPIQA(clip_folder, prompts=("Bad photo.", "Good photo."))
    np.testing.assert_allclose(s + bad.score(a), 1.0, atol=1e-6)
    # the same as CLIP's own logits when its logit scale is 100 (the test model is saved that way)
    model = CLIPModel.from_pretrained(clip_folder)
    tok = AutoTokenizer.from_pretrained(clip_folder)(
        ["Good photo.", "Bad photo."], padding=True, return_tensors="pt"
    )
    px = AutoImageProcessor.from_pretrained(clip_folder)(images=list(a), return_tensors="pt")
    with torch.no_grad():
        ref = model(**tok, pixel_values=px["pixel_values"]).logits_per_image.log_softmax(-1)[:, 0].numpy()
    np.testing.assert_allclose(np.log(np.maximum(s, 1e-300)), ref, rtol=1e-4, atol=1e-4)


def test_clipiqa_folder_errors(clip_folder, tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    for f in clip_folder.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    with raises_naming(FileNotFoundError, d / "model.safetensors"):
        iqa.CLIPIQA(d)
    truncated(clip_folder / "model.safetensors", d / "model.safetensors")
    with raises_naming(ValueError, d, "cannot load"):
        iqa.CLIPIQA(d)


def test_not_built_reasons():
    assert set(iqa.NOT_BUILT) == {"musiq", "maniqa"}
    assert "torchvision" in iqa.NOT_BUILT["maniqa"] and "pyiqa" in iqa.NOT_BUILT["musiq"]
