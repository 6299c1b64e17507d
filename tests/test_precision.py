"""Frozen weights in bf16 under bf16-mixed, and the restorer's merged LoRA.

On the CPU: Lightning's `bf16-mixed` runs under CPU autocast, so the storage dtypes, the optimiser
state, resume and the saved LoRA are checked here exactly as a GPU run would have them.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import TrainConfig, build
from pipelines.module import cast_frozen, frozen_dtype, low_precision


def _module(train_backbone: bool = False, precision: str = "bf16-mixed", prediction: str = "velocity"):
    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.module import IConFaceModule
    from pipelines.network import build_network

    cfg = build(
        TrainConfig,
        {
            "backbone": "tiny",
            "pixel_patch": 4,
            "memory_tokens": 4,
            "front_end": 0,
            "front": None,
            "train_backbone": train_backbone,
            "precision": precision,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "prediction": prediction,  # x0_residual zero-initialises proj_out: a frozen one passes no gradient
        },
        "train",
    )
    torch.manual_seed(0)
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 8, 16, 16), 16, stem_stride=2)).eval()
    net, codec, text = build_network(cfg, 16)
    return cfg, IConFaceModule.from_config(net, codec, enc, text, cfg)


def _batches(n: int = 3, b: int = 2, r: int = 2, seed: int = 0) -> list[dict]:
    from pipelines.batches import make_batch

    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    out = []
    for _ in range(n):
        bt = make_batch(
            [img() for _ in range(b)],
            [[img() for _ in range(r)] for _ in range(b)],
            [[rng.normal(size=16).astype(np.float32) for _ in range(r)] for _ in range(b)],
            gt=[img() for _ in range(b)],
            z_gt=[rng.normal(size=16).astype(np.float32) for _ in range(b)],
        )
        bt["wanted"], bt["got"] = [r] * b, [r] * b
        out.append(bt)
    return out


def _loader(batches: list[dict]):
    return torch.utils.data.DataLoader(batches, batch_size=None)


def _trainer(steps: int, root) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def test_frozen_dtype_follows_the_precision():
    cfg = build(TrainConfig, {"precision": "bf16-mixed"}, "train")
    assert frozen_dtype(cfg) == torch.bfloat16
    assert frozen_dtype(build(TrainConfig, {}, "train")) is None  # 32-true keeps float32
    assert (
        frozen_dtype(build(TrainConfig, {"precision": "bf16-mixed", "frozen_dtype": "float32"}, "train"))
        is None
    )


def test_only_frozen_linear_conv_and_rms_norm_weights_go_to_bf16():
    _, module = _module()
    frozen_lin = sum(
        p.numel() * 4
        for m in [module.net, module.codec, module.id_encoder]
        for layer in m.modules()
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d | torch.nn.RMSNorm)
        for p in layer.parameters(recurse=False)
        if not p.requires_grad
    )
    trainable = {n: p.detach().clone() for n, p in module.net.named_parameters() if p.requires_grad}
    saved = cast_frozen([module.net, module.codec, module.id_encoder])
    assert saved == frozen_lin // 2 and saved > 0  # half of every frozen linear/conv weight's bytes
    for n, p in module.net.named_parameters():
        if p.requires_grad:  # LoRA and the pathways: float32 and untouched
            assert p.dtype == torch.float32 and torch.equal(p, trainable[n]), n
    lora_bases = [m.base_layer.weight for m in module.net.transformer.modules() if hasattr(m, "base_layer")]
    assert lora_bases and all(w.dtype == torch.bfloat16 for w in lora_bases)
    norms = [
        p
        for m in module.modules()
        if isinstance(m, torch.nn.LayerNorm | torch.nn.BatchNorm2d)
        for p in m.parameters()
    ]
    assert all(p.dtype == torch.float32 for p in norms)
    # the attention's q/k RMS norms take bf16 activations: bf16 weights let torch.rms_norm run fused
    rms = [m.weight for m in module.net.transformer.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert rms and all(w.dtype == torch.bfloat16 for w in rms)
    assert low_precision(module) == torch.bfloat16
    assert cast_frozen([module.net]) == 0  # idempotent


def test_bf16_mixed_trains_resumes_and_saves_the_same_lora(tmp_path):
    from models.lora import LORA_FILE, save_trainable

    _, module = _module()
    cast_frozen([module.net, module.codec, module.id_encoder])
    before = {n: p.detach().clone() for n, p in module.net.named_parameters() if "lora_B" in n}
    batches = _batches(4)
    trainer = _trainer(2, tmp_path / "a")
    trainer.fit(module, train_dataloaders=_loader(batches[:2]))
    losses = [h["loss"] for h in module.history]
    assert len(losses) == 2 and all(np.isfinite(losses))
    moved = [n for n, p in module.net.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert moved  # LoRA learns through the bf16 base weights
    opt = trainer.optimizers[0]
    states = [s for s in opt.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and all(v.dtype == torch.float32 for v in saved.values())  # trainable weights only
    save_trainable(module.net, tmp_path / "lora")
    lora = load_file(str(tmp_path / "lora" / LORA_FILE))
    assert lora and all(v.dtype == torch.float32 for v in lora.values())

    # resume into a fresh module: the same trainable weights, and it continues to step 4
    _, again = _module()
    cast_frozen([again.net, again.codec, again.id_encoder])
    t2 = _trainer(4, tmp_path / "b")
    t2.fit(again, train_dataloaders=_loader(batches), ckpt_path=str(ckpt))
    assert t2.global_step == 4 and all(np.isfinite([h["loss"] for h in again.history]))
    frozen_a = {n: p for n, p in module.net.named_parameters() if not p.requires_grad}
    frozen_b = dict(again.net.named_parameters())
    assert all(torch.equal(p, frozen_b[n]) for n, p in frozen_a.items())  # the frozen base is rebuilt


def test_restore_with_bf16_frozen_weights_matches_float32_within_bf16_tolerance():
    _, module = _module()
    batch = _batches(1, b=2, r=2)[0]
    ref = module.restore(batch, steps=3, guidance=1.0)
    cast_frozen([module.net, module.codec, module.id_encoder])
    module._low = None
    low = module.restore(batch, steps=3, guidance=1.0)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    err = (low - ref).abs()
    assert float(err.max()) < 0.1 and float(err.mean()) < 0.01, (float(err.max()), float(err.mean()))
    assert not torch.equal(low, ref)  # it did run in bf16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A restorer bundle of a tiny model whose LoRA is not zero (as after training)."""
    from models.id_encoder import save_encoder
    from models.lora import save_trainable
    from pipelines.restorer import write_bundle

    tmp = tmp_path_factory.mktemp("bundle")
    cfg, module = _module()
    g = torch.Generator().manual_seed(1)
    for p in module.net.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    save_trainable(module.net, tmp / "weights")
    save_encoder(module.id_encoder, tmp / "encoder.safetensors", "tiny")
    write_bundle(tmp / "bundle", cfg, tmp / "weights", "small_ir", tmp / "encoder.safetensors", 16)
    return tmp / "bundle"


def test_the_restorer_merges_the_lora_without_changing_outputs(bundle):
    from pipelines.restorer import Restorer

    out = bundle
    rng = np.random.default_rng(3)
    lq = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    refs = [[rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(k)] for k in (1, 2)]
    slow = Restorer(out, merge=False)
    fast = Restorer(out)
    assert slow.speed["lora_merged"] == 0 and fast.speed["lora_merged"] > 0
    assert fast.speed == {
        "device": "cpu",
        "lora_merged": fast.speed["lora_merged"],
        "bf16": False,
        "compiled": False,
    }
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in fast.module.net.modules())
    a = slow.restore_batch(lq, refs, steps=3, seed=5).astype(int)
    b = fast.restore_batch(lq, refs, steps=3, seed=5).astype(int)
    assert np.abs(a - b).max() <= 1  # float32 rounding of the merged sum: at most one 8-bit level
    assert (a != b).mean() < 0.01
    low = Restorer(out, precision="bf16").restore_batch(lq, refs, steps=3, seed=5).astype(int)
    assert np.abs(low - a).mean() < 2.0  # bf16 weights: within bf16 tolerance on the 0–255 scale


def test_a_bundle_from_before_the_reference_readout_loads_without_it(tmp_path):
    """A CPU-default bundle (x0_residual: the readout is on by `auto`) and the same bundle as written
    before `train.reference_readout` existed (no key in train.json, no ref_fuse weights): the old one
    loads with the readout off, and both restore alike while the readout is still at its zero start."""
    import json
    import shutil

    from safetensors.torch import save_file

    from models.id_encoder import save_encoder
    from models.lora import PATHWAYS_FILE, save_trainable
    from pipelines.restorer import Restorer, write_bundle

    cfg, module = _module(precision="32-true", prediction="x0_residual")
    assert module.net.ref_fuse is not None
    save_trainable(module.net, tmp_path / "weights")
    save_encoder(module.id_encoder, tmp_path / "encoder.safetensors", "tiny")
    write_bundle(
        tmp_path / "new", cfg, tmp_path / "weights", "small_ir", tmp_path / "encoder.safetensors", 16
    )
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    train = json.loads((old / "train.json").read_text())
    del train["reference_readout"]
    (old / "train.json").write_text(json.dumps(train))
    pw = next(old.rglob(PATHWAYS_FILE))
    state = load_file(str(pw))
    save_file({k: v for k, v in state.items() if not k.startswith("ref_fuse.")}, str(pw))
    a, b = Restorer(tmp_path / "new"), Restorer(old)
    assert a.module.net.ref_fuse is not None and b.module.net.ref_fuse is None
    rng = np.random.default_rng(3)
    lq = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    refs = [[rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(k)] for k in (1, 2)]
    assert np.array_equal(
        a.restore_batch(lq, refs, steps=2, seed=5), b.restore_batch(lq, refs, steps=2, seed=5)
    )
