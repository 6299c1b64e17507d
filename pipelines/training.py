"""Training IConFace with Lightning on batches from the Ray degradation stream.

* `IConFaceModule` — the network is passed in; the module owns the loss (models.losses), the optimiser
  (AdamW on LoRA + pathways), and logging of every loss term, the learning rate, throughput, the data
  wait and the realised reference-count mix.
* `StreamDataModule` — wraps `DegradationStream` as an iterable, step-based dataset: it runs epoch
  after epoch of the stream and, on resume, skips exactly the batches already consumed
  (global_step × accumulate), so nothing is repeated. Each rank reads its own share of chunks
  (`epoch_order` gives every rank the same count: no uneven-shard hang). `num_workers=0`: a forked
  DataLoader worker that calls Ray hangs; the parallelism is in the Ray tasks.
* `collate` — applies the reference-count schedule and turns a stream batch into model tensors.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TypedDict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from models.codecs import Flux2VAECodec, LatentCodec, PixelCodec
from models.composite import build_composite
from models.guidance import apply_cfg_drops, draw_cfg_drops
from models.iconface import (
    Conditioning,
    IConFace,
    IConFaceConfig,
    build_backbone,
    identity_anchor,
    load_front,
)
from models.id_encoder import IRBackbone, raw_embedding
from models.lora import add_lora
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
from models.prompt import load_prompt_cache, synthetic_prompt
from models.sampler import sample
from pipelines.degradations import get_preset
from pipelines.refschedule import draw_refs
from pipelines.refstar import RefstarSettings, add_cycle, degrade_reference
from pipelines.shards import iter_samples
from pipelines.stream import DegradationStream

# ==================================================================================================
# Batches
# ==================================================================================================


def to_unit(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Batch(TypedDict, total=False):
    """The one batch structure of training, validation and restoring (images in [-1, 1]).

    lq, gt (B, 3, H, W); refs (B, R, 3, H, W) zero-padded to R slots with ref_mask (B, R) marking the
    real ones; z_refs (B, R, D) raw reference embeddings (zeros in padded slots); z_gt (B, D); keys;
    wanted / got: the schedule's drawn and realised reference counts (training only).
    RefSTAR (pipelines.refstar), when asked for: ref_consistent (B, R, H, W) float, M = 1 where the
    reference may be transferred (0 in padded slots); ref_lq (B, 3, H, W) the degraded slot-0 reference
    of the cycle loss (zeros where a sample has none).
    """

    keys: list[str]
    lq: torch.Tensor
    gt: torch.Tensor
    refs: torch.Tensor
    ref_mask: torch.Tensor
    z_refs: torch.Tensor
    z_gt: torch.Tensor
    wanted: list[int]
    got: list[int]
    ref_consistent: torch.Tensor
    ref_lq: torch.Tensor


def make_batch(
    lq: np.ndarray | list[np.ndarray],
    refs: list[list[np.ndarray]],
    z_refs: list[list[np.ndarray]] | None = None,
    *,
    dim: int = 0,
    slots: int | None = None,
    gt: np.ndarray | list[np.ndarray] | None = None,
    z_gt: np.ndarray | list[np.ndarray] | None = None,
    keys: list[str] | None = None,
    ref_masks: list[list[np.ndarray | None]] | None = None,
    ref_lq: list[np.ndarray | None] | None = None,
) -> Batch:
    """Pad each sample's references (uint8 (H, W, 3), 0..slots of them) into a `Batch`.

    `slots`: the number of reference slots R (default: the largest count in the batch). `z_refs`: the
    matching raw embeddings per sample, or None (then zeros of width `dim`; the restorer embeds the
    images itself). `ref_masks`: per sample, the contract conflict mask (H, W) uint8 of each reference
    (RefSTAR; → `ref_consistent`); a missing one is an error naming the sample. `ref_lq`: per sample, the
    degraded first reference or None (→ `ref_lq`).
    """
    lq = np.stack([np.asarray(x, np.uint8) for x in lq])
    b, h, w = lq.shape[:3]
    r = max((len(x) for x in refs), default=0) if slots is None else slots
    if z_refs is not None:
        dim = next((np.asarray(e).shape[-1] for es in z_refs for e in es), dim)
    ref_arr = np.zeros((b, r, h, w, 3), np.uint8)
    mask = np.zeros((b, r), bool)
    z = np.zeros((b, r, dim), np.float32)
    for i, rs in enumerate(refs):
        for j, img in enumerate(rs[:r]):
            ref_arr[i, j], mask[i, j] = img, True
            if z_refs is not None:
                z[i, j] = z_refs[i][j]
    out: Batch = {
        "keys": list(keys) if keys is not None else [str(i) for i in range(b)],
        "lq": to_unit(lq),
        "refs": to_unit(ref_arr.reshape(b * r, h, w, 3)).reshape(b, r, 3, h, w)
        if r
        else torch.zeros(b, 0, 3, h, w),
        "ref_mask": torch.from_numpy(mask),
        "z_refs": torch.from_numpy(z),
    }
    if ref_masks is not None:
        from models.refstar import consistent_region

        m = np.zeros((b, r, h, w), np.uint8)
        valid = np.zeros((b, r), bool)
        for i, ms in enumerate(ref_masks):
            for j in range(min(len(refs[i]), r)):
                mk = ms[j] if j < len(ms) else None
                if mk is None or np.asarray(mk).shape != (h, w):
                    raise ValueError(
                        f"sample {out['keys'][i]}: reference {j} has "
                        + (
                            "no conflict mask"
                            if mk is None
                            else f"a {np.asarray(mk).shape} mask for {h}x{w} images"
                        )
                        + "; train.reference_masks needs a mask (refmask<i>.png) on every reference"
                    )
                m[i, j], valid[i, j] = mk, True
        out["ref_consistent"] = (
            consistent_region(torch.from_numpy(m)) * torch.from_numpy(valid)[..., None, None]
        )
    if ref_lq is not None:
        out["ref_lq"] = to_unit(np.stack([np.zeros((h, w, 3), np.uint8) if x is None else x for x in ref_lq]))
    if gt is not None:
        out["gt"] = to_unit(np.stack([np.asarray(x, np.uint8) for x in gt]))
    if z_gt is not None:
        out["z_gt"] = torch.from_numpy(np.stack([np.asarray(x, np.float32) for x in z_gt]))
    return out


def collate(
    batch: dict,
    schedule: tuple[float, ...],
    max_refs: int,
    seed: int,
    epoch: int,
    masks: bool = False,
    ref_preset: str | None = None,
) -> Batch:
    """A stream batch → a `Batch`; draws each sample's references by the schedule (distinct, never
    duplicated), padded to the batch's largest drawn count; `wanted` / `got` record the draws.

    RefSTAR (pipelines.refstar): `masks` takes the chosen references' conflict masks (the stream's
    `masks`); `ref_preset` degrades each sample's first chosen reference for the cycle loss (here in the
    training process: 1 ms per 64 px image)."""
    b = len(batch["keys"])
    keys = batch["keys"]
    draws = [draw_refs(len(batch["refs"][i]), schedule, seed, keys[i], epoch) for i in range(b)]
    chosen = [d.chosen[:max_refs] for d in draws]
    extra = {}
    if masks:
        extra["ref_masks"] = [[batch["masks"][i][k] for k in c] for i, c in enumerate(chosen)]
    if ref_preset is not None:
        extra["ref_lq"] = [
            degrade_reference(batch["refs"][i][c[0]], ref_preset, seed, keys[i], c[0], epoch) if c else None
            for i, c in enumerate(chosen)
        ]
    out = make_batch(
        batch["lq"],
        [[batch["refs"][i][k] for k in c] for i, c in enumerate(chosen)],
        [[batch["ref_emb"][i][k] for k in c] for i, c in enumerate(chosen)],
        dim=batch["gt_emb"].shape[-1],
        gt=batch["gt"],
        z_gt=batch["gt_emb"],
        keys=list(batch["keys"]),
        **extra,
    )
    out["wanted"] = [d.wanted for d in draws]
    out["got"] = [len(c) for c in chosen]
    return out


class StreamIterable(torch.utils.data.IterableDataset):
    """Endless epochs of a DegradationStream, collated, starting after `start_batches` consumed ones."""

    def __init__(
        self,
        stream: DegradationStream,
        schedule,
        max_refs: int,
        seed: int,
        masks: bool = False,
        ref_preset: str | None = None,
    ):
        super().__init__()
        self.stream, self.schedule, self.max_refs, self.seed = stream, schedule, max_refs, seed
        self.masks, self.ref_preset = masks, ref_preset  # RefSTAR (collate)
        self.start_batches = 0
        self.wait_s = 0.0

    def __iter__(self):
        per_epoch = len(self.stream)
        if per_epoch == 0:
            raise RuntimeError(
                "the training stream has no batch for this rank (too few samples for batch size x ranks)"
            )
        epoch, skip = divmod(self.start_batches, per_epoch)
        while True:
            it = self.stream.epoch(epoch, skip_batches=skip)
            while True:
                t = time.perf_counter()
                try:
                    raw = next(it)
                except StopIteration:
                    break
                self.wait_s += time.perf_counter() - t
                out = collate(
                    raw, self.schedule, self.max_refs, self.seed, epoch, self.masks, self.ref_preset
                )
                out["epoch"] = epoch
                yield out
            epoch, skip = epoch + 1, 0


class StreamDataModule(L.LightningDataModule):
    """Training batches from the Ray degradation stream; `setup` runs on every process (rank split)."""

    def __init__(
        self,
        shard_paths: list[str],
        preset: str,
        seed: int,
        batch_size: int,
        max_in_flight: int,
        schedule,
        max_refs: int,
        shuffle: bool = True,
        ray_cpus: int | None = None,
        inline: bool = False,
        storage_options: dict | None = None,
    ):
        """`shard_paths`: shard files or URLs (`pipelines.storage`); `storage_options` for URLs (fsspec's
        keyword arguments; by default credentials come from the environment)."""
        super().__init__()
        self.paths, self.preset, self.seed = shard_paths, preset, seed
        self.batch_size, self.max_in_flight, self.shuffle = batch_size, max_in_flight, shuffle
        self.schedule, self.max_refs, self.ray_cpus, self.inline = schedule, max_refs, ray_cpus, inline
        self.storage_options = storage_options
        self.dataset: StreamIterable | None = None

    def setup(self, stage: str | None = None) -> None:
        from pipelines.stream import connect

        if not self.inline:
            connect(self.ray_cpus)
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        stream = DegradationStream(
            self.paths,
            self.preset,
            self.seed,
            self.batch_size,
            self.max_in_flight,
            self.shuffle,
            rank=rank,
            world_size=world,
            inline=self.inline,
            storage_options=self.storage_options,
        )
        # RefSTAR: masks and the cycle's degraded reference when the module trains with them
        rs = getattr(self.trainer.lightning_module, "refstar", None) if self.trainer else None
        self.dataset = StreamIterable(
            stream,
            self.schedule,
            self.max_refs,
            self.seed,
            masks=bool(rs and rs.masks),
            ref_preset=self.preset if rs and rs.cycle else None,
        )

    def train_dataloader(self):
        if self.trainer is not None:
            self.dataset.start_batches = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=0)


# ==================================================================================================
# The LightningModule
# ==================================================================================================


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
    id_views: int = 0  # ours: identity loss on random shifted/blurred views of the output (0 = the paper)
    sigma_shift: float = 1.0  # the `shifted` scheme's s (models.losses.sample_sigma); 1 = uniform
    # seed 002's CFG training drops (composite conditioning; 0 = none, IConFace's recipe)
    context_dropout: float = 0.0
    image_dropout: float = 0.0


def random_views(img: torch.Tensor, n: int, g: torch.Generator, shift: int = 2) -> list[torch.Tensor]:
    """`n` random views of images (B, 3, H, W) for the identity loss (ours): each shifted by up to `shift`
    pixels (replicate border) and blurred by a Gaussian with σ in [0, 1] px, per sample. The encoder's
    embedding averaged over views rewards what survives small shifts and blur (marks, brows, colours)
    rather than pixel patterns only that encoder reacts to: without views the model raised the primary
    encoder's Ref-ID by 0.024 while the independent evaluator moved by 0.005."""
    b, _, h, w = img.shape
    pad = F.pad(img, (shift,) * 4, mode="replicate")
    x = torch.arange(-2, 3, dtype=img.dtype, device=img.device)
    views = []
    for _ in range(n):
        dy, dx = (torch.randint(0, 2 * shift + 1, (2, b), generator=g, device=g.device)).tolist()
        v = torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
        sig = torch.rand(b, generator=g, device=g.device).to(img) * 1.0 + 1e-3
        k1 = torch.exp(-(x[None] ** 2) / (2 * sig[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)  # (B, 5)
        k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (B*3, 1, 5, 5)
        v = F.conv2d(
            F.pad(v, (2, 2, 2, 2), mode="replicate").reshape(1, b * 3, h + 4, w + 4), k2, groups=b * 3
        )
        views.append(v.reshape(b, 3, h, w))
    return views


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


def prepare_for_training(module, cfg) -> None:
    """What `fit` and every Ray Train worker do to a fresh module: frozen weights in bf16 under
    bf16-mixed (`frozen_dtype`), compiled blocks when `train.compile` (`IConFace.compile_blocks`)."""
    if (dtype := frozen_dtype(cfg)) is not None:
        cast_frozen([module.net, module.codec, module.id_encoder], dtype)
        module._low = None
    if cfg.compile:
        module.net.compile_blocks(cfg.compile_memory_budget)


def frozen_dtype(cfg) -> torch.dtype | None:
    """The storage dtype of frozen weights for a `train` config: `frozen_dtype: auto` stores them in
    bf16 under `bf16-mixed`, float32 otherwise."""
    choice = getattr(cfg, "frozen_dtype", "auto")
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
        cfg,
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
            cfg.id_views,
            sigma_shift=cfg.sigma_shift,
            **(
                {"context_dropout": cfg.context_dropout, "image_dropout": cfg.image_dropout}
                if cfg.conditioning == "composite"
                else {}
            ),
        )
        perceptual = None
        if getattr(cfg, "cycle_loss", False):
            from pipelines.refstar import load_perceptual

            perceptual, _ = load_perceptual(cfg)
        return cls(
            net,
            codec,
            id_encoder,
            text,
            optim,
            LossWeights(
                lambda_id=cfg.lambda_id, lambda_h=cfg.lambda_h, id_loss=cfg.id_loss, hei_lambda=cfg.hei_lambda
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
            if self.optim.id_views:
                e_out = F.normalize(
                    torch.stack([self.identity(v) for v in random_views(img, self.optim.id_views, g)]).mean(
                        0
                    ),
                    dim=-1,
                )
            else:
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
        batch_cfg: bool = True,
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


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image PSNR (B,) of images in [-1, 1], on the 0–255 scale after rounding to 8 bits."""
    from pipelines.evaluation import psnr_u8

    return psnr_u8(to_uint8(a), to_uint8(b))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def degraded_readout(cfg) -> bool:
    """Whether the head reads the aligned degraded tokens (models.iconface, "Degraded readout"): a
    random backbone cannot fetch that evidence for noise-only scene tokens in a CPU budget; a pretrained
    one keeps the paper's head."""
    return cfg.weights is None and cfg.prediction == "x0_residual"


def reference_readout(cfg) -> bool:
    """Whether the head reads the aligned references (models.iconface, "Reference readout"): `auto`
    turns it on where the degraded readout is on."""
    if cfg.reference_readout == "auto":
        return degraded_readout(cfg)
    return cfg.reference_readout == "on"


def build_network(cfg, z_dim: int) -> tuple[IConFace, object, dict]:
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
            cfg.general_encoder, cfg.general_encoder_weights, z_dim, tr.config.joint_attention_dim
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
            front_end=cfg.front_end,
            conditioning=cfg.conditioning,
            reference_route=cfg.reference_route,
            decoupled_scale=cfg.decoupled_scale,
            decoupled_rank=cfg.decoupled_rank,
        ),
        composite,
    )
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


def validation_batch(shards: str, cfg, max_refs: int) -> Batch:
    """The first `val_samples` val targets, degraded once with `val_preset` (seed 42 + index), with
    their first protocol references (up to max_refs) in max_refs slots."""
    samples = []
    for i, s in enumerate(iter_samples(shards, "val")):
        if i >= cfg.val_samples:
            break
        lq, _ = get_preset(cfg.val_preset)(s["gt"], np.random.default_rng(42 + i))
        samples.append((s, lq))
    if not samples:
        raise ValueError(f"{shards} has no val samples to validate on")
    masks = getattr(cfg, "reference_masks", "none") != "none"  # RefSTAR: the shards' masks, as in training
    return make_batch(
        [lq for _, lq in samples],
        [s["refs"][:max_refs] for s, _ in samples],
        [s["ref_emb"][:max_refs] for s, _ in samples],
        dim=samples[0][0]["gt_emb"].shape[-1],
        slots=max_refs,
        gt=[s["gt"] for s, _ in samples],
        z_gt=[s["gt_emb"] for s, _ in samples],
        keys=[s["key"] for s, _ in samples],
        ref_masks=[s["masks"][:max_refs] for s, _ in samples] if masks else None,
    )


def no_refs(batch: Batch) -> Batch:
    b, _, c, h, w = batch["refs"].shape
    return {
        **batch,
        "refs": torch.zeros(b, 0, c, h, w),
        "ref_mask": torch.zeros(b, 0, dtype=torch.bool),
        "z_refs": torch.zeros(b, 0, batch["z_refs"].shape[-1]),
    }


@torch.no_grad()
def evaluate(
    module: IConFaceModule, batch: Batch, evaluator, steps: int, guidance: float = 4.0
) -> tuple[dict, dict]:
    """PSNR and identity similarity (evaluator encoder with the module's crop, cosine to the target) of
    the degraded input and of the restoration with references and without: (means, outputs), the
    outputs holding the restorations and the per-target values (`per_target`, for paired intervals)."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(
            raw_embedding(evaluator.eval(), (x.clamp(-1, 1) + 1) / 2, module.crop_border), dim=-1
        )

    g = unit(batch["gt"])

    def idsim(x: torch.Tensor) -> np.ndarray:
        return (unit(x) * g).sum(-1).numpy()

    out_ref = module.restore(batch, steps=steps, guidance=guidance)
    out_none = module.restore(no_refs(batch), steps=steps, guidance=guidance)
    per = {
        "lq_psnr": psnr(batch["lq"], batch["gt"]),
        "restored_psnr": psnr(out_ref, batch["gt"]),
        "restored_noref_psnr": psnr(out_none, batch["gt"]),
        "lq_id_sim": idsim(batch["lq"]),
        "restored_id_sim": idsim(out_ref),
        "restored_noref_id_sim": idsim(out_none),
    }
    m = {k: round(float(np.mean(v)), 4) for k, v in per.items()}
    return m, {"ref": out_ref, "none": out_none, "per_target": per}
