"""Identity encoders: AdaFace IR-50 layout and checkpoint format, the AdaFace loss, verification."""

import argparse
import math

import numpy as np
import pytest
import torch

from models.id_encoder import (
    IR50,
    AdaFaceHead,
    IRBackbone,
    IRConfig,
    load_adaface_checkpoint,
    load_encoder,
    preprocess,
    raw_embedding,
    save_encoder,
)
from pipelines.id_training import verification

SMALL = IRConfig(input_size=32, units=(1, 1, 1, 1), widths=(8, 8, 16, 16, 32), embedding_dim=64)


def test_ir50_has_adafaces_key_layout_and_size():
    with torch.device("meta"):
        m = IRBackbone(IR50)
    keys = set(m.state_dict())
    for k in [
        "input_layer.0.weight",
        "input_layer.1.running_var",
        "input_layer.2.weight",
        "body.0.res_layer.0.weight",
        "body.0.res_layer.3.weight",
        "body.3.shortcut_layer.0.weight",  # 64 -> 128: a 1x1 conv shortcut
    ]:
        assert k in keys, k
    assert "body.0.shortcut_layer.0.weight" not in keys  # same-depth units use MaxPool2d(1, s)
    assert (
        "body.23.res_layer.5.running_mean" in keys and "body.24.res_layer.0.weight" not in keys
    )  # 3+4+14+3 units
    assert "output_layer.3.weight" in keys and m.output_layer[3].weight.shape == (512, 512 * 7 * 7)
    assert "output_layer.4.running_mean" in keys and "output_layer.4.weight" not in keys  # BN1d(affine=False)
    n = sum(p.numel() for p in m.parameters())
    assert 43_000_000 < n < 44_500_000


def test_official_checkpoint_format_loads_and_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    ref = IRBackbone(SMALL).eval()
    # perturb BN statistics so that loading them matters
    for mod in ref.modules():
        if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    state = {f"model.{k}": v for k, v in ref.state_dict().items()}
    state["head.kernel"] = torch.randn(64, 10)
    ckpt = {"state_dict": state, "epoch": 25, "hyper_parameters": argparse.Namespace(arch="ir_50", m=0.4)}
    path = tmp_path / "adaface_ir50_ms1mv2.ckpt"
    torch.save(ckpt, path)
    got = load_adaface_checkpoint(path, SMALL)
    x = torch.rand(3, 3, 48, 48)
    e1, n1 = ref(preprocess(x, 32))
    e2, n2 = got(preprocess(x, 32))
    assert torch.allclose(e1, e2) and torch.allclose(n1, n2)
    assert torch.allclose(e1.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(raw_embedding(got, x).norm(dim=1, keepdim=True), n2, atol=1e-4)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adaface_checkpoint(tmp_path / "nope.ckpt", SMALL)
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.foo": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="not an AdaFace IR checkpoint"):
        load_adaface_checkpoint(bad, SMALL)


def test_preprocess_is_bgr_and_normalised():
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0] = 1.0  # pure red
    y = preprocess(x, 32)
    assert torch.allclose(y[:, 2], torch.ones(1, 32, 32)) and torch.allclose(y[:, 0], -torch.ones(1, 32, 32))
    assert preprocess(torch.rand(2, 3, 128, 128), 32, border=1 / 16).shape == (2, 3, 32, 32)


def test_adaface_margin_follows_the_formula():
    torch.manual_seed(0)
    head = AdaFaceHead(4, 3, m=0.4, h=0.333, s=10.0).eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(3.0)
    emb = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    norms = torch.tensor([[40.0], [10.0]])  # high quality (scaler clipped to 1), low quality (clipped to -1)
    labels = torch.tensor([0, 1])
    loss = head(emb, norms, labels)
    k = torch.nn.functional.normalize(head.kernel, dim=0)
    cos = (emb @ k).clamp(-1 + 1e-3, 1 - 1e-3)
    logits = cos.clone()
    # scaler +1: theta - m then minus 2m; scaler -1: theta + m, no additive margin
    logits[0, 0] = math.cos(math.acos(cos[0, 0]) - 0.4) - 0.8
    logits[1, 1] = math.cos(math.acos(cos[1, 1]) + 0.4) - 0.0
    want = torch.nn.functional.cross_entropy(logits * 10.0, labels)
    assert torch.allclose(loss, want, atol=1e-5)


def test_save_and_load_encoder_round_trip(tmp_path):
    m = IRBackbone(SMALL).eval()
    save_encoder(m, tmp_path / "e.safetensors", "small")
    got, name = load_encoder(tmp_path / "e.safetensors")
    x = torch.rand(2, 3, 32, 32)
    assert name == "small" and torch.equal(m(x)[0], got(x)[0])
    # Same weights, same bytes (safetensors' own writer orders the metadata at random; DVC hashes files)
    first = (tmp_path / "e.safetensors").read_bytes()
    for _ in range(5):
        save_encoder(m, tmp_path / "e.safetensors", "small")
        assert (tmp_path / "e.safetensors").read_bytes() == first


def test_verification_metrics():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    labels = np.repeat(np.arange(20), 4)
    good = verification(centres[labels] + rng.normal(0, 0.05, (80, 32)), labels, seed=0)
    bad = verification(rng.normal(size=(80, 32)), labels, seed=0)
    assert good["verification_accuracy"] > 0.98 and 0.35 < bad["verification_accuracy"] < 0.65
    assert good["positive_pairs"] == 20 * 6
