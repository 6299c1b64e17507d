"""The ablation's fine-tune protocol: a row starts from the trained default's folder (models.lora.load_shared),
each row is paired against its baseline (pipelines.ablation.baselines), and each seed system's claim gets a
verdict in its paper's direction (pipelines.ablation._verdicts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.iconface import IConFace, IConFaceConfig, build_backbone
from models.lora import LORA_FILE, PATHWAYS_FILE, add_lora, load_shared, save_trainable
from pipelines.ablation import _verdicts, baselines
from pipelines.config import VARIANT_NAMES


def _model(variant: str, seed: int, lora: bool = True, memory_tokens: int = 8, rank: int = 4) -> IConFace:
    torch.manual_seed(seed)
    m = IConFace(build_backbone("tiny"), IConFaceConfig(variant=variant, memory_tokens=memory_tokens))
    if lora:
        add_lora(m.transformer, rank=rank)
    with torch.no_grad():  # B and some pathways start at zero: make every weight something to check
        for n, p in m.named_parameters():
            if "lora_B" in n or not n.startswith("transformer."):
                p.add_(torch.randn_like(p))
    return m


def _pathways(m) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters() if not n.startswith("transformer.")}


def test_a_row_starts_from_the_default_minus_its_removed_parts(tmp_path):
    full = _model("full", seed=0)
    save_trainable(full, tmp_path / "model")
    row = _model("+id", seed=1)  # residual and identity pathways, no memory and one route
    before = _pathways(row)
    names = load_shared(row, tmp_path / "model")
    # the parts +id lacks are left out; everything it shares with the default is the default's
    assert {n.split(".")[0] for n in names["left_out"]} >= {"xattn", "pool_base"}
    assert names["fresh"] == []
    ref, own = _pathways(full), _pathways(row)
    assert {"residual", "identity"} <= {n.split(".")[0] for n in own}
    assert set(own) < set(ref) and all(torch.equal(own[n], ref[n]) for n in own)
    assert all(not torch.equal(before[n], own[n]) for n in own)
    lora_full = {n: p for n, p in full.transformer.named_parameters() if "lora_" in n}
    lora_row = {n: p for n, p in row.transformer.named_parameters() if "lora_" in n}
    assert lora_full.keys() == lora_row.keys()
    assert all(torch.equal(lora_full[n], lora_row[n]) for n in lora_full)


def test_a_row_with_new_modules_keeps_their_initialisation(tmp_path):
    save_trainable(_model("concat", seed=0), tmp_path / "model")
    full = _model("full", seed=1)
    init = _pathways(full)
    names = load_shared(full, tmp_path / "model")
    assert names["left_out"] == [] and {n.split(".")[0] for n in names["fresh"]} >= {"identity", "xattn"}
    now = _pathways(full)
    assert all(torch.equal(now[n], init[n]) for n in names["fresh"])


def test_a_default_of_another_shape_is_refused_by_name(tmp_path):
    save_trainable(_model("full", seed=0), tmp_path / "model")
    wide = _model("full", seed=0, memory_tokens=16)
    with pytest.raises(ValueError, match=rf"{PATHWAYS_FILE}: pathway weights of another shape"):
        load_shared(wide, tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="not a model folder written by the train stage"):
        load_shared(wide, tmp_path)


def test_every_row_is_paired_against_its_baseline():
    names = [
        *VARIANT_NAMES,
        "default",
        "composite",
        "composite_ensemble",
        "refstar_in_context",
        "refstar_decoupled",
    ]
    base = baselines(names)
    assert base["concat"] is None and base["+struct"] == "concat" and base["full"] == "single_route"
    # the trained default as it is: the seed systems' baseline, paired with none
    assert base["default"] is None
    assert base["composite"] == "default" and base["composite_ensemble"] == "composite"
    assert base["refstar_in_context"] == "default" and base["refstar_decoupled"] == "refstar_in_context"
    # a Table 3 row left out of the list: the next one pairs with the one before it
    assert baselines(["concat", "+id", "full"]) == {"concat": None, "+id": "concat", "full": "+id"}
    # an addition whose baseline is not among the rows has none
    assert baselines(["concat", "refstar_decoupled"])["refstar_decoupled"] is None


def test_each_claim_is_judged_in_its_papers_direction():
    rng = np.random.default_rng(0)
    n = 40
    ref = rng.normal(0.85, 0.01, n)
    blind, copy = ref - 0.01 + rng.normal(0, 1e-3, n), np.full(n, 0.20)
    extra = {
        "default": {"ref": ref, "none": blind, "copy": np.full(n, 0.30), "copy_blind": copy},
        # masks copy less in conflict regions (the claim: lower), identity unchanged
        "refstar_in_context": {
            "ref": ref.copy(),
            "none": blind,
            "copy": np.where(np.arange(n) % 4, 0.20, np.nan),
            "copy_blind": copy,
        },
        # the decoupled route: identity lower (a reversal) with blind lower by as much (same reference effect)
        "refstar_decoupled": {"ref": ref - 0.01, "none": blind - 0.01, "copy": copy, "copy_blind": copy},
        # the cycle loss: identity unchanged, but the references no longer read (refs = blind)
        "refstar_decoupled_cycle": {"ref": ref - 0.01 + rng.normal(0, 1e-5, n), "none": ref - 0.01},
    }
    extra["refstar_decoupled_cycle"] |= {"copy": copy, "copy_blind": copy}
    names = list(extra)
    lines, out = _verdicts(names, baselines(names), extra, seed=0)
    assert out["refstar_in_context"]["verdict"] == "shown" and out["refstar_in_context"]["n"] == 30
    assert out["refstar_in_context"]["reason"] == ""
    assert out["refstar_decoupled"]["verdict"] == "not shown: lower"
    assert out["refstar_decoupled"]["reason"].startswith("its reference effect is its baseline's")
    assert out["refstar_decoupled_cycle"]["verdict"] == "not shown: no difference"
    assert out["refstar_decoupled_cycle"]["reason"].startswith("the row does not read its references")
    assert "default" not in out
    assert any("RefSTAR, conflict masks" in line and "| shown | — |" in line for line in lines)
    # a baseline that copies nothing beyond its blind output leaves the masks nothing to remove
    extra["default"]["copy"] = extra["refstar_in_context"]["copy"] = copy
    _, out = _verdicts(names, baselines(names), extra, seed=0)
    assert out["refstar_in_context"]["verdict"] == "not shown: no difference"
    assert "nothing for the masks to remove" in out["refstar_in_context"]["reason"]
    # a row that reads its references less than its baseline says so, with the paired difference
    extra["refstar_decoupled"]["none"] = ref - 0.015
    _, out = _verdicts(names, baselines(names), extra, seed=0)
    assert out["refstar_decoupled"]["reason"].startswith("it reads its references less than its baseline")


def test_single_route_starts_with_both_routes_queries(tmp_path):
    """The memory pooler of `single_route` has the queries of both of `full`'s routes (eq. 7's order); the
    detail route's attention is left out."""
    full = _model("full", seed=0)
    save_trainable(full, tmp_path / "model")
    row = _model("single_route", seed=1)
    names = load_shared(row, tmp_path / "model")
    joined = torch.cat([full.pool_base.queries, full.pool_detail.queries], 0)
    assert torch.equal(row.pool_base.queries, joined)
    assert torch.equal(row.pool_base.attn.in_proj_weight, full.pool_base.attn.in_proj_weight)
    assert "pool_detail.attn.in_proj_weight" in names["left_out"] and names["fresh"] == []
    assert "pool_detail.queries" not in names["left_out"]  # used: it is the second half of the queries


def test_a_folder_without_the_weights_the_row_trains_is_refused_by_name(tmp_path):
    """A row whose LoRA would stay at B = 0 does not start from the trained default: refused, naming the
    folder and the file; a LoRA of another rank is refused naming the file."""
    save_trainable(_model("full", seed=0), tmp_path / "model")
    (tmp_path / "model" / LORA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"model: lacks {LORA_FILE}"):
        load_shared(_model("full", seed=1), tmp_path / "model")
    save_trainable(_model("full", seed=0), tmp_path / "r4")
    wider = _model("full", seed=0, rank=8)
    with pytest.raises(ValueError, match=rf"{LORA_FILE}: does not fit the model's LoRA adapter"):
        load_shared(wider, tmp_path / "r4")


def test_the_fine_tune_needs_the_plain_default_and_table3_in_order():
    from pipelines.ablation import finetune_problems
    from pipelines.config import AblateConfig, ConfigError
    from pipelines.train_config import TrainConfig, with_overrides

    assert finetune_problems(TrainConfig()) == []
    bad = with_overrides(TrainConfig(), {"variant": "+id", "refstar.cycle_loss": True})
    assert finetune_problems(bad) == ["train.variant is '+id', not 'full'", "train.refstar.cycle_loss is on"]
    with pytest.raises(ConfigError, match="Table 3's variants must come in its order"):
        AblateConfig(variants=("full", "concat")).validate("ablate")
    AblateConfig(variants=("concat", "full", "composite")).validate("ablate")


def test_the_knock_out_before_any_step_puts_every_mode_back():
    """fit's as-loaded restoration runs the sampler in eval mode; training must go on in the modes the
    module had (dropout, the frozen encoders' eval)."""
    from pipelines.fit import _restore_as_loaded

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.frozen = torch.nn.Dropout(0.1), torch.nn.Dropout(0.1).eval()

        def restore(self, val, steps, guidance):
            self.eval()
            return torch.zeros(1)

    m = Module().train()
    m.frozen.eval()
    _restore_as_loaded(m, None, 2, 1.0)
    assert m.training and m.net.training and not m.frozen.training


def test_the_stage_refuses_a_protocol_it_cannot_run(tmp_path):
    """stages.ablate.protocol_base: the fine-tune's overrides, or an exit naming what is wrong."""
    from pipelines.config import AblateConfig
    from pipelines.train_config import TrainConfig, with_overrides
    from stages.ablate import protocol_base

    tcfg, cfg = TrainConfig(), AblateConfig(steps=40, lr=3e-4, warmup_steps=5)
    base, init = protocol_base(cfg, tcfg, tcfg, str(tmp_path))
    assert init == str(tmp_path) and (base.lr, base.warmup_steps, base.lr_schedule) == (3e-4, 5, "cosine")
    with pytest.raises(SystemExit, match="--init 'nowhere' is not a folder"):
        protocol_base(cfg, tcfg, tcfg, "nowhere")
    with pytest.raises(SystemExit, match="plain IConFace default as its base: train.variant is 'concat'"):
        protocol_base(cfg, with_overrides(tcfg, {"variant": "concat"}), tcfg, str(tmp_path))
    scratch = AblateConfig(protocol="scratch", steps=40)
    assert protocol_base(scratch, with_overrides(tcfg, {"warmup_steps": 10}), tcfg, None) == (tcfg, None)
    with pytest.raises(SystemExit, match="scratch trains 40 steps but train.warmup_steps is 50"):
        protocol_base(scratch, with_overrides(tcfg, {"warmup_steps": 50}), tcfg, None)


def test_table3_rows_leave_the_readout_out_only_where_the_default_has_one():
    """pipelines.ablation.table3_without_readout decides it once; stages.ablate's row overrides follow it:
    Table 3's rows drop the readout, `default` never does, and a default without the readout (the paper's
    head, klein) or `table3_readout: as_trained` leaves every row as trained."""
    from pipelines.ablation import table3_without_readout
    from pipelines.config import DEFAULT_ROW, AblateConfig
    from pipelines.train_config import TrainConfig, with_overrides
    from stages.ablate import variant_overrides

    tcfg = TrainConfig()  # the CPU default: reference_readout auto, on with x0_residual
    assert table3_without_readout(AblateConfig(), tcfg)
    assert not table3_without_readout(AblateConfig(table3_readout="as_trained"), tcfg)
    assert not table3_without_readout(AblateConfig(), with_overrides(tcfg, {"reference_readout": "off"}))
    off = table3_without_readout(AblateConfig(), tcfg)
    assert variant_overrides("+id", None, off)[0] == {"variant": "+id", "reference_readout": "off"}
    assert variant_overrides(DEFAULT_ROW, None, off)[0] == {"variant": "full"}
    assert variant_overrides("+id", None, False)[0] == {"variant": "+id"}
