"""The network of a `train` config: IConFace with LoRA around the configured FLUX.2 transformer, the latent
codec and the prompt embedding (`build_network`), and which of our readouts the config turns on."""

from __future__ import annotations

import torch

from models.codecs import Flux2VAECodec, LatentCodec, PixelCodec
from models.composite import build_composite
from models.iconface import IConFace, IConFaceConfig, build_backbone
from models.lora import add_lora
from models.pathways import load_front
from models.prompt import load_prompt_cache, synthetic_prompt
from pipelines.config import TrainConfig


def degraded_readout(cfg: TrainConfig) -> bool:
    """Whether the head reads the aligned degraded tokens (models.iconface, "Degraded readout"): a
    random backbone cannot fetch that evidence for noise-only scene tokens in a CPU budget; a pretrained
    one keeps the paper's head."""
    return cfg.weights is None and cfg.prediction == "x0_residual"


def reference_readout(cfg: TrainConfig) -> bool:
    """Whether the head reads the aligned references (models.iconface, "Reference readout"): `auto`
    turns it on where the degraded readout is on."""
    if cfg.reference_readout == "auto":
        return degraded_readout(cfg)
    return cfg.reference_readout == "on"


def build_network(cfg: TrainConfig, z_dim: int) -> tuple[IConFace, LatentCodec, dict[str, torch.Tensor]]:
    """(IConFace with LoRA, latent codec, prompt embeddings) from the config; fails before any work."""
    torch.manual_seed(cfg.seed)  # the frozen tiny backbone is rebuilt identically on resume
    codec = Flux2VAECodec.from_path(cfg.vae) if cfg.vae else PixelCodec(cfg.pixel_patch)
    # A randomly initialised tiny backbone takes whatever channels the codec gives.
    overrides = (
        {"in_channels": codec.channels} if cfg.weights is None and cfg.backbone in ("tiny", "small") else {}
    )
    tr = build_backbone(cfg.backbone, cfg.weights, **overrides)
    if codec.channels != tr.config.in_channels:
        raise ValueError(
            f"the latent codec gives {codec.channels} channels but backbone {cfg.backbone} takes "
            f"{tr.config.in_channels}; set train.pixel_patch (3·patch² channels) or train.vae"
        )
    if cfg.weights is None and cfg.prediction == "x0_residual":
        # A random backbone predicting a residual starts at the degraded image exactly (DiT's
        # zero-initialised output layer): no steps are spent undoing a random initial residual.
        torch.nn.init.zeros_(tr.proj_out.weight)
        if tr.proj_out.bias is not None:
            torch.nn.init.zeros_(tr.proj_out.bias)
    add_lora(tr, cfg.lora_rank)
    if cfg.train_backbone:
        tr.requires_grad_(True)
    if cfg.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    composite = (
        build_composite(
            cfg.composite.general_encoder,
            cfg.composite.general_encoder_weights,
            z_dim,
            tr.config.joint_attention_dim,
        )
        if cfg.conditioning == "composite"
        else None
    )
    net = IConFace(
        tr,
        IConFaceConfig(
            variant=cfg.variant,
            id_dim=z_dim,
            memory_tokens=cfg.memory_tokens,
            max_refs=cfg.max_refs,
            temperature=cfg.temperature,
            deg_readout=degraded_readout(cfg),
            ref_readout=reference_readout(cfg),
            degradation_embed=cfg.degradation_embed,
            front_end=cfg.front_end,
            conditioning=cfg.conditioning,
            reference_route=cfg.refstar.reference_route,
            decoupled_scale=cfg.refstar.decoupled_scale,
            decoupled_rank=cfg.refstar.decoupled_rank,
        ),
        composite,
    )
    if cfg.gradient_checkpointing:
        net.checkpoint_blocks(cfg.checkpoint_fraction, cfg.checkpoint_policy)
    if cfg.front_end:
        if cfg.front:  # the train_front stage's weights (a bundle's come with its pathway weights)
            load_front(net.front, cfg.front)
        net.front.requires_grad_(False)  # stage 1 stays frozen (DiffBIR)
    text = (
        load_prompt_cache(cfg.prompt_cache)
        if cfg.prompt_cache
        else synthetic_prompt(8, tr.config.joint_attention_dim, seed=0)
    )
    return net, codec, text
