"""RefSTAR's transfer with masks (arXiv:2507.10470; models/refstar.py, pipelines/refstar.py): the
token pooling rule, masked reference tokens change nothing, eq. 4 as written, the decoupled route's
gradient, the cycle loss (eq. 5) on a hand-computed case and blind to the masked-out region, training
steps with masks and the cycle loss on shards streamed as the train stage streams them, the mask
provenance check, and inference with predicted or given masks (Restorer, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pair_shards, write_encoders

from models.iconface import Conditioning, IConFace, IConFaceConfig, build_backbone
from models.lora import add_lora
from models.refstar import (
    CycleWeights,
    RefSplit,
    consistent_region,
    cycle_loss,
    decoupled_attention,
    token_keep,
    total_loss,
)
from pipelines.config import ConfigError, TrainConfig, build, with_overrides

# ==================================================================================================
# Masks at token resolution
# ==================================================================================================


def test_a_token_is_kept_when_at_least_half_its_pixels_are_consistent():
    """Contract masks → M (0 consistent → 1; conflict and ignore → 0) → 2×2 tokens of 4×4 pixels."""
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, 4:] = 1  # top-right token: all conflict
    mask[4:, :4] = 255  # bottom-left token: all ignore (background, hair)
    mask[4:6, 4:] = 1  # bottom-right token: 8 of 16 conflict → exactly half consistent
    m = consistent_region(torch.from_numpy(mask))
    assert m.sum() == 64 - 16 - 16 - 8
    keep = token_keep(m[None, None], (2, 2), 0.5)
    assert keep.tolist() == [[[True, False, False, True]]]  # row-major; 0.5 is kept
    assert token_keep(m[None, None], (2, 2), 0.75).tolist() == [[[True, False, False, False]]]
    with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\]"):
        token_keep(m[None, None], (2, 2), 0.0)


# ==================================================================================================
# The network: masked tokens, eq. 4, the decoupled route
# ==================================================================================================


def _net(route: str, rank: int = 4, ref_readout: bool = False) -> IConFace:
    torch.manual_seed(0)
    tr = build_backbone("tiny", in_channels=48)
    add_lora(tr, 4)
    net = IConFace(
        tr,
        IConFaceConfig(
            id_dim=16, memory_tokens=4, reference_route=route, decoupled_rank=rank, ref_readout=ref_readout
        ),
    )
    with torch.no_grad():  # away from the zero-initialised start, so that every path carries signal
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return net


def _cond(tokens=None, refs=None) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(0)
    b, r, c, h = 2, 2, 48, 4
    deg = torch.randn(b, c, h, h, generator=g)
    default_refs = torch.randn(b, r, c, h, h, generator=g)
    cond = Conditioning(
        deg,
        default_refs if refs is None else refs,
        torch.tensor([[True, True], [True, False]]),  # sample 1 has one reference, padded to two
        torch.randn(b, r, 16, generator=g),
        torch.randn(b, 16, generator=g),
        torch.randn(b, 8, 96, generator=g),
        ref_tokens=tokens,
    )
    return torch.randn(b, c, h, h, generator=g), torch.tensor([0.5, 0.7]), cond


@pytest.mark.parametrize(
    "route,ref_readout", [("in_context", False), ("decoupled", False), ("in_context", True)]
)
def test_a_masked_reference_token_changes_nothing(route, ref_readout):
    """Changing the content of masked reference tokens (and of a padded reference) leaves the output
    bit-identical, as padding does; changing a kept token changes it (the reference readout too)."""
    net = _net(route, ref_readout=ref_readout).eval()
    tokens = torch.ones(2, 2, 16, dtype=torch.bool)
    tokens[0, 0, :5] = False
    tokens[1, 0, 3] = False
    scene, sigma, cond = _cond(tokens)
    with torch.no_grad():
        base = net(scene, sigma, cond)
        refs = cond.refs.clone()
        refs[0, 0].view(48, -1)[:, :5] += 10.0  # masked tokens of sample 0
        refs[1, 0].view(48, -1)[:, 3] -= 7.0  # a masked token of sample 1
        refs[1, 1] += 5.0  # sample 1's padded slot
        assert torch.equal(net(scene, sigma, _cond(tokens, refs)[2]), base)
        refs[0, 0].view(48, -1)[:, 7] += 1.0  # a kept token
        changed = net(scene, sigma, _cond(tokens, refs)[2])
    assert (changed[0] - base[0]).abs().max() > 1e-4 and torch.equal(changed[1], base[1])


def test_decoupled_attention_is_eq_4():
    """σ(Q_in K_inᵀ/√d)V_in + λ·σ(Q_in K_refᵀ/√d)V_ref for input tokens, reference tokens attending to the
    kept reference keys only; a sample without a kept reference key gets no reference term."""
    g = torch.Generator().manual_seed(1)
    b, n_txt, n_in, n_ref, heads, d = 2, 2, 5, 4, 3, 8
    seq = n_txt + n_in + n_ref + 3  # 3 more input tokens after the reference segment
    q, k, v = (torch.randn(b, seq, heads, d, generator=g) for _ in range(3))
    start, end = n_txt + n_in, n_txt + n_in + n_ref
    keep = torch.ones(b, seq, dtype=torch.bool)
    keep[0, start + 1] = False
    keep[1, start:end] = False  # sample 1: every reference token masked
    out = decoupled_attention(q, k, v, RefSplit(start, end, keep, scale=0.7))

    def attend(qq, kk, vv, mask):  # (L, H, d) by the formula
        w = torch.einsum("qhd,khd->hqk", qq, kk) / d**0.5
        w = w.masked_fill(~mask[None, None, :], -torch.inf).softmax(-1)
        return torch.einsum("hqk,khd->qhd", w, vv)

    inside = torch.cat([torch.arange(start), torch.arange(end, seq)])
    for i in range(b):
        kr = keep[i, start:end]
        ref_term = attend(q[i, inside], k[i, start:end], v[i, start:end], kr) if kr.any() else 0.0
        want_in = attend(q[i, inside], k[i, inside], v[i, inside], torch.ones(len(inside), dtype=torch.bool))
        want_in = want_in + 0.7 * ref_term
        assert torch.allclose(out[i, inside], want_in, atol=1e-5)
        want_ref = attend(q[i, start:end], k[i, start:end], v[i, start:end], kr) if kr.any() else 0.0
        assert torch.allclose(
            out[i, start:end], torch.as_tensor(want_ref).expand_as(out[i, start:end]), atol=1e-5
        )
    assert torch.isfinite(out).all()


def test_the_decoupled_route_trains_its_own_parameters():
    """The route adds one reference K/V adapter per block (zero up-projections at start); the loss's
    gradient reaches them; without references the route is the stock attention exactly."""
    torch.manual_seed(0)
    tr = build_backbone("tiny", in_channels=48)
    add_lora(tr, 4)
    net = IConFace(
        tr, IConFaceConfig(id_dim=16, memory_tokens=4, reference_route="decoupled", decoupled_rank=4)
    )
    n_blocks = len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    assert len(net.dca) == n_blocks and all(float(a.up_k.weight.detach().abs().sum()) == 0 for a in net.dca)
    assert {n for n, _ in net.named_parameters() if n.startswith("dca.")} == {
        f"dca.{i}.{p}.weight" for i in range(n_blocks) for p in ("down", "up_k", "up_v")
    }
    scene, sigma, cond = _cond()
    with torch.no_grad():  # a non-zero head, so that the output depends on the blocks
        torch.nn.init.normal_(tr.proj_out.weight, std=0.1)
    net(scene, sigma, cond).square().mean().backward()
    for a in net.dca:
        assert a.up_k.weight.grad.abs().sum() > 0 and a.up_v.weight.grad.abs().sum() > 0
    plain = IConFace(tr, IConFaceConfig(id_dim=16, memory_tokens=4))  # the same blocks, stock processors
    none = Conditioning(
        cond.deg, cond.refs[:, :0], cond.ref_mask[:, :0], cond.z_refs[:, :0], cond.z_deg, cond.text
    )
    with torch.no_grad():
        decoupled = net(scene, sigma, none)
        for blk in [*tr.transformer_blocks, *tr.single_transformer_blocks]:
            blk.attn.set_processor(blk.attn._default_processor_cls())
        plain.load_state_dict(net.state_dict(), strict=False)
        assert torch.equal(plain(scene, sigma, none), decoupled)
    with pytest.raises(ValueError, match="unknown reference route 'sideways'; valid: in_context, decoupled"):
        IConFaceConfig(reference_route="sideways")


def test_masks_follow_their_reference_into_the_eq6_ensemble():
    """Seed 002's multi-reference ensemble runs one reference slot per forward: the slot's token mask
    goes with it (else slot k would read slot 0's mask)."""
    from models.guidance import reference_slot

    tokens = torch.rand(2, 2, 16) > 0.5
    _, _, cond = _cond(tokens)
    assert torch.equal(reference_slot(cond, 1).ref_tokens, tokens[:, 1:2])


def test_refstar_needs_the_in_context_references():
    with pytest.raises(ConfigError, match=r"train.refstar: .*use conditioning: iconface"):
        build(TrainConfig, {"conditioning": "composite", "refstar": {"cycle_loss": True}}, "train")
    with pytest.raises(ValueError, match="composite conditioning has none"):
        IConFaceConfig(reference_route="decoupled", conditioning="composite")


# ==================================================================================================
# The cycle loss (eq. 5) and the total (eq. 7)
# ==================================================================================================


def test_cycle_loss_matches_a_hand_computed_case():
    ref = torch.zeros(1, 3, 2, 2)
    out = torch.tensor([[[[0.5, -1.0], [0.25, 2.0]]] * 3])  # the same plane in every channel
    m = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # the -1.0 pixel is masked out
    terms = cycle_loss(out, ref, m, CycleWeights(l1=1.0, identity=0.0, perceptual=0.0))
    # ℓ1 = mean over 12 values of |M ⊙ (out − ref)| = 3 · (0.5 + 0.25 + 2.0) / 12
    assert torch.allclose(terms["cycle_l1"], torch.tensor([0.6875]))
    assert torch.allclose(terms["cycle"], torch.tensor([0.6875])) and terms["cycle_id"].item() == 0
    w = CycleWeights()  # published λ's: L = 1 · L_GT + 1.5 · L_cycle
    assert torch.allclose(
        total_loss(torch.tensor(2.0), torch.tensor(0.6875), w), torch.tensor(2 + 1.5 * 0.6875)
    )


def test_cycle_loss_is_zero_on_the_masked_out_region_whatever_the_output_there():
    """ℓ1, identity (a real encoder) and a perceptual term are all 0 when the output differs from the
    reference only where M = 0, and do not move when the output changes there."""
    from models.id_encoder import IRBackbone, IRConfig, raw_embedding

    torch.manual_seed(0)
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 8, 16, 16), 16, stem_stride=2)).eval()

    def embed(x):
        return raw_embedding(enc, (x.clamp(-1, 1) + 1) / 2)

    def perceptual(x, y):  # a real image distance: squared difference of horizontal gradients
        return ((x.diff(dim=-1) - y.diff(dim=-1)) ** 2).flatten(1).mean(1)

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    m = torch.ones(2, 32, 32)
    m[:, 10:20, 5:25] = 0  # e.g. an open mouth in the reference
    m[1, :, :4] = 0
    noisy = ref + (1 - m)[:, None] * torch.randn(2, 3, 32, 32, generator=g) * 3
    w = CycleWeights()
    zero = cycle_loss(noisy, ref, m, w, embed, perceptual)
    for k in ("cycle", "cycle_l1", "cycle_id", "cycle_perc"):
        assert zero[k].abs().max() < 1e-6, k
    other = ref + (1 - m)[:, None] * torch.randn(2, 3, 32, 32, generator=g)
    off = ref + 0.3 * torch.randn(2, 3, 32, 32, generator=g)  # differs on the consistent region too
    a, b = (
        cycle_loss(off, ref, m, w, embed, perceptual),
        cycle_loss(off * m[:, None] + other * (1 - m)[:, None], ref, m, w, embed, perceptual),
    )
    assert torch.allclose(a["cycle"], b["cycle"]) and (a["cycle"] > 0.05).all()
    assert (a["cycle_l1"] > 0).all() and (a["cycle_id"] > 0).all() and (a["cycle_perc"] > 0).all()


# ==================================================================================================
# Training: masks and the cycle on streamed shards
# ==================================================================================================


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> Path:
    return make_pair_shards(tmp_path_factory.mktemp("pairs"), identities=(3, 1, 1))


def _module(**over):
    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.module import IConFaceModule
    from pipelines.network import build_network

    cfg = build(
        TrainConfig,
        {"backbone": "tiny", "pixel_patch": 4, "memory_tokens": 4, "front_end": 0, "front": None, **over},
        "train",
    )
    torch.manual_seed(0)
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 8, 16, 16), 4, stem_stride=2)).eval()
    net, codec, text = build_network(cfg, 4)
    module = IConFaceModule.from_config(net, codec, enc, text, cfg)
    module.log = module.log_dict = lambda *a, **k: None  # outside a Trainer
    module.optimizers = lambda: None
    return module


@pytest.mark.parametrize("route", ["in_context", "decoupled"])
def test_three_training_steps_with_masks_and_the_cycle_loss(pair_shards, route):
    """Batches from the degradation stream (masks passed through), collated with masks and the degraded
    first reference: three optimiser steps give finite losses with a cycle term, eq. 7's total."""
    from pipelines.batches import StreamIterable
    from pipelines.shards import shard_paths
    from pipelines.stream import DegradationStream

    module = _module(
        refstar={"reference_masks": "truth", "cycle_loss": True, "reference_route": route},
        ref_schedule=[0, 0.5, 0.5, 0],
    )
    assert module.refstar.masks and module.refstar.cycle and module.refstar.weights.cycle == 1.5
    # the default's degradation embedding reads the cycle pass's input too (the degraded reference)
    assert module.net.cfg.degradation_embed
    stream = DegradationStream(shard_paths(pair_shards, "train"), "iconface_mixed", 0, 4, 1, inline=True)
    it = iter(StreamIterable(stream, (0, 0.5, 0.5, 0), 3, 0, masks=True, ref_preset="iconface_mixed"))
    opt = torch.optim.AdamW([p for p in module.net.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        batch = next(it)
        assert batch["ref_consistent"].shape == (*batch["ref_mask"].shape, 32, 32)
        assert batch["ref_lq"].shape == batch["lq"].shape and not torch.equal(
            batch["ref_lq"], batch["refs"][:, 0]
        )
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        h = module.history[-1]
        assert np.isfinite(h["loss"]) and h["cycle"] > 0 and h["cycle_l1"] > 0 and h["cycle_perc"] == 0
        assert abs(h["loss"] - (h["gt"] + 1.5 * h["cycle"])) < 1e-4
    # the masks decide which reference tokens the model reads
    cond = module.conditioning(batch)
    assert cond.ref_tokens is not None and not bool(cond.ref_tokens[batch["ref_mask"]].all())


def test_the_ablation_rows_are_named_in_the_config():
    from pipelines.config import REFSTAR_ROW_NAMES, AblateConfig
    from pipelines.refstar import ABLATE_ROWS, ablate_overrides

    assert REFSTAR_ROW_NAMES == tuple(ABLATE_ROWS)
    build(AblateConfig, {"variants": ["full", *REFSTAR_ROW_NAMES]}, "ablate")
    over = ablate_overrides("refstar_decoupled_cycle", "refsel")
    assert over == {
        "refstar.reference_route": "decoupled",
        "refstar.cycle_loss": True,
        "refstar.reference_masks": "refsel",
    }
    cfg = with_overrides(build(TrainConfig, {}, "train"), over)  # the rows apply to the nested section
    assert (cfg.refstar.reference_route, cfg.refstar.cycle_loss, cfg.refstar.reference_masks) == (
        "decoupled",
        True,
        "refsel",
    )
    assert cfg.refstar.mask_token_keep == 0.5 and cfg.lr == build(TrainConfig, {}, "train").lr


@pytest.mark.slow
def test_ablate_compares_the_refstar_rows(tmp_path):
    """`ablate` with RefSTAR rows on shards with synthetic masks: one table, the masks' provenance said."""
    import os
    import subprocess
    import sys

    import yaml
    from conftest import REPO
    from test_train import _project

    _, params = _project(tmp_path)
    shards = make_pair_shards(tmp_path / "pairs", identities=(4, 2, 1), emb_dim=512)
    params["ablate"] = {  # the scratch protocol (the fine-tune: tests/test_tune_ablate.py)
        "variants": ["default", "refstar_in_context", "refstar_decoupled_cycle"],
        "protocol": "scratch",
        "steps": 3,
        "batch_size": 4,
        "val_samples": 4,
    }
    params["train"]["warmup_steps"] = 1  # scratch uses the train section's schedule: leave the warm-up
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "REFFACE_PROGRESS": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.ablate",
            "--params",
            str(tmp_path / "params.yaml"),
            "--shards",
            str(shards),
        ]
        + ["--encoders", str(tmp_path / "encoders"), "--report", str(tmp_path / "ablation.md")]
        + ["--metrics", str(tmp_path / "a.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "a.json").read_text())
    assert sorted(m) == ["default", "refstar_decoupled_cycle", "refstar_in_context"]
    # the decoupled route adds its reference K/V adapters (rank 16 on 4 blocks of width 256)
    extra = (
        m["refstar_decoupled_cycle"]["trainable_parameters"] - m["refstar_in_context"]["trainable_parameters"]
    )
    assert extra == 4 * 16 * 256 * 3
    # the masks add no weights to the default (its reference readout included)
    assert m["default"]["trainable_parameters"] == m["refstar_in_context"]["trainable_parameters"]
    table = (tmp_path / "ablation.md").read_text()
    assert "| refstar_decoupled_cycle |" in table and "conflict masks `truth` (synthetic 48 masks" in table
    assert "default vs refstar_in_context" not in table  # Table 3's order is read among IConFace's variants
    assert "Protocol `scratch`" in table
    # the masks row against the default, the cycle row without its baseline (refstar_decoupled is not listed)
    assert (
        m["refstar_in_context"]["paired"]["vs"] == "default"
        and m["refstar_decoupled_cycle"]["paired"] is None
    )
    assert m["refstar_in_context"]["claim"]["measure"] == "copy"


@pytest.mark.slow
def test_the_train_stage_trains_with_masks_and_records_their_provenance(tmp_path):
    """`stages.train` with refstar.reference_masks: truth, the decoupled route and the cycle loss: three steps on
    Ray-fed batches, the masks' provenance in the metrics; refsel on shards without a mask model stops
    before any work and says what to set."""
    import os
    import subprocess
    import sys

    import yaml
    from conftest import REPO
    from test_train import _project

    _, params = _project(tmp_path)
    shards = make_pair_shards(tmp_path / "pairs", identities=(4, 2, 1), emb_dim=512)
    params["train"]["max_steps"] = 3
    params["train"]["refstar"].update(
        {"reference_masks": "truth", "reference_route": "decoupled", "cycle_loss": True}
    )
    env = {
        **os.environ,
        "REFFACE_PROGRESS": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }

    def run(p: dict) -> subprocess.CompletedProcess:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
        cmd = [sys.executable, "-m", "stages.train", "--params", str(tmp_path / "params.yaml")]
        cmd += [
            "--shards",
            str(shards),
            "--encoders",
            str(tmp_path / "encoders"),
            "--out",
            str(tmp_path / "out"),
        ]
        cmd += ["--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "loss.csv")]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    r = run(params)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cycle loss (RefSTAR eq. 5), perceptual term off: no local LPIPS weights" in r.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["steps"] == 3 and np.isfinite(m["final_loss"])
    assert m["reference_masks"] == {"option": "truth", "mask_model": None, "provenance": {"synthetic": 48}}
    params["train"]["refstar"]["reference_masks"] = "refsel"
    r = run(params)
    assert r.returncode != 0 and "set train.shards: data/refsel/shards" in r.stderr


def test_collate_needs_a_mask_on_every_chosen_reference():
    from pipelines.batches import collate

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    batch = {
        "keys": ["a", "b"],
        "lq": np.stack([img, img]),
        "gt": np.stack([img, img]),
        "refs": [[img, img], [img]],
        "masks": [[np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)], [None]],
        "ref_emb": [np.ones((2, 4), np.float32), np.ones((1, 4), np.float32)],
        "gt_emb": np.ones((2, 4), np.float32),
    }
    out = collate(batch, (0, 0, 1, 0), 3, seed=0, epoch=0, masks=False)
    assert "ref_consistent" not in out  # the default: masks unused
    with pytest.raises(ValueError, match="sample b: reference 0 has no conflict mask"):
        collate(batch, (0, 0, 1, 0), 3, seed=0, epoch=0, masks=True)
    batch["masks"][1] = [np.full((8, 8), 255, np.uint8)]
    out = collate(batch, (0, 0, 1, 0), 3, seed=0, epoch=0, masks=True)
    assert out["ref_consistent"].sum((2, 3)).tolist() == [[64.0, 0.0], [0.0, 0.0]] or out[
        "ref_consistent"
    ].sum((2, 3)).tolist() == [[0.0, 64.0], [0.0, 0.0]]


def test_the_shards_must_hold_the_masks_asked_for(pair_shards, tmp_path):
    from pipelines.refstar import mask_provenance

    got = mask_provenance(pair_shards, "truth")
    assert got == {"mask_model": None, "provenance": {"synthetic": 12 * 3}}  # 3 ids x 4 targets x 3 refs
    with pytest.raises(ValueError, match="set train.shards: data/refsel/shards"):
        mask_provenance(pair_shards, "refsel")
    with pytest.raises(ConfigError, match=r"train.refstar.mask_token_keep must lie in \(0, 1\]"):
        build(TrainConfig, {"refstar": {"mask_token_keep": 0}}, "train")
    with pytest.raises(
        ConfigError, match="train.refstar.cycle_lpips: /nonexistent/alexnet.pth does not exist"
    ):
        build(TrainConfig, {"refstar": {"cycle_lpips": "/nonexistent/alexnet.pth"}}, "train")
    with pytest.raises(ConfigError, match="train.refstar.reference_route: 'sideways' is not one of"):
        build(TrainConfig, {"refstar": {"reference_route": "sideways"}}, "train")


# ==================================================================================================
# Inference: predicted or given masks (Restorer, CLI)
# ==================================================================================================


@pytest.fixture(scope="module")
def masked_bundle(tmp_path_factory) -> Path:
    """A 32 px restorer bundle of a model trained with masks and the decoupled route, with a RefSel model."""
    from models.lora import save_trainable
    from models.refsel import RefSelConfig, RefSelUNet
    from pipelines.network import build_network
    from pipelines.refsel import save_model
    from pipelines.restorer import write_bundle

    tmp = tmp_path_factory.mktemp("bundle")
    enc = write_encoders(tmp / "encoders")
    over = {"backbone": "tiny", "pixel_patch": 4, "memory_tokens": 8, "front_end": 0, "front": None}
    refstar = {"reference_masks": "truth", "reference_route": "decoupled"}
    cfg = build(TrainConfig, {**over, "refstar": refstar}, "train")
    net, _, _ = build_network(cfg, 512)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_trainable(net, tmp / "model")
    torch.manual_seed(0)
    save_model(RefSelUNet(RefSelConfig(widths=(4, 8))), tmp / "refsel.safetensors")
    return write_bundle(
        tmp / "bundle",
        cfg,
        tmp / "model",
        "small_ir",
        enc / "primary.safetensors",
        32,
        steps=2,
        refsel_model=tmp / "refsel.safetensors",
    )


def test_the_restorer_predicts_masks_or_takes_them(masked_bundle, tmp_path):
    from conftest import rgb

    from pipelines.refsel import model_version
    from pipelines.restorer import InputError, Restorer

    r = Restorer(masked_bundle)
    lq, ref = np.asarray(rgb(1, 32)), np.asarray(rgb(2, 32))
    r.restore_batch([lq], [[ref]])  # a model trained with masks: predicted by default
    assert r.last_masks == {
        "source": "predicted",
        "model": model_version(masked_bundle / "refsel.safetensors"),
    }
    none = r.restore_batch([lq], [[ref]], ref_masks="none")
    assert r.last_masks == {"source": "none"}
    consistent = r.restore_batch([lq], [[ref]], ref_masks=[[np.zeros((32, 32), np.uint8)]])
    assert r.last_masks == {"source": "given"} and np.array_equal(consistent, none)  # nothing masked
    conflict = r.restore(lq, [ref], ref_masks=[np.ones((64, 64), np.uint8)])  # resized to 32 (nearest)
    assert not np.array_equal(conflict, none[0])
    with pytest.raises(InputError, match="values 0 \\(consistent\\), 1 \\(conflict\\), 255 \\(ignore\\)"):
        r.restore_batch([lq], [[ref]], ref_masks=[[np.full((32, 32), 7, np.uint8)]])
    r2 = Restorer(masked_bundle)
    (masked_bundle / "refsel.safetensors").rename(tmp_path / "moved.safetensors")
    try:
        r3 = Restorer(masked_bundle, refsel=tmp_path / "missing.safetensors")
        with pytest.raises(InputError, match="missing.safetensors does not exist"):
            r3.restore_batch([lq], [[ref]])
    finally:
        (tmp_path / "moved.safetensors").rename(masked_bundle / "refsel.safetensors")
    assert r2.refsel_path == masked_bundle / "refsel.safetensors"


def test_a_bundle_with_the_flat_train_keys_of_before_loads(masked_bundle, tmp_path):
    """A bundle written before `train` had its sections holds their keys flat in train.json (`ray_workers`,
    `reference_masks`, `hei_lambda`, ...; e.g. a champion already in a registry): it loads as the same
    configuration and restores the same pixels."""
    import shutil

    from conftest import rgb

    from pipelines.restorer import Restorer, nest_flat_train_keys

    old = tmp_path / "old"
    shutil.copytree(masked_bundle, old)
    train = json.loads((old / "train.json").read_text())
    flat = {k: v for k, v in train.items() if k not in ("ray", "composite", "refstar")}
    flat |= {f"ray_{k}": v for k, v in train["ray"].items()} | train["composite"] | train["refstar"]
    assert flat["ray_workers"] == 2 and flat["reference_masks"] == "truth" and "refstar" not in flat
    (old / "train.json").write_text(json.dumps(flat, indent=2, sort_keys=True))
    assert nest_flat_train_keys(flat) == train and nest_flat_train_keys(train) == train
    a, b = Restorer(masked_bundle), Restorer(old)
    assert b.cfg == a.cfg and b.cfg.refstar.reference_route == "decoupled" and b.masks_default == "predict"
    lq, ref = np.asarray(rgb(1, 32)), np.asarray(rgb(2, 32))
    assert np.array_equal(a.restore_batch([lq], [[ref]]), b.restore_batch([lq], [[ref]]))


def test_the_cli_says_which_masks_it_used(masked_bundle, tmp_path, capsys):
    from conftest import rgb, save

    from stages.cli import main

    lq, ref = save(tmp_path / "lq.png", rgb(1, 32)), save(tmp_path / "ref.png", rgb(2, 32))
    from PIL import Image

    mask = save(tmp_path / "mask.png", Image.fromarray(np.ones((32, 32), np.uint8)))
    base = ["restore", str(lq), "--ref", str(ref), "--model", str(masked_bundle), "--aligned"]
    main([*base, "--out", str(tmp_path / "a.png")])
    assert "masks predicted by refsel-" in capsys.readouterr().out
    main([*base, "--out", str(tmp_path / "b.png"), "--ref-mask", str(mask)])
    assert "masks from --ref-mask files" in capsys.readouterr().out
    main([*base, "--out", str(tmp_path / "c.png"), "--ref-masks", "none"])
    assert "masks none" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "restore",
                str(lq),
                "--ref",
                str(ref),
                "--model",
                str(masked_bundle),
                "--out",
                "x.png",
                "--ref-mask",
                str(mask),
            ]
        )
    assert exc.value.code == 2 and "--ref-mask needs --aligned" in capsys.readouterr().err
    assert json.loads((masked_bundle / "train.json").read_text())["refstar"]["reference_masks"] == "truth"
