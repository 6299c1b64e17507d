"""The GPU path, proven on the CPU as far as it goes.

* every configuration builds, trains a step and restores under a (pretended) CUDA device context, so a
  random draw from a generator on the wrong device fails here, not on a GPU (tests/device_context.py);
* compiled blocks with gradient checkpointing inside give the eager step's gradients;
* classifier-free guidance as one batch of two equals the two forwards;
* the recipe overlay, the compile checks and bench_gpu's full configuration go through the stages'
  own config path;
* benchmarks/gpu_check.py --small passes with Ray, MLflow, Optuna and label-studio-sdk unimportable.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO
from device_context import PretendAccelerator

sys.path.insert(0, str(REPO / "benchmarks"))

ENCODER = dict(input_size=32, units=(1, 1, 1, 1), widths=(8, 8, 8, 16, 16), embedding_dim=16, stem_stride=2)


def _cfg(**over):
    from pipelines.config import TrainConfig, build

    base = dict(
        backbone="tiny",
        front_end=0,
        front=None,
        prediction="velocity",
        memory_tokens=8,
        pixel_patch=4,
        batch_size=2,
        max_refs=3,
        seed=0,
    )
    return build(TrainConfig, {**base, **over}, "train")


def _batch(b: int = 2, refs=(3, 1), res: int = 32, dim: int = 16, seed: int = 0):
    from pipelines.batches import make_batch

    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 255, (res, res, 3), dtype=np.uint8)  # noqa: E731
    emb = lambda: rng.normal(size=dim).astype(np.float32)  # noqa: E731
    batch = make_batch(
        [img() for _ in range(b)],
        [[img() for _ in range(refs[i])] for i in range(b)],
        [[emb() for _ in range(refs[i])] for i in range(b)],
        slots=max(refs),
        gt=[img() for _ in range(b)],
        z_gt=[emb() for _ in range(b)],
    )
    batch["wanted"], batch["got"] = list(refs[:b]), list(refs[:b])
    return batch


def _module(cfg):
    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.module import IConFaceModule
    from pipelines.network import build_network

    enc = IRBackbone(IRConfig(**ENCODER)).eval()
    net, codec, text = build_network(cfg, enc.cfg.embedding_dim)
    return IConFaceModule.from_config(net, codec, enc, text, cfg)


def _train_step(module, batch) -> None:
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert np.isfinite(module.history[-1]["loss"])


CONFIGS = {
    **{f"tiny/{v}": {"variant": v} for v in ("concat", "+struct", "+id", "single_route", "full")},
    "small/full": {"backbone": "small", "pixel_patch": 8, "memory_tokens": 16},
    "tiny/x0_residual+readouts": {"prediction": "x0_residual"},
    "tiny/composite": {"conditioning": "composite", "composite": {"general_encoder": "small"}},
    "tiny/decoupled": {"refstar": {"reference_route": "decoupled"}},
    "tiny/bf16-mixed+checkpointing": {"precision": "bf16-mixed", "gradient_checkpointing": True},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_configuration_trains_and_restores_under_a_device_context(name):
    """Built, trained one step and restored (guidance on, so both CFG branches run) inside a pretended
    `with torch.device("cuda")`: any draw whose generator is not on the device it lands on raises."""
    cfg = _cfg(**CONFIGS[name])
    torch.manual_seed(0)
    with PretendAccelerator("cuda") as mode:
        module = _module(cfg)
        _train_step(module, _batch())
        out = module.restore(_batch(seed=1), steps=2, guidance=2.0)
    assert mode.draws > 0  # σ, noise and the sampler's start noise went through the check
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_klein_from_local_folders_builds_under_a_device_context(tmp_path):
    """backbone klein_base_4b from the local folders a user gives (a tiny transformer, VAE and prompt
    cache written in the official formats), under the pretended device context."""
    import bench_gpu

    paths = bench_gpu.write_inputs(bench_gpu.SMALL, tmp_path)
    cfg = _cfg(backbone="klein_base_4b", memory_tokens=8, **paths)
    with PretendAccelerator("cuda") as mode:
        module = _module(cfg)
        _train_step(module, _batch())
        out = module.restore(_batch(seed=1), steps=2, guidance=4.0)
    assert mode.draws > 0 and torch.isfinite(out).all()


def test_the_pretended_device_context_catches_a_cpu_generator():
    """The check can fail: a draw from a CPU generator without `device=` lands on the context's device."""
    g = torch.Generator().manual_seed(0)
    with PretendAccelerator("cuda"):
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
            torch.randn(3, generator=g)
        with pytest.raises(RuntimeError, match="generator"):
            torch.empty(2).uniform_(0, 1, generator=g)
        assert torch.randn(3, generator=g, device=g.device).shape == (3,)


def _grad_step(m, batch):
    cond = m.conditioning(batch)
    z = torch.linspace(-1, 1, cond.deg.numel()).view_as(cond.deg)
    out = m.net(z, torch.tensor([0.3, 0.8]), cond)
    (out.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in m.net.named_parameters() if p.grad is not None}
    return out.detach(), grads


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """How many matrix products and attention calls run inside the mode."""

    def __init__(self):
        super().__init__()
        self.matmul = self.attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from models.checkpointing import ATTENTION_OPS, MATMUL_OPS

        self.matmul += func in MATMUL_OPS
        self.attention += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_what_it_names_and_gives_the_same_gradients():
    """checkpoint_policy save_matmuls / save_attention (every reference slot real, so attention takes
    its fused kernel): the output and gradients of no checkpointing;
    the backward of save_matmuls recomputes no matrix product and no attention, that of save_attention
    no attention but the matrix products (full's recomputes both: it reruns every block)."""
    batch = _batch(refs=(3, 3))
    results, backward = {}, {}
    for name, over in {
        "none": {},
        "full": {"gradient_checkpointing": True},
        "save_matmuls": {"gradient_checkpointing": True, "checkpoint_policy": "save_matmuls"},
        "save_attention": {"gradient_checkpointing": True, "checkpoint_policy": "save_attention"},
    }.items():
        torch.manual_seed(0)
        m = _module(_cfg(prediction="x0_residual", **over))
        m.net.train()
        cond = m.conditioning(batch)
        z = torch.linspace(-1, 1, cond.deg.numel()).view_as(cond.deg)
        out = m.net(z, torch.tensor([0.3, 0.8]), cond)
        with _CountOps() as count:
            out.square().mean().backward()
        backward[name] = (count.matmul, count.attention)
        results[name] = (out.detach(), {n: p.grad for n, p in m.net.named_parameters() if p.grad is not None})
    assert m.net.checkpoint_policy == "save_attention"
    (mm_none, at_none), (mm_full, at_full) = backward["none"], backward["full"]
    assert mm_none < mm_full and at_none < at_full
    assert backward["save_matmuls"] == (mm_none, at_none)
    assert backward["save_attention"] == (mm_full, at_none)
    for name in ("full", "save_matmuls", "save_attention"):
        torch.testing.assert_close(results[name][0], results["none"][0], rtol=0, atol=0)
        assert results[name][1].keys() == results["none"][1].keys()
        for n, g in results["none"][1].items():
            torch.testing.assert_close(results[name][1][n], g, rtol=1e-5, atol=1e-7, msg=f"{name}: {n}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "fraction, policy",
    [(1.0, "full"), (0.5, "full"), (1.0, "save_matmuls"), (0.6, "save_attention")],
    ids=["every-block", "half-the-blocks", "save-matmuls", "save-attention-on-60-percent"],
)
def test_compiled_blocks_with_checkpointing_inside_match_the_eager_gradients(fraction, policy):
    """IConFace.compile_blocks (inductor on the CPU) with gradient checkpointing inside each compiled
    block (the recipe), on every block, on the first half, keeping matmul and attention outputs, or
    keeping attention outputs on 60 % of the blocks: the eager checkpointed step's output and
    gradients."""
    import torch._dynamo

    cfg = _cfg(
        gradient_checkpointing=True,
        checkpoint_fraction=fraction,
        checkpoint_policy=policy,
        prediction="x0_residual",
    )
    torch.manual_seed(0)
    eager = _module(cfg)
    compiled = _module(cfg)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    batch = _batch()
    step = lambda m: _grad_step(m, batch)  # noqa: E731

    out_e, grads_e = step(eager)
    n = len(compiled.net.blocks())
    assert eager.net.n_checkpointed == compiled.net.n_checkpointed == math.ceil(fraction * n)
    try:
        compiled.net.compile_blocks()
        assert compiled.net.checkpoint_inside and not any(compiled.net._outer_checkpoint(k) for k in range(n))
        wrapped = [k for k, b in enumerate(compiled.net.blocks()) if "forward" in vars(b)]
        assert wrapped == list(range(compiled.net.n_checkpointed))
        out_c, grads_c = step(compiled)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 20
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-3, atol=1e-6, msg=n)


def test_batched_guidance_equals_the_two_forwards():
    """Both CFG branches as one batch of two: the same restoration as two forwards per step (float32)."""
    torch.manual_seed(0)
    module = _module(_cfg())
    batch = _batch(refs=(3, 0))
    one = module.restore(batch, steps=3, guidance=3.0, batch_cfg=True)
    two = module.restore(batch, steps=3, guidance=3.0, batch_cfg=False)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-5)
    assert (one - module.restore(batch, steps=3, guidance=1.0)).abs().max() > 1e-3  # guidance acts


def test_the_reference_layout_read_once_gives_the_same_forward():
    from models.iconface import with_layout

    torch.manual_seed(0)
    module = _module(_cfg())
    cond = module.conditioning(_batch(refs=(3, 1)))
    z, s = torch.randn_like(cond.deg), torch.tensor([0.5, 0.9])
    fixed = with_layout(cond)
    assert fixed.layout == (3, False)
    torch.testing.assert_close(module.net(z, s, fixed), module.net(z, s, cond), rtol=0, atol=0)


# ---- configuration ------------------------------------------------------------------------------------


def test_the_recipe_overlay_is_the_papers_recipe(tmp_path):
    from pipelines.config import ConfigError, read_params

    raw = read_params(REPO / "params.yaml", REPO / "configs" / "recipe_gpu.yaml")
    t = raw["train"]
    assert (t["backbone"], t["prediction"], t["lr"], t["batch_size"], t["accumulate"]) == (
        "klein_base_4b",
        "velocity",
        1e-5,
        1,
        4,
    )
    assert (t["precision"], t["frozen_dtype"], t["front_end"], t["reference_readout"]) == (
        "bf16-mixed",
        "bfloat16",
        0,
        "off",
    )
    assert t["gradient_checkpointing"] and t["compile"] and raw["shards"]["resolution"] == 512
    # the overlay changes values only: a key params.yaml lacks is an error naming it
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lerning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="train.lerning_rate"):
        read_params(REPO / "params.yaml", bad)


def test_the_overlay_key_of_params_yaml_reaches_every_stage(tmp_path, monkeypatch):
    from stages._common import load_params

    overlay = tmp_path / "o.yaml"
    overlay.write_text("train:\n  lora_rank: 4\nevaluate:\n  steps: 3\n")
    params = (REPO / "params.yaml").read_text().replace("overlay: null", f"overlay: {overlay}")
    (tmp_path / "params.yaml").write_text(params)
    cfgs = load_params(tmp_path / "params.yaml", "train", "evaluate")
    assert cfgs["train"].lora_rank == 4 and cfgs["evaluate"].steps == 3
    (tmp_path / "params.yaml").write_text(params.replace(str(overlay), str(tmp_path / "missing.yaml")))
    with pytest.raises(SystemExit, match="missing.yaml not found"):
        load_params(tmp_path / "params.yaml", "train")


@pytest.mark.parametrize(
    "over, words",
    [
        ({"compile": True, "conditioning": "composite"}, "conditioning composite"),
        ({"compile": True, "refstar": {"reference_route": "decoupled"}}, "refstar.reference_route decoupled"),
        ({"compile": True, "precision": "16-mixed"}, "precision 16-mixed"),
        ({"checkpoint_fraction": 0.5}, "needs gradient_checkpointing"),
        ({"gradient_checkpointing": True, "checkpoint_fraction": 0.0}, "must lie in"),
        ({"checkpoint_policy": "save_attention"}, "needs gradient_checkpointing"),
    ],
)
def test_compile_combinations_not_run_on_a_gpu_are_refused(over, words):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        _cfg(**over)


def test_bench_gpu_full_configuration_passes_the_train_validation(tmp_path):
    """`python benchmarks/bench_gpu.py`'s klein configuration is built by the same validation as
    --small (weights, vae and prompt_cache given as local paths), for every row."""
    import bench_gpu

    paths = {}
    for key in ("weights", "vae"):
        (tmp_path / key).mkdir()
        paths[key] = str(tmp_path / key)
    (tmp_path / "prompt.safetensors").write_bytes(b"")
    paths["prompt_cache"] = str(tmp_path / "prompt.safetensors")
    for _, over in bench_gpu.TRAIN_ROWS:
        cfg = bench_gpu.train_config(bench_gpu.FULL, paths, over)
        assert cfg.backbone == "klein_base_4b" and cfg.accelerator == "gpu" and cfg.precision == "bf16-mixed"
    recipe = dict(bench_gpu.TRAIN_ROWS)[bench_gpu.RECIPE_ROW]
    cfg = bench_gpu.train_config(bench_gpu.FULL, paths, recipe)
    assert cfg.compile and cfg.gradient_checkpointing and cfg.frozen_dtype == "bfloat16"
    # the row called the recipe is the overlay's checkpointing
    from pipelines.config import read_params

    overlay = read_params(REPO / "params.yaml", REPO / "configs" / "recipe_gpu.yaml")["train"]
    assert (cfg.checkpoint_policy, cfg.checkpoint_fraction) == (
        overlay["checkpoint_policy"],
        overlay["checkpoint_fraction"],
    )
    assert replace(cfg, weights=None).weights is None


@pytest.mark.slow
def test_gpu_check_small_passes_without_ray_mlflow_optuna_or_label_studio(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--small", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["passed"] and set(report["items"]) == {
        "weights",
        "shards",
        "config",
        "fit",
        "resume",
        "restore",
        "pyfunc",
        "bench",
    }
    assert all(v["status"] == "PASS" for v in report["items"].values())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS ", "FAIL "))]
    assert len(lines) == 8 and proc.stdout.strip().splitlines()[-1].startswith("gpu_check: PASS")
