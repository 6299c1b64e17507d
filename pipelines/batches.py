"""Training batches: the one `Batch` structure, and the Ray degradation stream as a Lightning data module.

* `make_batch` pads each sample's references (0–3) into one tensor batch with a reference mask; `to_unit`
  and `to_uint8` convert images between uint8 (H, W, 3) and [-1, 1] (B, 3, H, W).
* `collate` applies the reference-count schedule to a stream batch (pipelines.refschedule).
* `StreamIterable` / `StreamDataModule` wrap `DegradationStream` as an iterable, step-based dataset: epoch
  after epoch, and on resume they skip exactly the batches already consumed (global_step × accumulate),
  so nothing is repeated. Each rank reads its own share of chunks (`epoch_order` gives every rank the same
  count: no uneven-shard hang). `num_workers=0`: a forked DataLoader worker that calls Ray hangs; the
  parallelism is in the Ray tasks.
"""

from __future__ import annotations

import time
from typing import TypedDict

import lightning as L
import numpy as np
import torch

from pipelines.refschedule import draw_refs
from pipelines.refstar import degrade_reference
from pipelines.stream import DegradationStream


def to_unit(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


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
                        + "; train.refstar.reference_masks needs a mask (refmask<i>.png) on every reference"
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
        # RefSTAR: masks and the cycle's degraded reference when the module trains with them
        rs = getattr(self.trainer.lightning_module, "refstar", None) if self.trainer else None
        masks = bool(rs and rs.masks)
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
            masks=masks,  # without RefSTAR's masks they stay undecoded
        )
        self.dataset = StreamIterable(
            stream,
            self.schedule,
            self.max_refs,
            self.seed,
            masks=masks,
            ref_preset=self.preset if rs and rs.cycle else None,
        )

    def train_dataloader(self):
        if self.trainer is not None:
            self.dataset.start_batches = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=0)
