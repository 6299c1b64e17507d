"""Seed 002 as a conditioning of the same model: Composite Context (eq. 1), its FaRL loader, the Hard
Example Identity loss (eq. 3), the guidance of eq. 5 and the multi-reference ensemble of eq. 6, on
hand-computed cases and a tiny FLUX.2 transformer; the restorer, the CLI and the pyfunc model take the
guidance options."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import write_encoders

from models.composite import (
    ClipVisionConfig,
    ClipVisionTower,
    CompositeContext,
    build_composite,
    load_farl,
    sinusoidal_positions,
)
from models.guidance import (
    apply_cfg_drops,
    draw_cfg_drops,
    drop_context,
    drop_image,
    dual_guidance,
    ensemble_mean,
)
from models.iconface import Conditioning, IConFace, IConFaceConfig, build_backbone
from models.losses import LossWeights, hard_example_identity, iconface_loss
from models.sampler import flux2_sigmas, sample

B, C, H, W = 2, 48, 4, 4


# ==================================================================================================
# Eq. 5 and eq. 6
# ==================================================================================================


def test_eq5_by_hand_and_plain_cfg_when_the_scales_are_equal():
    u00, ui0, uic = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])
    # (1 − 1.5)·1 + (1.5 − 1.2)·2 + 1.2·4 = −0.5 + 0.6 + 4.8
    assert dual_guidance(u00, ui0, uic, 1.5, 1.2).item() == pytest.approx(4.9)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, generator=g) for _ in range(3))
    for s in (0.0, 1.0, 1.2, 4.0):
        assert torch.allclose(dual_guidance(a, b, c, s, s), a + s * (c - a), atol=1e-6)  # plain CFG
    assert torch.equal(dual_guidance(a, b, c, 1.0, 1.0), c)  # no guidance: the conditional branch


def test_ensemble_mean_averages_each_samples_own_references():
    p = [torch.full((3, 1), v) for v in (1.0, 2.0, 6.0)]
    mask = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    got = ensemble_mean(p, mask).flatten().tolist()
    assert got == [3.0, 3.5, 1.0]  # (1+2+6)/3, (1+6)/2, no reference: slot 0's (masked) prediction


def _toy_cond(mask: torch.Tensor) -> Conditioning:
    g = torch.Generator().manual_seed(3)
    r = mask.shape[1]
    return Conditioning(
        deg=torch.randn(B, C, H, W, generator=g),
        refs=torch.randn(B, r, C, H, W, generator=g),
        ref_mask=mask,
        z_refs=torch.randn(B, r, 8, generator=g),
        z_deg=torch.randn(B, 8, generator=g),
        text=torch.zeros(B, 1, 4),
    )


class Linear:
    """u = 2·deg + 3·Σ_valid refs: ε(∅,∅) = 0, ε(LQ,∅) = 2·deg, ε(LQ,c) = 2·deg + 3·Σ refs."""

    def __init__(self):
        self.calls = 0

    def __call__(self, z, sigma, cond):
        self.calls += 1
        m = cond.ref_mask.float().view(B, -1, 1, 1, 1)
        return 2 * cond.deg + 3 * (m * cond.refs).sum(1)


def test_the_sampler_applies_eq5_and_eq6_exactly():
    """One Euler step from σ = 1 to 0 is z = ε − ũ, so ũ can be read back and compared to the hand
    formula: eq. 5 → 2·s_i·deg + 3·s_c·Σ refs; eq. 6 → 2·s_i·deg + 3·s_c·mean(refs) per sample."""
    assert flux2_sigmas(1, H * W).tolist() == [1.0, 0.0]
    noise = torch.randn((B, C, H, W), generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[True, True], [True, False]])
    cond = _toy_cond(mask)
    refs = cond.refs
    s_i, s_c = 1.5, 1.2

    def u_of(**kw):
        model = Linear()
        z = sample(model, cond, torch.zeros(1, 1, 4), (B, C, H, W), steps=1, guidance=1.0, seed=7, **kw)
        return noise - z, model.calls

    u, calls = u_of(guidance_image=s_i, guidance_context=s_c)
    want = 2 * s_i * cond.deg + 3 * s_c * torch.stack([refs[0, 0] + refs[0, 1], refs[1, 0]])
    assert torch.allclose(u, want, atol=1e-5) and calls == 3
    u, calls = u_of(guidance_image=s_i, guidance_context=s_c, ref_ensemble=True)
    want = 2 * s_i * cond.deg + 3 * s_c * torch.stack([(refs[0, 0] + refs[0, 1]) / 2, refs[1, 0]])
    assert torch.allclose(u, want, atol=1e-5) and calls == 4  # 2 slots + ε(LQ,∅) + ε(∅,∅)
    u, calls = u_of(guidance_image=1.3, guidance_context=1.3)  # s_i = s_c: ε(LQ,∅) is not evaluated
    assert calls == 2 and torch.allclose(u, 1.3 * Linear()(None, None, cond), atol=1e-5)
    u, calls = u_of(ref_ensemble=True)  # s_i = s_c = 1: the ensemble alone
    assert calls == 2
    with pytest.raises(ValueError, match="exclude each other: set guidance to 1.0"):
        sample(Linear(), cond, torch.zeros(1, 1, 4), (B, C, H, W), steps=1, guidance=4.0, guidance_image=1.2)


def test_the_unconditional_branches_mask_the_context_and_zero_the_image():
    cond = _toy_cond(torch.tensor([[True, True], [True, False]]))
    assert not drop_context(cond).ref_mask.any() and torch.equal(drop_context(cond).deg, cond.deg)
    d = drop_image(cond)
    assert not d.deg.any() and not d.z_deg.any() and torch.equal(d.ref_mask, cond.ref_mask)
    rows = drop_image(cond, torch.tensor([False, True]))
    assert torch.equal(rows.deg[0], cond.deg[0]) and not rows.deg[1].any() and not rows.z_deg[1].any()


def test_cfg_drops_are_independent_at_their_rates():
    d = draw_cfg_drops(20000, 0.1, 0.2, torch.Generator().manual_seed(0)).float()
    rates = d.mean(0).tolist()
    assert abs(rates[0] - 0.1) < 0.01 and abs(rates[1] - 0.2) < 0.01 and abs(rates[2] - 0.2) < 0.01
    assert abs((d[:, 1] * d[:, 2]).mean().item() - 0.04) < 0.006  # independent components
    cond = apply_cfg_drops(
        _toy_cond(torch.ones(B, 2, dtype=torch.bool)), torch.tensor([[True, False, True]] * 2)
    )
    assert not cond.deg.any() and cond.ctx_drop.tolist() == [[False, True]] * 2


# ==================================================================================================
# Composite Context on the tiny transformer
# ==================================================================================================


def _composite_model(seed: int = 0) -> IConFace:
    torch.manual_seed(seed)
    tr = build_backbone("tiny")
    comp = CompositeContext(512, 96, ClipVisionTower(ClipVisionConfig(16, 4, 16, 1, 2, None)), True)
    m = IConFace(tr, IConFaceConfig(memory_tokens=8, conditioning="composite"), comp)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the zero initialisation, so that every part acts
        for p in m.pathway_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _cond(r: int, mask=None, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        deg=torch.randn(B, C, H, W, generator=g),
        refs=torch.randn(B, r, C, H, W, generator=g),
        ref_mask=torch.ones(B, r, dtype=torch.bool) if mask is None else mask,
        z_refs=torch.randn(B, r, 512, generator=g) * 20,
        z_deg=torch.randn(B, 512, generator=g) * 20,
        text=torch.randn(B, 5, 96, generator=g),
        ref_images=torch.rand(B, r, 3, 16, 16, generator=g) * 2 - 1,
    )


def test_sinusoidal_positions_by_hand():
    pe = sinusoidal_positions(3, 6)
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    want = [math.sin(2), math.cos(2), math.sin(2 / 10000 ** (2 / 6)), math.cos(2 / 10000 ** (2 / 6))]
    assert pe[2, :4].tolist() == pytest.approx(want, abs=1e-6)
    assert sinusoidal_positions(2, 5).shape == (2, 5)


def test_composite_context_layout_and_masks():
    comp = _composite_model().composite
    c = _cond(2, torch.tensor([[True, True], [True, False]]))
    ctx, keep = comp(c.z_refs, c.ref_images, c.ref_mask, torch.tensor([[True, False], [False, True]]))
    t = 1 + 17  # identity token + (16/4)² + 1 general tokens per reference
    assert ctx.shape == (B, 2 * t, 96) and keep.shape == (B, 2 * t)
    k = keep.view(B, 2, t)
    assert not k[0, :, 0].any() and k[0, :, 1:].all()  # sample 0: identity tokens dropped
    assert k[1, 0, 0] and not k[1, 0, 1:].any()  # sample 1: general tokens dropped
    assert not k[1, 1].any()  # sample 1's padded slot
    # eq. 1: the identity token is W_H·e + e_position[0]; it depends on the direction of z only
    e = torch.nn.functional.normalize(c.z_refs[0, 0], dim=-1)
    assert torch.allclose(ctx[0, 0], comp.w_h(e) + sinusoidal_positions(t, 96)[0], atol=1e-5)
    ctx2, _ = comp(c.z_refs * 3, c.ref_images, c.ref_mask)
    assert torch.allclose(ctx2, ctx, atol=1e-5)


def test_masked_context_tokens_change_nothing():
    """A padded reference slot, and a dropped component, are exactly absent (as padding is for IConFace):
    the scene output equals the forward without them, and nothing behind the mask moves it."""
    m = _composite_model()
    scene, sigma = torch.randn(B, C, H, W), torch.tensor([0.4, 0.7])
    c = _cond(2, torch.tensor([[True, True], [True, False]]))
    with torch.no_grad():
        padded = m(scene, sigma, c)
        alone = m(
            scene[1:],
            sigma[1:],
            Conditioning(
                c.deg[1:],
                c.refs[1:, :1],
                c.ref_mask[1:, :1],
                c.z_refs[1:, :1],
                c.z_deg[1:],
                c.text[1:],
                ref_images=c.ref_images[1:, :1],
            ),
        )
        assert torch.allclose(padded[1:], alone, atol=1e-5)
        # sample 1 with both slots masked while sample 0 keeps one: sample 1 as without any reference
        row_masked = m(scene, sigma, replace(c, ref_mask=torch.tensor([[True, False], [False, False]])))
        absent = m(
            scene,
            sigma,
            replace(
                c, refs=c.refs[:, :0], ref_mask=c.ref_mask[:, :0], z_refs=c.z_refs[:, :0], ref_images=None
            ),
        )  # no reference segment at all: the prompt alone
        assert torch.allclose(row_masked[1], absent[1], atol=1e-5)
        assert not torch.allclose(row_masked[0], absent[0], atol=1e-4)
        full = replace(c, ref_mask=torch.ones(B, 2, dtype=torch.bool))
        other_id = replace(full, z_refs=torch.randn(B, 2, 512) * 20)
        other_img = replace(full, ref_images=torch.rand(B, 2, 3, 16, 16) * 2 - 1)
        base = m(scene, sigma, full)
        assert not torch.allclose(m(scene, sigma, other_id), base, atol=1e-4)  # both components act
        assert not torch.allclose(m(scene, sigma, other_img), base, atol=1e-4)
        drop_id = torch.tensor([[True, False]] * B)
        drop_g = torch.tensor([[False, True]] * B)

        def run(cond, drop):
            return m(scene, sigma, replace(cond, ctx_drop=drop))

        assert torch.allclose(run(other_id, drop_id), run(full, drop_id), atol=1e-5)
        assert torch.allclose(run(other_img, drop_g), run(full, drop_g), atol=1e-5)
        assert not torch.allclose(run(full, drop_id), base, atol=1e-4)


def test_composite_replaces_the_in_context_references_and_the_identity_pathway():
    m = _composite_model()
    assert m.identity is None and m.composite is not None
    with pytest.raises(ValueError, match="conditioning 'composite' needs a CompositeContext"):
        IConFace(build_backbone("tiny"), IConFaceConfig(conditioning="composite"))
    with pytest.raises(ValueError, match="valid: iconface, composite"):
        IConFaceConfig(conditioning="seed002")
    c = _cond(1)
    out = m(torch.randn(B, C, H, W), torch.tensor([0.3, 0.6]), c)
    out.square().mean().backward()
    for name in ("composite.w_h.weight", "composite.w_g.weight", "composite.encoder.conv1.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="needs Conditioning.ref_images"):
        m(torch.randn(B, C, H, W), torch.tensor([0.3, 0.6]), replace(c, ref_images=None))


@pytest.mark.parametrize("conditioning", ["composite", "iconface"])
def test_eq6_with_one_reference_is_eq5_on_a_real_model(conditioning):
    """Eq. 6 with N = 1 is eq. 5: the same latents, bit for bit, for either conditioning (for IConFace
    the context is its reference conditioning; models.guidance)."""
    if conditioning == "composite":
        m = _composite_model()
    else:
        torch.manual_seed(0)
        m = IConFace(build_backbone("tiny"), IConFaceConfig(memory_tokens=8))
    c = _cond(1)
    kw = dict(steps=2, guidance=1.0, seed=3, guidance_image=1.2, guidance_context=1.4)
    with torch.no_grad():
        a = sample(m, c, torch.zeros(1, 5, 96), (B, C, H, W), **kw)
        b = sample(m, c, torch.zeros(1, 5, 96), (B, C, H, W), ref_ensemble=True, **kw)
        joint = sample(m, _cond(2), torch.zeros(1, 5, 96), (B, C, H, W), **kw)
        ensemble = sample(m, _cond(2), torch.zeros(1, 5, 96), (B, C, H, W), ref_ensemble=True, **kw)
    assert torch.equal(a, b) and not torch.allclose(ensemble, joint, atol=1e-4)


# ==================================================================================================
# FaRL checkpoints (CLIP ViT-B/16 state dicts), on a tiny config
# ==================================================================================================

TINY_CLIP = ClipVisionConfig(input_resolution=32, patch_size=8, width=32, layers=2, heads=2, output_dim=16)


def _farl_file(tmp_path, tower: ClipVisionTower, **extra) -> str:
    """A checkpoint in FaRL's released layout: {"state_dict": whole-CLIP state dict} (+ text tower keys)."""
    state = {f"visual.{k}": v.clone() for k, v in tower.state_dict().items()}
    state["token_embedding.weight"] = torch.zeros(10, 8)
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "FaRL-tiny.pth"
    torch.save({"state_dict": state, **extra}, path)
    return str(path)


def test_farl_checkpoint_loads_and_its_tower_matches_transformers_clip(tmp_path):
    """The tower loaded from a FaRL-format file gives the tokens of transformers' CLIPVisionModel (an
    independent implementation) with the converted weights: post_layernorm of every token."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    src = ClipVisionTower(TINY_CLIP)
    path = _farl_file(tmp_path, src)
    tower = ClipVisionTower(TINY_CLIP)
    load_farl(tower, path)
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in src.state_dict().items())

    hf = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )  # fmt: skip
    ).eval()
    s = src.state_dict()
    conv = {
        "embeddings.class_embedding": s["class_embedding"],
        "embeddings.patch_embedding.weight": s["conv1.weight"],
        "embeddings.position_embedding.weight": s["positional_embedding"],
        "pre_layrnorm.weight": s["ln_pre.weight"],
        "pre_layrnorm.bias": s["ln_pre.bias"],
        "post_layernorm.weight": s["ln_post.weight"],
        "post_layernorm.bias": s["ln_post.bias"],
    }
    for i in range(2):
        p, q = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            conv[q + f"self_attn.{name}.weight"] = s[p + "attn.in_proj_weight"].chunk(3)[j]
            conv[q + f"self_attn.{name}.bias"] = s[p + "attn.in_proj_bias"].chunk(3)[j]
        for a, b in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            conv[q + b + ".weight"], conv[q + b + ".bias"] = s[p + a + ".weight"], s[p + a + ".bias"]
    vm = getattr(hf, "vision_model", hf)  # transformers 5 has no vision_model wrapper
    missing, unexpected = vm.load_state_dict(conv, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tower(x)
        ref = vm.post_layernorm(hf(pixel_values=x).last_hidden_state)
    assert ours.shape == (2, 17, 32) and torch.allclose(ours, ref, atol=1e-5)

    frozen = CompositeContext(512, 96, tower, train_encoder=False)
    assert not any(p.requires_grad for p in frozen.encoder.parameters()) and frozen.w_g.weight.requires_grad


def test_farl_loading_errors_name_the_file(tmp_path):
    torch.manual_seed(0)
    src = ClipVisionTower(TINY_CLIP)
    path = _farl_file(tmp_path, src)
    with pytest.raises(ValueError, match=r"FaRL-tiny.pth: \S+ has shape .*, the config needs"):
        load_farl(ClipVisionTower(replace(TINY_CLIP, width=48, heads=2)), path)
    with pytest.raises(ValueError, match="image-tower keys missing for this config"):
        load_farl(ClipVisionTower(replace(TINY_CLIP, layers=3)), path)
    with pytest.raises(FileNotFoundError, match="missing.pth not found"):
        load_farl(ClipVisionTower(TINY_CLIP), tmp_path / "missing.pth")
    import argparse

    unsafe = _farl_file(tmp_path, src, args=argparse.Namespace(lr=1))
    with pytest.raises(ValueError, match="not loadable with weights_only=True"):
        load_farl(ClipVisionTower(TINY_CLIP), unsafe)
    torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: no `visual.\\*` keys"):
        load_farl(ClipVisionTower(TINY_CLIP), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="valid: farl_vit_b16, small"):
        build_composite("farl_vit_l14", None, 512, 96)


# ==================================================================================================
# Hard Example Identity loss (eq. 3)
# ==================================================================================================


def test_hard_example_identity_loss_by_hand():
    e_out = torch.tensor([[1.0, 0.0]])
    e_ref = torch.tensor([[1.0, 0.0]])  # L_ID(x_REF, x̂) = 0
    e_gt = torch.tensor([[0.0, 1.0]])  # L_ID(x_HQ, x̂) = 1
    assert hard_example_identity(e_out, e_ref, e_gt, 0.6).item() == pytest.approx(0.4)
    assert hard_example_identity(e_out, e_ref, e_gt, 0.0).item() == pytest.approx(1.0)  # GT only
    assert hard_example_identity(e_out, e_ref, e_gt, 1.0).item() == pytest.approx(0.0)  # reference only
    e_gt2 = torch.tensor([[0.6, 0.8]])  # cos 0.6 → L = 0.4
    assert hard_example_identity(e_out, e_ref, e_gt2, 0.6).item() == pytest.approx(0.4 * 0.4)
    # In the total: 0.75·fm + 0.30·ω(σ)·L_HID, fm = 1, σ = 0.5 → ω = 0.25
    u, t = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    w = LossWeights(id_loss="hard_example", hei_lambda=0.6)
    out = iconface_loss(u, t, torch.tensor([0.5]), e_out, e_ref, e_gt, torch.tensor([True]), w)
    assert out["loss"].item() == pytest.approx(0.75 + 0.30 * 0.25 * 0.4)
    assert out["lambda_star"].item() == pytest.approx(0.4)  # the GT term's weight, 1 − λ
    adaptive = iconface_loss(u, t, torch.tensor([0.5]), e_out, e_ref, e_gt, torch.tensor([True]))
    # λ* = 0.25·(1 − cos(e_ref, e_gt)) = 0.25 → 0.75·0 + 0.25·1 on the bracket
    assert adaptive["loss"].item() == pytest.approx(0.75 + 0.30 * 0.25 * 0.25)
    with pytest.raises(ValueError, match="valid: adaptive, hard_example"):
        LossWeights(id_loss="triplet")


# ==================================================================================================
# Training steps and the restorer / CLI / pyfunc paths
# ==================================================================================================


def _cfg(**over):
    from pipelines.config import TrainConfig, build

    base = {
        "backbone": "tiny",
        "pixel_patch": 4,
        "memory_tokens": 4,
        "front_end": 0,
        "front": None,
        "conditioning": "composite",
    }
    return build(TrainConfig, {**base, **over}, "train")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"composite": {"general_encoder": "farl_vit_b16"}},
            "train.composite.general_encoder farl_vit_b16 needs general_encoder_weights",
        ),
        ({"composite": {"context_dropout": 1.0}}, r"train.composite.context_dropout must lie in \[0, 1\)"),
        ({"composite": {"hei_lambda": 1.5}}, r"train.composite.hei_lambda must lie in \[0, 1\]"),
        ({"strategy": "ddp"}, "needs ddp_find_unused_parameters_true"),
        ({"conditioning": "refstar"}, "conditioning"),
        ({"composite": {"id_loss": "triplet"}}, "train.composite.id_loss"),
    ],
)
def test_bad_composite_configuration_says_what_to_change(override, message):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _cfg(**override)


@pytest.mark.parametrize("id_loss", ["hard_example", "adaptive"])
def test_three_composite_training_steps_decrease_the_loss(id_loss):
    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.batches import make_batch
    from pipelines.module import IConFaceModule
    from pipelines.network import build_network

    cfg = _cfg(
        composite={"id_loss": id_loss, "context_dropout": 0.3, "image_dropout": 0.3},
        lr=1e-3,
        lr_schedule="constant",
    )
    torch.manual_seed(0)
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 8, 16, 16), 16, stem_stride=2)).eval()
    net, codec, text = build_network(cfg, 16)
    assert net.composite is not None and net.identity is None
    module = IConFaceModule.from_config(net, codec, enc, text, cfg)
    assert module.optim.context_dropout == 0.3 and module.weights.id_loss == id_loss
    module.log = module.log_dict = lambda *a, **k: None
    module.optimizers = lambda: None
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    batch = make_batch(
        [img() for _ in range(4)],
        [[img()] for _ in range(4)],
        [[rng.normal(size=16).astype(np.float32)] for _ in range(4)],
        gt=[img() for _ in range(4)],
        z_gt=[rng.normal(size=16).astype(np.float32) for _ in range(4)],
    )
    batch["wanted"] = batch["got"] = [1] * 4
    opt = module.configure_optimizers()
    losses = []
    for _ in range(3):  # the same batch, σ, ε and drops each step (global_step stays 0 outside a Trainer)
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[2] < losses[0], losses
    assert module.history[0]["id"] > 0  # the identity loss took part


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny composite bundle trained with one reference (max_refs 1), random pathways."""
    from models.lora import save_trainable
    from pipelines.network import build_network
    from pipelines.restorer import write_bundle

    tmp = tmp_path_factory.mktemp("composite_bundle")
    enc = write_encoders(tmp / "encoders")
    cfg = _cfg(max_refs=1, ref_schedule=[0.5, 0.5], train_backbone=True)
    net, _, _ = build_network(cfg, 512)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-2)
    save_trainable(net, tmp / "model")
    return write_bundle(
        tmp / "bundle", cfg, tmp / "model", "small_ir", enc / "primary.safetensors", 32, steps=2
    )


def _faces(n: int) -> list[np.ndarray]:
    from pipelines.synthetic import face_spec, render

    return [render(face_spec(5, "album", 0, j), 64, 32) for j in range(n)]


def test_restorer_cli_and_pyfunc_take_seed_002s_guidance(bundle, tmp_path):
    import json

    import mlflow
    import pandas as pd
    from PIL import Image

    from pipelines.registry import encode_image, log_model_version
    from pipelines.restorer import InputError, Restorer
    from stages.cli import main

    r = Restorer(bundle)
    lq, *refs = _faces(4)
    plain = r.restore(lq, refs[:1])
    one = r.restore(lq, refs[:1], ref_ensemble=True)
    assert np.array_equal(one, plain)  # eq. 6 with one reference is the plain forward (s_i = s_c = 1)
    guided = r.restore(lq, refs[:1], guidance_image=1.2, guidance_context=1.2)
    assert not np.array_equal(guided, plain)
    with pytest.raises(InputError, match=r"at most 1 \(ref_ensemble takes up to 3"):
        r.restore_batch([lq], [refs[:2]])
    three = r.restore(lq, refs, ref_ensemble=True, guidance_image=1.2, guidance_context=1.2)
    assert three.shape == (32, 32, 3) and not np.array_equal(three, guided)

    # the CLI: the same options, the same pixels
    Image.fromarray(lq).save(tmp_path / "lq.png")
    args = ["restore", "--aligned", str(tmp_path / "lq.png"), "--model", str(bundle)]
    for i, ref in enumerate(refs):
        Image.fromarray(ref).save(tmp_path / f"ref{i}.png")
        args += ["--ref", str(tmp_path / f"ref{i}.png")]
    main([*args, "--out", str(tmp_path / "out.png"), "--guidance-image", "1.2", "--guidance-context", "1.2",
          "--ref-ensemble"])  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), three)

    # the pyfunc model through a real MLflow store: params reach the sampler
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        from stages.register import CODE_PATHS

        mlflow.set_experiment("composite-test")
        with mlflow.start_run():
            version = log_model_version(bundle, "composite-test", CODE_PATHS)
        model = mlflow.pyfunc.load_model(f"models:/composite-test/{version}")
        row = {"lq": encode_image(lq), **{f"ref{i + 1}": encode_image(x) for i, x in enumerate(refs)}}
        got = model.predict(
            pd.DataFrame([row]), params={"guidance_image": 1.2, "guidance_context": 1.2, "ref_ensemble": True}
        )
        from pipelines.registry import decode_image

        assert np.array_equal(decode_image(got["restored"][0], "restored"), three)
        bare = model.predict(pd.DataFrame([{**row, "ref2": "", "ref3": ""}]))
        assert np.array_equal(decode_image(bare["restored"][0], "restored"), plain)
        meta = json.loads((bundle / "bundle.json").read_text())
        assert set(meta["sampler"]) == {"steps", "guidance", "seed"}  # nothing new unless set
    finally:
        mlflow.set_tracking_uri(None)
