"""The LightningModule of IConFace training: loss, optimiser, logging, restoring.

`IConFaceModule` is given its network (pipelines.network), latent codec, identity encoder and prompt
embedding; it owns the loss (models.losses: eq. 8 and the supplement's eq. 1), the optimiser (AdamW on the
LoRA and the pathways), the logging of every loss term, the learning rate, throughput, the data wait and
the realised reference-count mix, and `restore` (models.sampler). `cast_frozen` / `prepare_for_training`
store frozen weights in bf16 under bf16-mixed and compile the blocks when asked.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, replace

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from models.codecs import LatentCodec
from models.guidance import apply_cfg_drops, draw_cfg_drops
from models.iconface import Conditioning, IConFace
from models.id_encoder import IRBackbone, raw_embedding
from models.losses import (
    LossWeights,
    add_noise,
    draw_sigma_noise,
    dropout_generator,
    fm_operands,
    iconface_loss,
    noise_generator,
    parameterise,
    velocity_target,
)
from models.pathways import identity_anchor, sharpness_tensor
from models.sampler import sample
from pipelines.batches import Batch
from pipelines.config import TrainConfig
from pipelines.refstar import RefstarSettings, add_cycle


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    sigma_scheme: str = "uniform"
    seed: int = 0
    sigma_max: float = 1.0  # σ ∈ (0, sigma_max) in training; sampling starts there (see models.sampler)
    prediction: str = "velocity"  # velocity (the recipe) | x0_residual (see TrainConfig.prediction)
    lr_schedule: str = "constant"  # constant (the recipe) | cosine (warm-up, then cosine decay to 0)
    warmup_steps: int = 0
    total_steps: int = 0  # the cosine's length (max_steps)
    sigma_shift: float = 1.0  # the `shifted` scheme's s (models.losses.sample_sigma); 1 = uniform
    # seed 002's CFG training drops (composite conditioning; 0 = none, IConFace's recipe)
    context_dropout: float = 0.0
    image_dropout: float = 0.0


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """The learning-rate multiplier at optimiser step `step`: 1 for `constant`; for `cosine` a linear
    warm-up over `warmup` steps, then 0.5·(1 + cos(π·t)) with t the fraction of the remaining steps."""
    if schedule == "constant":
        return 1.0
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return float(0.5 * (1.0 + np.cos(np.pi * t)))


COUNTERS = "refface_counters"  # checkpoint key of the counters that must survive a resume


def cast_frozen(modules, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen weights of linear, convolution and RMS-norm layers in `dtype`; returns the bytes
    saved.

    Under `bf16-mixed` Lightning keeps every weight in float32 and autocast casts each one to bf16 at
    every use, so a frozen 3.9 B transformer would cost twice its bf16 size. Only parameters with
    `requires_grad=False` are cast: LoRA, the pathways and anything else trainable stay float32 with
    float32 AdamW state. The transformer's RMS norms (the q/k norms of every attention) take bf16
    activations under autocast, and `torch.rms_norm` runs its fused kernel only when the weight has the
    input's dtype, so they are stored in `dtype` too; other norms keep float32 (autocast runs them in
    float32). The checkpoint holds the trainable weights only, so resume and the saved LoRA do not change.
    """
    saved = 0
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.RMSNorm)
    for m in modules:
        for layer in m.modules():
            if not isinstance(layer, layers):
                continue
            for p in layer.parameters(recurse=False):
                if p.requires_grad or p.dtype == dtype or not p.is_floating_point():
                    continue
                saved += p.numel() * (p.element_size() - torch.empty(0, dtype=dtype).element_size())
                p.data = p.data.to(dtype)
    return saved


def prepare_for_training(module: IConFaceModule, cfg: TrainConfig) -> None:
    """What `fit` and every Ray Train worker do to a fresh module: frozen weights in bf16 under
    bf16-mixed (`frozen_dtype`), compiled blocks when `train.compile` (`IConFace.compile_blocks`)."""
    if (dtype := frozen_dtype(cfg)) is not None:
        cast_frozen([module.net, module.codec, module.id_encoder], dtype)
        module._low = None
    if cfg.compile:
        module.net.compile_blocks()


def frozen_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The storage dtype of frozen weights for a `train` config: `frozen_dtype: auto` stores them in
    bf16 under `bf16-mixed`, float32 otherwise."""
    choice = cfg.frozen_dtype
    if choice == "bfloat16" or (choice == "auto" and cfg.precision == "bf16-mixed"):
        return torch.bfloat16
    return None


def low_precision(module: torch.nn.Module) -> torch.dtype | None:
    """bf16 when some floating weight of `module` is stored in bf16 (it then runs under autocast)."""
    for p in module.parameters():
        if p.dtype == torch.bfloat16:
            return torch.bfloat16
    return None


class IConFaceModule(L.LightningModule):
    """Owns the loss, the optimiser and the logging; `net`, `codec`, `id_encoder` and `text` are given.

    `crop_border` (embed.crop_border) is applied wherever the module embeds an image with the frozen
    identity encoder (the degraded input, the identity loss, the restorer's references), as the shard
    embeddings were made. The identity anchor of the loss uses the network's own temperature T (eq. 4).
    """

    def __init__(
        self,
        net: IConFace,
        codec: LatentCodec,
        id_encoder: IRBackbone,
        text: dict[str, torch.Tensor],
        optim: OptimConfig | None = None,
        weights: LossWeights | None = None,
        crop_border: float = 0.0,
        refstar: RefstarSettings | None = None,
        perceptual: torch.nn.Module | None = None,
    ):
        super().__init__()
        self.net, self.codec = net, codec
        # RefSTAR's masks and cycle loss (pipelines.refstar); `perceptual` = LPIPS for ℓ_perc of eq. 5
        self.refstar = refstar or RefstarSettings()
        self.cycle_perceptual = perceptual
        self.optim, self.weights = optim or OptimConfig(), weights or LossWeights()
        self.crop_border = crop_border
        self.id_encoder = id_encoder.eval().requires_grad_(False)
        self.codec.requires_grad_(False)
        self.register_buffer("text", text["prompt"], persistent=False)
        self.register_buffer("empty_text", text["empty"], persistent=False)
        self.mix: Counter = Counter()
        self.shortfall = 0
        self.samples = 0  # seen by this process (throughput); mix and shortfall survive a resume
        self._t0 = None
        self.history: list[dict] = []
        self._low: torch.dtype | bool | None = None  # bf16 when frozen weights are stored in bf16
        # Checkpoints hold the trainable weights only (the frozen backbone is rebuilt from its config
        # or local weights), so loading is not strict about the frozen keys.
        self.strict_loading = False

    @classmethod
    def from_config(
        cls,
        net: IConFace,
        codec: LatentCodec,
        id_encoder: IRBackbone,
        text: dict,
        cfg: TrainConfig,
        crop_border: float = 0.0,
    ) -> IConFaceModule:
        """The module for a `train` config: its optimiser settings, parameterisation and loss weights
        (α_fm and ω_min stay at the supplement's values); `crop_border` from the `embed` section."""
        optim = OptimConfig(
            cfg.lr,
            cfg.weight_decay,
            cfg.sigma_scheme,
            cfg.seed,
            cfg.sigma_max,
            cfg.prediction,
            cfg.lr_schedule,
            cfg.warmup_steps,
            cfg.max_steps,
            sigma_shift=cfg.sigma_shift,
            **(
                {
                    "context_dropout": cfg.composite.context_dropout,
                    "image_dropout": cfg.composite.image_dropout,
                }
                if cfg.conditioning == "composite"
                else {}
            ),
        )
        perceptual = None
        if cfg.refstar.cycle_loss:
            from pipelines.refstar import load_perceptual

            perceptual, _ = load_perceptual(cfg)
        return cls(
            net,
            codec,
            id_encoder,
            text,
            optim,
            LossWeights(
                lambda_id=cfg.lambda_id,
                lambda_h=cfg.lambda_h,
                id_loss=cfg.composite.id_loss,
                hei_lambda=cfg.composite.hei_lambda,
            ),
            crop_border,
            RefstarSettings.from_config(cfg),
            perceptual,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"net.{n}" for n, p in self.net.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[COUNTERS] = {
            "mix": {str(k): int(v) for k, v in sorted(self.mix.items())},
            "shortfall": int(self.shortfall),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The reference-mix and shortfall counters continue where the checkpoint left them."""
        c = checkpoint.get(COUNTERS)
        if c:
            self.mix = Counter({int(k): v for k, v in c["mix"].items()})
            self.shortfall = int(c["shortfall"])

    # ---- helpers ----------------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast where frozen weights are stored in bf16 (`cast_frozen`) and no autocast is on
        already (Lightning's precision plugin covers the training step, not validation or restoring)."""
        dev = self.device.type
        if self._low is None:
            self._low = low_precision(self) or False
        if not self._low or torch.is_autocast_enabled(dev):
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=self._low)

    def identity(self, images: torch.Tensor) -> torch.Tensor:
        """Raw identity embedding of images in [-1, 1] with the frozen encoder and the configured crop
        (differentiable in the input)."""
        with self.autocast():
            e = raw_embedding(self.id_encoder, (images.clamp(-1, 1) + 1) / 2, self.crop_border)
        return e.float()

    @torch.no_grad()
    def clean(self, lq: torch.Tensor) -> torch.Tensor:
        """The frozen front end's restoration of degraded images (models.iconface.FrontEnd, trained by
        the train_front stage), or `lq` itself without one."""
        front = getattr(self.net, "front", None)
        return lq if front is None else front(lq).clamp(-1, 1)

    def degradation_of(self, lq: torch.Tensor) -> torch.Tensor | None:
        """(B,) what the degradation embedding reads: the log-sharpness of the raw degraded input `lq`
        (B, 3, H, W) in [-1, 1], before the front end cleans it; None for a model without the embedding."""
        if not self.net.cfg.degradation_embed:
            return None
        return sharpness_tensor(lq).clamp_min(1e-3).log()

    def conditioning(self, batch: Batch) -> Conditioning:
        """The model's inputs; with a front end the degraded image is replaced by its output everywhere
        (degraded tokens, structure pathway, blind identity fallback, x0_residual base)."""
        b = batch["lq"].shape[0]
        lq = self.clean(batch["lq"])
        deg = self.codec.encode(lq)
        r = batch["refs"].shape[1]
        refs = (
            self.codec.encode(batch["refs"].flatten(0, 1)).unflatten(0, (b, r))
            if r
            else deg.new_zeros(b, 0, *deg.shape[1:])
        )
        with torch.no_grad():
            z_deg = self.identity(lq)
        degradation = self.degradation_of(batch["lq"])
        tokens = None
        if r and "ref_consistent" in batch:  # RefSTAR: conflict-region reference tokens leave the attention
            from models.refstar import token_keep

            tokens = token_keep(
                batch["ref_consistent"].to(deg), tuple(deg.shape[-2:]), self.refstar.token_keep
            )
        return Conditioning(
            deg,
            refs,
            batch["ref_mask"],
            batch["z_refs"],
            z_deg,
            self.text.expand(b, -1, -1),
            ref_images=batch["refs"],  # read by the composite context's general encoder only
            ref_tokens=tokens,
            ref_scale=batch.get("ref_scale"),  # the reference gate's α (pipelines.reference_gate), if any
            degradation=degradation,
        )

    def predict(
        self, z: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(û, ẑ0) under the configured parameterisation; û is what the sampler integrates."""
        return parameterise(self.net(z, sigma, cond), z, sigma, cond.deg, self.optim.prediction)

    # ---- training -----------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        b = batch["gt"].shape[0]
        with torch.no_grad():
            z0 = self.codec.encode(batch["gt"])
        cond = self.conditioning(batch)
        if self.optim.context_dropout or self.optim.image_dropout:  # seed 002's CFG training (Sec. 4)
            gd = dropout_generator(self.optim.seed, self.global_step, self.global_rank, batch_idx)
            drops = draw_cfg_drops(b, self.optim.image_dropout, self.optim.context_dropout, gd)
            cond = apply_cfg_drops(cond, drops)
        g = noise_generator(self.optim.seed, self.global_step, self.global_rank, batch_idx)
        sigma, noise = draw_sigma_noise(
            tuple(z0.shape), self.optim.sigma_scheme, self.optim.sigma_max, g, self.optim.sigma_shift
        )
        sigma, noise = sigma.to(z0), noise.to(z0)
        z_sigma = add_noise(z0, noise, sigma)
        u_hat, x0_hat = self.predict(z_sigma, sigma, cond)
        has_ref = batch["ref_mask"].any(1)
        e_out = e_ref = e_gt = None
        if bool(has_ref.any()) and self.weights.lambda_id > 0:
            img = self.codec.decode(x0_hat)  # decode ẑ0
            e_out = F.normalize(self.identity(img), dim=-1)
            e_ref = identity_anchor(batch["z_refs"], batch["ref_mask"], cond.z_deg, self.net.cfg.temperature)
            e_gt = F.normalize(batch["z_gt"], dim=-1)
        u_fm, target = fm_operands(u_hat, velocity_target(z0, noise), sigma, self.optim.prediction)
        terms = iconface_loss(u_fm, target, sigma, e_out, e_ref, e_gt, has_ref, self.weights)
        if self.refstar.cycle:  # RefSTAR eq. 5 in the total of eq. 7
            terms = add_cycle(self, batch, x0_hat, sigma, terms, g)
        self.mix.update(batch["got"])
        self.shortfall += sum(w - g_ for w, g_ in zip(batch["wanted"], batch["got"]))
        self.samples += b
        elapsed = time.perf_counter() - self._t0
        logs = {f"train/{k}": v.detach() for k, v in terms.items()}
        logs["train/samples_per_s"] = self.samples / max(elapsed, 1e-9)
        total = sum(self.mix.values())
        for k in range(4):
            logs[f"train/ref_mix_{k}"] = self.mix.get(k, 0) / max(total, 1)
        logs["train/ref_shortfall"] = float(self.shortfall)
        opt = self.optimizers()
        if opt is not None and not isinstance(opt, list):
            logs["train/lr"] = opt.param_groups[0]["lr"]
        self.log_dict(logs, on_step=True, prog_bar=False, batch_size=b)
        self.log("loss", terms["loss"].detach(), prog_bar=True, batch_size=b)
        self.history.append(
            {"step": int(self.global_step), **{k: float(v.detach()) for k, v in terms.items()}}
        )
        return terms["loss"]

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        if self.optim.lr_schedule == "constant":
            return opt
        o = self.optim
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, o.lr_schedule, o.warmup_steps, o.total_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(
        self,
        batch: dict,
        steps: int = 12,
        guidance: float = 4.0,
        seed: int = 42,
        guidance_image: float | None = None,
        guidance_context: float | None = None,
        ref_ensemble: bool = False,
        batch_cfg: bool = False,
    ) -> torch.Tensor:
        """Restored images (B, 3, H, W) in [-1, 1], float32 on the CPU, for a collated batch (0–3
        references per sample); the batch may lie on the CPU whatever the module's device.

        guidance_image / guidance_context / ref_ensemble: seed 002's eqs. 5-6 (models.guidance), in
        place of the prompt guidance (which must then be 1). batch_cfg: both branches of the prompt
        guidance as one batch (`models.sampler.sample`)."""
        self.net.eval()
        dev = self.device
        batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with self.autocast():
            cond = self.conditioning(batch)
            cond = replace(cond, deg=cond.deg.float(), refs=cond.refs.float())  # integrate in float32
            z = sample(
                lambda z_, s_, c_: self.predict(z_, s_, c_)[0].float(),
                cond,
                self.empty_text,
                tuple(cond.deg.shape),
                steps=steps,
                guidance=guidance,
                seed=seed,
                sigma_max=self.optim.sigma_max,
                guidance_image=guidance_image,
                guidance_context=guidance_context,
                ref_ensemble=ref_ensemble,
                batch_cfg=batch_cfg,
            )
            out = self.codec.decode(z)
        self.net.train()
        return out.float().clamp(-1, 1).cpu()
