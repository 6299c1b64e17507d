"""LoRA on the transformer's image-stream attention and MLP projections (peft), in diffusers' format.

Targets (as diffusers' FLUX.2 klein LoRA scripts): in double blocks the image stream's `attn.to_q/to_k/to_v/to_out.0` and
`ff.linear_in/linear_out` (never the bare `attn.to_out`, a ModuleList that peft refuses; the text
stream's `add_*_proj`/`to_add_out`/`ff_context` stay frozen); in single blocks, which carry text and
image in one sequence, the fused `attn.to_qkv_mlp_proj` and `attn.to_out`. Saved with
`Flux2KleinPipeline.save_lora_weights` (keys `transformer.<module>.lora_{A,B}.weight`), so diffusers'
`load_lora_weights` / `load_lora_adapter` read it; our pathway weights go to a separate safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from models.safetensors_io import save_file

LORA_FILE = "pytorch_lora_weights.safetensors"
PATHWAYS_FILE = "iconface_pathways.safetensors"
BACKBONE_FILE = "backbone.safetensors"  # only when the backbone itself was trained (tiny)
TARGET_MODULES = (
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.(linear_in|linear_out))"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))"
)


def add_lora(transformer, rank: int = 16, alpha: float | None = None) -> None:
    """Freeze the transformer and add a rank-`rank` adapter (B = 0: the output is unchanged)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=TARGET_MODULES, init_lora_weights=True)
    )


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


def save_trainable(model, out_dir: str | Path) -> None:
    """LoRA in diffusers' format plus IConFace's pathway weights (safetensors)."""
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lora_parameters(model.transformer):
        Flux2KleinPipeline.save_lora_weights(
            str(out), transformer_lora_layers=get_peft_model_state_dict(model.transformer)
        )
    pathways = {
        n: p.detach().contiguous() for n, p in model.named_parameters() if not n.startswith("transformer.")
    }
    if pathways:
        save_file(pathways, str(out / PATHWAYS_FILE), metadata={"variant": model.cfg.variant})
    base = {
        n: p.detach().contiguous()
        for n, p in model.transformer.named_parameters()
        if p.requires_grad and "lora_" not in n
    }
    if base:
        save_file(base, str(out / BACKBONE_FILE))


def load_trainable(model, in_dir: str | Path, pathways: bool = True) -> None:
    """Load what `save_trainable` wrote into a freshly built model (LoRA is added here); `pathways`:
    IConFace's pathway weights too, which must then match the model's variant name for name."""
    d = Path(in_dir)
    if (d / BACKBONE_FILE).is_file():
        path = d / BACKBONE_FILE
        try:  # the file holds the trained part of the backbone only: missing keys are the frozen rest
            res = model.transformer.load_state_dict(load_file(str(path)), strict=False)
        except RuntimeError as exc:  # a shape that differs
            raise ValueError(f"{path}: does not fit the model's backbone: {exc}") from exc
        if res.unexpected_keys:
            raise ValueError(f"{path}: weights the model's backbone lacks: {res.unexpected_keys[:5]}")
    if (d / LORA_FILE).is_file():
        if "default" in (getattr(model.transformer, "peft_config", None) or {}):
            # The adapter exists already (built for training): load the weights into it.
            from peft.utils import set_peft_model_state_dict

            path = d / LORA_FILE
            state = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
            try:
                res = set_peft_model_state_dict(model.transformer, state, adapter_name="default")
            except RuntimeError as exc:  # a rank or a layer size that differs
                raise ValueError(f"{path}: does not fit the model's LoRA adapter: {exc}") from exc
            if getattr(res, "unexpected_keys", None):
                raise ValueError(f"{path}: keys not in the model's adapter: {res.unexpected_keys[:5]}")
            missing = [k for k in getattr(res, "missing_keys", None) or () if "lora_" in k]
            if missing:
                raise ValueError(f"{path}: adapter weights the file lacks: {missing[:5]}")
        else:
            model.transformer.load_lora_adapter(
                str(d / LORA_FILE), prefix="transformer", adapter_name="default"
            )
    if pathways and (d / PATHWAYS_FILE).is_file():
        state = load_file(str(d / PATHWAYS_FILE))
        missing = set(state) ^ {n for n, _ in model.named_parameters() if not n.startswith("transformer.")}
        if missing:
            raise ValueError(
                f"{d / PATHWAYS_FILE}: pathway weights do not match variant {model.cfg.variant!r}: {sorted(missing)[:5]}"
            )
        model.load_state_dict(state, strict=False)


def load_shared(model, in_dir: str | Path) -> dict[str, list[str]]:
    """Start `model` from what `save_trainable` wrote for another configuration of the same backbone (a
    fine-tune: the ablation's rows start from the trained default): the backbone and LoRA weights load as
    in `load_trainable` and must match; of the pathway weights, those the model has load, the rest are
    left out, and the model's pathways the file lacks keep their initialisation; a part whose shape
    changes between variants is mapped by the model's `adapt_pathways` (IConFace's). Returns the names
    {"left_out": in the file only, "fresh": in the model only}; a shared name whose shape differs is an
    error naming the file and the weight."""
    d = Path(in_dir)
    path = d / PATHWAYS_FILE
    if not any((d / f).is_file() for f in (PATHWAYS_FILE, LORA_FILE, BACKBONE_FILE)):
        raise FileNotFoundError(
            f"{d}: none of {PATHWAYS_FILE}, {LORA_FILE}, {BACKBONE_FILE}: not a model folder written by the "
            "train stage"
        )
    trained = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    need = [LORA_FILE] if any("lora_" in n for n in trained) else []
    need += [BACKBONE_FILE] if any("lora_" not in n for n in trained) else []
    if lacking := [f for f in need if not (d / f).is_file()]:
        raise FileNotFoundError(
            f"{d}: lacks {', '.join(lacking)}, which the model trains: the row would not start from the "
            "trained default"
        )
    state = load_file(str(path)) if path.is_file() else {}  # a variant without pathways has none
    if hasattr(model, "adapt_pathways"):  # a part whose shape differs between variants (merged into one)
        state = model.adapt_pathways(state)
    saved = set(state)
    own = {n: p for n, p in model.named_parameters() if not n.startswith("transformer.")}
    bad = [
        f"{n} {tuple(state[n].shape)} vs {tuple(p.shape)}"
        for n, p in own.items()
        if n in state and state[n].shape != p.shape
    ]
    if bad:
        raise ValueError(f"{path}: pathway weights of another shape than the model's: {bad[:5]}")
    with torch.no_grad():
        for n, p in own.items():
            if n in state:
                p.copy_(state[n])
    load_trainable(model, d, pathways=False)
    return {"left_out": sorted(saved - set(own)), "fresh": sorted(set(own) - saved)}


def merge_lora(transformer) -> int:
    """Fold every LoRA adapter into its base weight, W ← W + (α/r)·B·A, and put the bare base layer
    back in its place; returns the number of layers merged.

    For inference only (the restorer): the merged model has the transformer's own module tree, so
    nothing of peft runs per call and `torch.compile` sees plain linear layers. Merge in float32 and
    cast afterwards (`pipelines.module.cast_frozen`), so that the sum is not rounded twice.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(transformer.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not name:
            continue
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, module.get_base_layer())
        merged += 1
    if merged:
        transformer.peft_config = {}
        transformer._hf_peft_config_loaded = False
    return merged
