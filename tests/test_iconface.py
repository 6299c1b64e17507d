"""IConFace on a tiny FLUX.2 transformer: stock equivalence, gradients, masking, LoRA round trip."""

import math

import pytest
import torch
from torch import nn

from models.codecs import Flux2VAECodec, PixelCodec, patchify, unpatchify
from models.iconface import (
    VARIANTS,
    Conditioning,
    IConFace,
    IConFaceConfig,
    build_backbone,
    count_parameters,
    stock_forward,
)
from models.lora import add_lora, load_trainable, lora_parameters, save_trainable
from models.pathways import FrontEnd, aggregate_identity, identity_anchor, load_front, save_front
from models.sampler import flux2_sigmas, sample

B, C, H, W = 2, 48, 4, 4


def _cond(r=2, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        deg=torch.randn(B, C, H, W, generator=g),
        refs=torch.randn(B, r, C, H, W, generator=g),
        ref_mask=torch.ones(B, r, dtype=torch.bool) if mask is None else mask,
        z_refs=torch.randn(B, r, 512, generator=g) * 20,
        z_deg=torch.randn(B, 512, generator=g) * 20,
        text=torch.randn(B, 5, 96, generator=g),
    )


def _model(variant="full", lora=False, seed=0, readout=False, ref_readout=False):
    torch.manual_seed(seed)
    tr = build_backbone("tiny")
    if lora:
        add_lora(tr, 16)
    return IConFace(
        tr, IConFaceConfig(variant=variant, memory_tokens=8, deg_readout=readout, ref_readout=ref_readout)
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("refs", [0, 1, 3])
def test_zero_init_equals_the_stock_diffusers_forward(variant, refs):
    m = _model(variant, lora=True, ref_readout=refs == 1)  # the reference readout starts at zero too
    c = _cond(refs)
    scene, sigma = torch.randn(B, C, H, W), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        assert torch.equal(m(scene, sigma, c), stock_forward(m.transformer, scene, sigma, c))


def _perturb(m):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.pathway_parameters() + lora_parameters(m.transformer):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_gradients_reach_every_trainable_part_and_no_frozen_one():
    m = _model("full", lora=True, ref_readout=True)
    _perturb(m)
    c = _cond(2)
    out = m(torch.randn(B, C, H, W), torch.tensor([0.3, 0.6]), c)
    out.square().mean().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("identity.") for n in trainable)
    assert any(n.startswith("xattn.") for n in trainable) and not any("add_q_proj" in n for n in trainable)
    assert any(n.startswith("ref_fuse.") for n in trainable)


@pytest.mark.parametrize("readout,ref_readout", [(False, False), (True, False), (True, True)])
def test_masked_or_absent_references_give_the_same_scene_output(readout, ref_readout):
    m = _model("full", readout=readout, ref_readout=ref_readout)
    _perturb(m)
    mask = torch.tensor([[True, True], [True, False]])
    c = _cond(2, mask)
    scene, sigma = torch.randn(B, C, H, W), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        padded = m(scene, sigma, c)
        alone = m(
            scene[1:],
            sigma[1:],
            Conditioning(
                c.deg[1:], c.refs[1:, :1], c.ref_mask[1:, :1], c.z_refs[1:, :1], c.z_deg[1:], c.text[1:]
            ),
        )
        c0 = _cond(0)
        absent = m(scene, sigma, c0)  # no reference segment at all
        none = torch.zeros(B, 2, dtype=torch.bool)
        all_masked = m(
            scene,
            sigma,
            Conditioning(c0.deg, torch.randn(B, 2, C, H, W), none, torch.randn(B, 2, 512), c0.z_deg, c0.text),
        )
    assert torch.allclose(padded[1:], alone, atol=1e-5)
    assert torch.allclose(all_masked, absent, atol=1e-5)


def _fit_at_sigma_1(cfg: IConFaceConfig, case, steps: int, tail: int) -> float:
    """Mean relative x0 loss of the last `tail` of `steps` AdamW steps of a tiny random backbone at
    σ = 1 (scene tokens pure noise), started at x0 = deg (x0_residual); `case(g)` draws one batch:
    (conditioning, target x0, the loss's normaliser)."""
    torch.manual_seed(0)
    tr = build_backbone("tiny")
    nn.init.zeros_(tr.proj_out.weight)  # the x0_residual start: x0 = deg
    m = IConFace(tr, cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        c, target, norm = case(g)
        x0 = c.deg + m(torch.randn(B, C, H, W, generator=g), torch.ones(B), c)
        loss = ((x0 - target) ** 2).mean() / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-tail:]) / tail


def test_degraded_readout_lets_a_random_backbone_use_the_degraded_image_at_sigma_1():
    """Scene tokens are pure noise at σ = 1; the target is a fixed function of the degraded image.
    With the readout the head sees the aligned degraded token and learns it; without, a random
    backbone must first learn position-aligned attention (models.iconface, "Degraded readout")."""

    def case(g):
        c = _cond(0)
        c.deg = torch.randn(B, C, H, W, generator=g)
        return c, 0.5 * c.deg, 0.25 * c.deg.pow(2).mean()

    with_readout, without = (
        _fit_at_sigma_1(IConFaceConfig(variant="concat", deg_readout=r), case, 80, 20) for r in (True, False)
    )
    assert with_readout < 0.7 * without, (with_readout, without)


def test_reference_readout_lets_a_random_backbone_take_detail_from_an_aligned_reference():
    """At σ = 1 the target is the degraded image plus a detail that only the (aligned) reference shows.
    With the reference readout the head sees the reference's token at the same position and learns to
    take it; without, a random backbone must first learn position-aligned attention to the reference
    segment (models.iconface, "Reference readout")."""

    def case(g):
        c = _cond(1)
        detail = torch.randn(B, C, H, W, generator=g)
        c.deg = torch.randn(B, C, H, W, generator=g)
        c.refs = (torch.randn(B, C, H, W, generator=g) * 0.3 + detail).unsqueeze(1)  # own "lighting"
        return c, c.deg + 0.5 * detail, 0.25 * detail.pow(2).mean()

    with_readout, without = (
        _fit_at_sigma_1(IConFaceConfig(variant="concat", deg_readout=True, ref_readout=r), case, 200, 40)
        for r in (True, False)
    )
    assert with_readout < 0.7 * without, (with_readout, without)


def test_the_reference_readout_follows_the_backbone():
    """auto: on for a random backbone predicting x0_residual (the CPU default), off for the recipe."""
    from pipelines.config import TrainConfig
    from pipelines.network import reference_readout

    assert reference_readout(TrainConfig())
    assert not reference_readout(TrainConfig(prediction="velocity"))
    assert not reference_readout(TrainConfig(reference_readout="off"))
    assert reference_readout(TrainConfig(prediction="velocity", reference_readout="on"))


def test_identity_aggregation_matches_eq_4():
    z = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [9.0, 9.0]]])  # norms 5, 2, (masked)
    mask = torch.tensor([[True, True, False]])
    e = aggregate_identity(z, mask, temperature=1.0)
    want = torch.tensor([5 / 7 * 0.6 + 2 / 7 * 0.0, 5 / 7 * 0.8 + 2 / 7 * 1.0])  # w = q / Σq at T = 1
    assert torch.allclose(e, (want / want.norm()).unsqueeze(0), atol=1e-6)
    e2 = aggregate_identity(z, mask, temperature=2.0)  # w ∝ q^(1/2)
    w = torch.tensor([math.sqrt(5), math.sqrt(2)])
    w = w / w.sum()
    want2 = w[0] * torch.tensor([0.6, 0.8]) + w[1] * torch.tensor([0.0, 1.0])
    assert torch.allclose(e2, (want2 / want2.norm()).unsqueeze(0), atol=1e-6)
    # no reference: the degraded image's own normalised embedding
    anchor = identity_anchor(z, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([[0.0, 7.0]]))
    assert torch.allclose(anchor, torch.tensor([[0.0, 1.0]]))


def test_lora_saved_and_reloaded_reproduces_the_output_bit_for_bit(tmp_path):
    m = _model("full", lora=True)
    _perturb(m)
    save_trainable(m, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and (
        tmp_path / "iconface_pathways.safetensors"
    ).is_file()
    fresh = _model("full", lora=False, seed=0)  # same frozen base, no adapter yet
    load_trainable(fresh, tmp_path)
    c, scene, sigma = _cond(3), torch.randn(B, C, H, W), torch.tensor([0.5, 0.1])
    with torch.no_grad():
        assert torch.equal(m(scene, sigma, c), fresh(scene, sigma, c))
    with_adapter = _model("full", lora=True, seed=0)  # an adapter already present (as in training)
    load_trainable(with_adapter, tmp_path)
    with torch.no_grad():
        assert torch.equal(m(scene, sigma, c), with_adapter(scene, sigma, c))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert not any("add_q_proj" in k or "ff_context" in k for k in keys)


def test_lora_rank_zero_is_refused():
    with pytest.raises(ValueError, match="rank"):
        add_lora(build_backbone("tiny"), 0)


def test_unknown_backbone_and_variant():
    with pytest.raises(ValueError, match="valid: tiny, small, klein_base_4b"):
        build_backbone("klein_9b")
    with pytest.raises(ValueError, match="valid: concat"):
        IConFaceConfig(variant="half")
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone("klein_base_4b", weights="/nonexistent/flux2")


def test_klein_config_has_the_published_size():
    with torch.device("meta"):
        tr = build_backbone("klein_base_4b")
    assert count_parameters(tr) == 3_875_544_576
    with torch.device("meta"):
        add_lora(tr, 16)
        m = IConFace(tr, IConFaceConfig())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert 0 < trainable < 0.1 * count_parameters(tr)


def test_sampler_schedule_and_modes():
    s = flux2_sigmas(12, 1024)
    want = [1, 0.988, 0.973, 0.956, 0.935, 0.910, 0.878, 0.837, 0.783, 0.706, 0.590, 0.396, 0]
    assert torch.allclose(s, torch.tensor(want, dtype=torch.float32), atol=2e-3)
    m = _model("full")
    for r in (0, 1, 3):
        c = _cond(r)
        z1 = sample(m, c, torch.zeros(1, 5, 96), (B, C, H, W), steps=3, guidance=4.0, seed=42)
        z2 = sample(m, c, torch.zeros(1, 5, 96), (B, C, H, W), steps=3, guidance=4.0, seed=42)
        assert z1.shape == (B, C, H, W) and torch.equal(z1, z2)


def test_codecs_round_trip():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    pc = PixelCodec(4)
    assert pc.encode(x).shape == (2, 48, 4, 4) and torch.allclose(pc.decode(pc.encode(x)), x)
    z = torch.randn(2, 8, 6, 6)
    assert torch.equal(unpatchify(patchify(z)), z)


def test_flux2_vae_codec_on_a_tiny_vae(tmp_path):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.bn.running_mean.uniform_(-0.5, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    vae.save_pretrained(tmp_path / "vae")
    codec = Flux2VAECodec.from_path(tmp_path / "vae")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (1, 16, 8, 8) and codec.channels == 16 and codec.factor == 4
    raw = patchify(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).sqrt()
    assert torch.allclose(z, (raw - mean) / std, atol=1e-5)
    assert codec.decode(z).shape == (1, 3, 32, 32)
    with pytest.raises(FileNotFoundError):
        Flux2VAECodec.from_path(tmp_path / "missing")


def test_every_safetensors_write_is_byte_reproducible(tmp_path):
    """safetensors' own save_file orders `__metadata__` per process (a Rust HashMap): a fresh clone's
    front end once came out with other bytes than the committed one. Every write goes through
    models.safetensors_io, which sorts the metadata keys."""
    import json
    import re
    import struct
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    own = root / "models" / "safetensors_io.py"
    pattern = re.compile(r"from safetensors\.torch import [^\n]*\bsave(_file)?\b|safetensors\.torch\.save")
    offenders = [
        str(p.relative_to(root))
        for d in ("models", "pipelines", "stages", "annotation", "benchmarks")
        for p in sorted((root / d).rglob("*.py"))
        if p != own and pattern.search(p.read_text())
    ]
    assert offenders == [], f"write safetensors through models.safetensors_io.save_file: {offenders}"
    front = FrontEnd(width=8)
    save_front(front, tmp_path / "front.safetensors")
    raw = (tmp_path / "front.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert list(meta) == sorted(meta) == ["format", "width"]
    load_front(FrontEnd(width=8), tmp_path / "front.safetensors")  # still a valid file


def test_the_degradation_embedding_starts_as_the_model_without_it_and_is_trained():
    m = IConFace(
        _model("full", lora=True, ref_readout=True).transformer,
        IConFaceConfig(variant="full", memory_tokens=8, ref_readout=True, degradation_embed=True),
    )
    base = IConFace(m.transformer, IConFaceConfig(variant="full", memory_tokens=8, ref_readout=True))
    base.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("deg_embed.")})
    _perturb(base)
    m.load_state_dict(base.state_dict(), strict=False)
    c = _cond(2)
    scene, sigma = torch.randn(B, C, H, W), torch.tensor([0.2, 0.9])
    with pytest.raises(ValueError, match="Conditioning.degradation is missing"):
        m(scene, sigma, c)
    c.degradation = torch.log(torch.tensor([3.0, 30.0]))  # a blurred and a sharp input
    with torch.no_grad():
        assert torch.equal(m(scene, sigma, c), base(scene, sigma, c))  # zero-initialised
    m(scene, sigma, c).square().mean().backward()
    assert m.deg_embed.out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        m.deg_embed.out.weight.normal_(0, 0.05)
        swapped = Conditioning(**{**c.__dict__, "degradation": c.degradation.flip(0)})
        a, b = m(scene, sigma, c), m(scene, sigma, swapped)
    assert not torch.allclose(a, b)  # the same inputs, told apart by their sharpness only
