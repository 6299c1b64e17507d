"""Training IConFace with Lightning on batches from the Ray degradation stream.

* `IConFaceModule` — the network is passed in; the module owns the loss (models.losses), the optimiser
  (AdamW on LoRA + pathways), and logging of every loss term, the learning rate, throughput, the data
  wait and the realised reference-count mix.
* `StreamDataModule` — wraps `DegradationStream` as an iterable, step-based dataset: it runs epoch
  after epoch of the stream and, on resume, skips exactly the batches already consumed
  (global_step × accumulate), so nothing is repeated. Each rank reads its own share of chunks
  (`epoch_order` gives every rank the same count: no uneven-shard hang). `num_workers=0`: a forked
  DataLoader worker that calls Ray hangs (FACTS.md); the parallelism is in the Ray tasks.
* `collate` — applies the reference-count schedule and turns a stream batch into model tensors.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from models.codecs import Flux2VAECodec, LatentCodec, PixelCodec
from models.iconface import Conditioning, IConFace, IConFaceConfig, build_backbone, identity_anchor
from models.id_encoder import IRBackbone, preprocess
from models.lora import add_lora
from models.losses import (
    LossWeights,
    add_noise,
    iconface_loss,
    sample_sigma,
    velocity_target,
)
from models.prompt import load_prompt_cache, synthetic_prompt
from models.sampler import sample
from pipelines.degradations import get_preset
from pipelines.refschedule import draw_refs
from pipelines.shards import iter_samples
from pipelines.stream import DegradationStream

# ==================================================================================================
# Batches
# ==================================================================================================


def to_unit(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def collate(batch: dict, schedule: tuple[float, ...], max_refs: int, seed: int, epoch: int) -> dict:
    """A stream batch → tensors; draws each sample's references by the schedule (distinct, no padding copies).

    Returns lq, gt (B, 3, H, W) in [-1, 1]; refs (B, R, 3, H, W) with R the batch's largest drawn count
    (zero-padded), ref_mask (B, R); z_refs (B, R, D); z_gt (B, D); wanted / got counts for logging.
    """
    b = len(batch["keys"])
    draws = [draw_refs(len(batch["refs"][i]), schedule, seed, batch["keys"][i], epoch) for i in range(b)]
    r = max((len(d.chosen) for d in draws), default=0)
    h, w = batch["gt"].shape[1:3]
    refs = np.zeros((b, r, h, w, 3), np.uint8)
    mask = np.zeros((b, r), bool)
    dim = batch["gt_emb"].shape[-1]
    z_refs = np.zeros((b, r, dim), np.float32)
    for i, d in enumerate(draws):
        for j, k in enumerate(d.chosen[:max_refs]):
            refs[i, j] = batch["refs"][i][k]
            z_refs[i, j] = batch["ref_emb"][i][k]
            mask[i, j] = True
    return {
        "keys": list(batch["keys"]),
        "lq": to_unit(batch["lq"]),
        "gt": to_unit(batch["gt"]),
        "refs": to_unit(refs.reshape(b * r, h, w, 3)).reshape(b, r, 3, h, w)
        if r
        else torch.zeros(b, 0, 3, h, w),
        "ref_mask": torch.from_numpy(mask),
        "z_refs": torch.from_numpy(z_refs),
        "z_gt": torch.from_numpy(np.asarray(batch["gt_emb"], np.float32)),
        "wanted": [d.wanted for d in draws],
        "got": [len(d.chosen) for d in draws],
    }


class StreamIterable(torch.utils.data.IterableDataset):
    """Endless epochs of a DegradationStream, collated, starting after `start_batches` consumed ones."""

    def __init__(self, stream: DegradationStream, schedule, max_refs: int, seed: int):
        super().__init__()
        self.stream, self.schedule, self.max_refs, self.seed = stream, schedule, max_refs, seed
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
                out = collate(raw, self.schedule, self.max_refs, self.seed, epoch)
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
    ):
        super().__init__()
        self.paths, self.preset, self.seed = shard_paths, preset, seed
        self.batch_size, self.max_in_flight, self.shuffle = batch_size, max_in_flight, shuffle
        self.schedule, self.max_refs, self.ray_cpus, self.inline = schedule, max_refs, ray_cpus, inline
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
        )
        self.dataset = StreamIterable(stream, self.schedule, self.max_refs, self.seed)

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


class IConFaceModule(L.LightningModule):
    """Owns the loss, the optimiser and the logging; `net`, `codec`, `id_encoder` and `text` are given."""

    def __init__(
        self,
        net: IConFace,
        codec: LatentCodec,
        id_encoder: IRBackbone,
        text: dict[str, torch.Tensor],
        optim: OptimConfig | None = None,
        weights: LossWeights | None = None,
    ):
        super().__init__()
        self.net, self.codec = net, codec
        self.optim, self.weights = optim or OptimConfig(), weights or LossWeights()
        self.id_encoder = id_encoder.eval().requires_grad_(False)
        self.codec.requires_grad_(False)
        self.register_buffer("text", text["prompt"], persistent=False)
        self.register_buffer("empty_text", text["empty"], persistent=False)
        self.mix: Counter = Counter()
        self.shortfall = 0
        self.samples = 0
        self._t0 = None
        self.history: list[dict] = []
        # Checkpoints hold the trainable weights only (the frozen backbone is rebuilt from its config
        # or local weights), so loading is not strict about the frozen keys.
        self.strict_loading = False

    @classmethod
    def from_config(
        cls, net: IConFace, codec: LatentCodec, id_encoder: IRBackbone, text: dict, cfg
    ) -> IConFaceModule:
        """The module for a `train` config: its optimiser settings, parameterisation and loss weights
        (α_fm and ω_min stay at the supplement's values)."""
        optim = OptimConfig(
            cfg.lr, cfg.weight_decay, cfg.sigma_scheme, cfg.seed, cfg.sigma_max, cfg.prediction
        )
        return cls(
            net, codec, id_encoder, text, optim, LossWeights(lambda_id=cfg.lambda_id, lambda_h=cfg.lambda_h)
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"net.{n}" for n, p in self.net.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    # ---- helpers ----------------------------------------------------------------------------------
    def identity(self, images: torch.Tensor) -> torch.Tensor:
        """Raw identity embedding of images in [-1, 1] with the frozen encoder (differentiable in the input)."""
        x = preprocess((images.clamp(-1, 1) + 1) / 2, self.id_encoder.cfg.input_size)
        e, n = self.id_encoder(x)
        return e * n

    def conditioning(self, batch: dict) -> Conditioning:
        b = batch["lq"].shape[0]
        deg = self.codec.encode(batch["lq"])
        r = batch["refs"].shape[1]
        refs = (
            self.codec.encode(batch["refs"].flatten(0, 1)).unflatten(0, (b, r))
            if r
            else deg.new_zeros(b, 0, *deg.shape[1:])
        )
        with torch.no_grad():
            z_deg = self.identity(batch["lq"])
        return Conditioning(deg, refs, batch["ref_mask"], batch["z_refs"], z_deg, self.text.expand(b, -1, -1))

    def predict(
        self, z: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(û, ẑ0) under the configured parameterisation; û is what the sampler integrates."""
        out = self.net(z, sigma, cond)
        s = sigma.view(-1, *([1] * (z.ndim - 1)))
        if self.optim.prediction == "x0_residual":
            x0 = cond.deg + out
            return (z - x0) / s.clamp_min(1e-4), x0
        return out, z - s * out

    # ---- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        b = batch["gt"].shape[0]
        with torch.no_grad():
            z0 = self.codec.encode(batch["gt"])
        cond = self.conditioning(batch)
        g = torch.Generator().manual_seed(self.optim.seed * 1_000_003 + self.global_step * 97 + batch_idx)
        sigma = sample_sigma(b, self.optim.sigma_scheme, g).to(z0) * self.optim.sigma_max
        noise = torch.randn(z0.shape, generator=g).to(z0)
        z_sigma = add_noise(z0, noise, sigma)
        u_hat, x0_hat = self.predict(z_sigma, sigma, cond)
        has_ref = batch["ref_mask"].any(1)
        e_out = e_ref = e_gt = None
        if bool(has_ref.any()) and self.weights.lambda_id > 0:
            img = self.codec.decode(x0_hat)  # decode ẑ0
            e_out = F.normalize(self.identity(img), dim=-1)
            e_ref = identity_anchor(batch["z_refs"], batch["ref_mask"], cond.z_deg)
            e_gt = F.normalize(batch["z_gt"], dim=-1)
        target = velocity_target(z0, noise)
        if self.optim.prediction == "x0_residual":  # L_fm in ẑ0 space: σ·(û − u*) = z0 − ẑ0
            s = sigma.view(-1, *([1] * (z0.ndim - 1)))
            u_hat, target = s * u_hat, s * target
        terms = iconface_loss(u_hat, target, sigma, e_out, e_ref, e_gt, has_ref, self.weights)
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
        return torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)

    # ---- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self, batch: dict, steps: int = 12, guidance: float = 4.0, seed: int = 42) -> torch.Tensor:
        """Restored images (B, 3, H, W) in [-1, 1] for a collated batch (0–3 references per sample)."""
        self.net.eval()
        cond = self.conditioning(batch)
        z = sample(
            lambda z_, s_, c_: self.predict(z_, s_, c_)[0],
            cond,
            self.empty_text,
            tuple(cond.deg.shape),
            steps=steps,
            guidance=guidance,
            seed=seed,
            sigma_max=self.optim.sigma_max,
        )
        self.net.train()
        return self.codec.decode(z).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) of images in [-1, 1], on the 0–255 scale after rounding to 8 bits."""
    a8 = ((a.clamp(-1, 1) + 1) * 127.5).round()
    b8 = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((a8 - b8) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


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
    net = IConFace(
        tr,
        IConFaceConfig(
            variant=cfg.variant,
            id_dim=z_dim,
            memory_tokens=cfg.memory_tokens,
            max_refs=cfg.max_refs,
            temperature=cfg.temperature,
            # A random backbone cannot fetch the degraded evidence for noise-only scene tokens in a CPU
            # budget (models.iconface, "Degraded readout"); a pretrained one keeps the paper's head.
            deg_readout=cfg.weights is None and cfg.prediction == "x0_residual",
        ),
    )
    text = (
        load_prompt_cache(cfg.prompt_cache)
        if cfg.prompt_cache
        else synthetic_prompt(8, tr.config.joint_attention_dim, seed=0)
    )
    return net, codec, text


def validation_batch(shards: str, cfg, max_refs: int) -> dict:
    """The first `val_samples` val targets, degraded once with `val_preset` (seed 42 + index), with
    their first protocol references (up to max_refs)."""
    samples = []
    for i, s in enumerate(iter_samples(shards, "val")):
        if i >= cfg.val_samples:
            break
        lq, _ = get_preset(cfg.val_preset)(s["gt"], np.random.default_rng(42 + i))
        samples.append((s, lq))
    if not samples:
        raise ValueError(f"{shards} has no val samples to validate on")
    b = len(samples)
    h, w = samples[0][0]["gt"].shape[:2]
    r = max_refs
    refs = np.zeros((b, r, h, w, 3), np.uint8)
    mask = np.zeros((b, r), bool)
    z_refs = np.zeros((b, r, samples[0][0]["gt_emb"].shape[-1]), np.float32)
    for i, (s, _) in enumerate(samples):
        for j in range(min(r, len(s["refs"]))):
            refs[i, j], z_refs[i, j], mask[i, j] = s["refs"][j], s["ref_emb"][j], True
    return {
        "keys": [s["key"] for s, _ in samples],
        "lq": to_unit(np.stack([lq for _, lq in samples])),
        "gt": to_unit(np.stack([s["gt"] for s, _ in samples])),
        "refs": to_unit(refs.reshape(b * r, h, w, 3)).reshape(b, r, 3, h, w),
        "ref_mask": torch.from_numpy(mask),
        "z_refs": torch.from_numpy(z_refs),
        "z_gt": torch.from_numpy(np.stack([s["gt_emb"] for s, _ in samples]).astype(np.float32)),
    }


def no_refs(batch: dict) -> dict:
    b, _, c, h, w = batch["refs"].shape
    return {
        **batch,
        "refs": torch.zeros(b, 0, c, h, w),
        "ref_mask": torch.zeros(b, 0, dtype=torch.bool),
        "z_refs": torch.zeros(b, 0, batch["z_refs"].shape[-1]),
    }


@torch.no_grad()
def evaluate(
    module: IConFaceModule, batch: dict, evaluator, steps: int, guidance: float = 4.0
) -> tuple[dict, dict]:
    """PSNR and identity similarity (evaluator encoder, cosine to the target) of the degraded input and of
    the restoration with references and without."""

    def idsim(x: torch.Tensor) -> torch.Tensor:
        from models.id_encoder import preprocess

        e = evaluator(preprocess((x + 1) / 2, evaluator.cfg.input_size))[0]
        g = evaluator(preprocess((batch["gt"] + 1) / 2, evaluator.cfg.input_size))[0]
        return (e * g).sum(-1)

    out_ref = module.restore(batch, steps=steps, guidance=guidance)
    out_none = module.restore(no_refs(batch), steps=steps, guidance=guidance)
    m = {
        "lq_psnr": psnr(batch["lq"], batch["gt"]).mean().item(),
        "restored_psnr": psnr(out_ref, batch["gt"]).mean().item(),
        "restored_noref_psnr": psnr(out_none, batch["gt"]).mean().item(),
        "lq_id_sim": idsim(batch["lq"]).mean().item(),
        "restored_id_sim": idsim(out_ref).mean().item(),
        "restored_noref_id_sim": idsim(out_none).mean().item(),
    }
    return {k: round(v, 4) for k, v in m.items()}, {"ref": out_ref, "none": out_none}
