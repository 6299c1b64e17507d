"""A trained IConFace as a self-contained restorer: the bundle format and batch restoration.

A bundle is a folder that rebuilds the network from the trainable weights and the configured backbone:

    bundle.json      format, resolution, sampler settings (steps, guidance, seed; optionally seed 002's
                     guidance_image, guidance_context, ref_ensemble), encoder kind and its crop, and
                     optionally the reference gate (pipelines.reference_gate)
    train.json       the `train` params section the weights were trained with
    model/           trainable weights (LoRA in diffusers' format, pathways, backbone when trained), safetensors
    encoder.safetensors   the primary identity encoder (embeds the references and the degraded input)
    prompt.safetensors    the cached prompt embedding (klein) when train.prompt_cache is set
    refsel.safetensors    the RefSel mask model, when given (RefSTAR: a model trained with masks)

The frozen klein backbone and the VAE are NOT copied (several GB): `train.json` keeps their local paths.
Used by the evaluate stage, the MLflow pyfunc model and `refface restore`.

Restoring fast. The restorer folds the LoRA into the base weights once at load
(`models.lora.merge_lora`: no adapter runs per call), and on a GPU it stores the weights in bf16 once
(`precision`, autocast for the rest) and compiles every transformer block with `torch.compile`
(`compile`): the compile is paid once per process and shape (one per reference count), never per
image. On the CPU the defaults keep float32 and eager mode, so a merged restorer gives today's
outputs to float32 rounding (tests/test_precision.py); bf16 matches within bf16 tolerance.

Conflict masks (RefSTAR, pipelines.refstar): `restore_batch(..., ref_masks=)` takes `"predict"` (the
RefSel U-Net predicts each reference's mask from the degraded input and the reference: no annotation
needed), `"none"`, or the masks themselves (contract PNG values 0/1/255 in the reference's grid); the
default is `"predict"` for a model trained with masks (`train.refstar.reference_masks` not `none`), else
`"none"`. The RefSel model comes from the bundle's `refsel.safetensors`, else the `refsel` argument,
else data/refsel/model.safetensors. `last_masks` records which masks the last call used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.lora import load_trainable, merge_lora
from pipelines.batches import make_batch, to_uint8
from pipelines.config import TrainConfig, as_dict, build, with_overrides
from pipelines.embedding import load_identity_encoder
from pipelines.faces import is_grey, to_grey
from pipelines.module import IConFaceModule, cast_frozen
from pipelines.network import build_network
from pipelines.reference_gate import ReferenceGate

BUNDLE_FORMAT = 1
MIN_SIDE = 32
ENSEMBLE_MAX_REFS = 3  # eq. 6 of seed 002 runs one reference per forward: any model takes up to 3
DEFAULT_REFSEL = "data/refsel/model.safetensors"  # the refsel stage's model


# The keys a bundle's train.json held at its top level before `train` had its sections (ray, composite,
# refstar): {old key: (section, key)}. Bundles written since hold the sections.
_FLAT_TRAIN_KEYS: dict[str, tuple[str, str]] = {
    **{f"ray_{k}": ("ray", k) for k in "workers cpus_per_worker degrade max_failures storage".split()},
    **{
        k: ("composite", k)
        for k in "general_encoder general_encoder_weights context_dropout image_dropout id_loss hei_lambda".split()
    },
    **{
        k: ("refstar", k)
        for k in (
            "reference_masks mask_token_keep reference_route decoupled_scale decoupled_rank cycle_loss lambda_gt "
            "lambda_cycle cycle_lambda_l1 cycle_lambda_id cycle_lambda_perc cycle_lpips cycle_lpips_heads cycle_sigma"
        ).split()
    },
}


def nest_flat_train_keys(train: dict) -> dict:
    """A bundle's train.json in today's shape: the flat keys of a bundle written before the sections
    (`ray_workers`, `reference_masks`, ...) moved into `ray`, `composite` and `refstar` (a champion in a
    registry may be such a bundle). A bundle written since comes back unchanged."""
    out = {k: v for k, v in train.items() if k not in _FLAT_TRAIN_KEYS}
    for old, (section, key) in _FLAT_TRAIN_KEYS.items():
        if old in train:
            out[section] = {**out.get(section, {}), key: train[old]}
    return out


class InputError(ValueError):
    """Bad input to the restorer; the message names the image and what is wrong."""


def write_bundle(
    out: str | Path,
    cfg: TrainConfig,
    trainable_dir: str | Path,
    encoder_kind: str,
    encoder_path: str | Path,
    resolution: int,
    steps: int = 12,
    guidance: float = 1.0,
    seed: int = 42,
    crop_border: float = 0.0,
    guidance_image: float | None = None,
    guidance_context: float | None = None,
    ref_ensemble: bool = False,
    refsel_model: str | Path | None = None,
) -> Path:
    """The bundle folder (module docstring). Seed 002's sampler settings are written only when set, so a
    bundle without them is byte-identical to one written before they existed."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    for f in sorted(Path(trainable_dir).glob("*.safetensors")):
        shutil.copyfile(f, out / "model" / f.name)
    shutil.copyfile(encoder_path, out / "encoder.safetensors")
    if refsel_model is not None:  # RefSTAR: the mask model travels with a model trained with masks
        shutil.copyfile(refsel_model, out / "refsel.safetensors")
    train = as_dict(cfg)
    if cfg.prompt_cache:
        shutil.copyfile(cfg.prompt_cache, out / "prompt.safetensors")
        train["prompt_cache"] = "prompt.safetensors"
    (out / "train.json").write_text(json.dumps(train, indent=2, sort_keys=True))
    meta = {
        "format": BUNDLE_FORMAT,
        "resolution": resolution,
        "max_refs": cfg.max_refs,
        "encoder": encoder_kind,
        "crop_border": crop_border,
        "sampler": {"steps": steps, "guidance": guidance, "seed": seed},
    }
    for key, value in (
        ("guidance_image", guidance_image),
        ("guidance_context", guidance_context),
        ("ref_ensemble", ref_ensemble or None),
    ):
        if value is not None:
            meta["sampler"][key] = value
    (out / "bundle.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def check_image(img, name: str) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a path or an array, or an InputError naming `name`.

    Paths are read by `pipelines.images.load_rgb`, the loader ingest uses (EXIF orientation applied,
    alpha composited over white, grayscale and palette converted), so the CLI, the pyfunc model and the
    data pipeline see the same pixels. A grayscale photo is replicated to three channels (restored,
    then returned grey by `Restorer.restore` unless colour is asked for)."""
    from pipelines.images import ImageProblem, load_rgb

    if isinstance(img, str | Path):
        path = Path(img)
        if not path.is_file():
            raise InputError(f"{name}: {path} does not exist")
        try:
            img, _ = load_rgb(path)
        except ImageProblem as exc:
            raise InputError(f"{name}: not a readable image ({exc})") from exc
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2 and arr.dtype == np.uint8:
        arr = np.repeat(arr[..., None], 3, axis=2)  # grayscale: the same luma in R, G and B
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"{name}: expected an RGB image (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise InputError(
            f"{name}: {arr.shape[1]}x{arr.shape[0]} is too small (at least {MIN_SIDE} px a side)"
        )
    return arr


class Restorer:
    """Restores degraded faces with 0–max_refs references; images in and out are uint8 RGB."""

    def __init__(
        self,
        bundle: str | Path,
        threads: int | None = None,
        device: str = "auto",
        merge: bool = True,
        precision: str = "auto",
        compile: str | bool = "auto",
        refsel: str | Path | None = None,
    ):
        """`device` auto: CUDA when present. `merge`: fold the LoRA into the base weights.
        `precision` auto: bf16 weights on CUDA, float32 on the CPU ("float32" | "bf16" to force).
        `compile` auto: `torch.compile` the transformer blocks on CUDA only. `refsel`: the RefSel model
        for predicted conflict masks when the bundle has none (module docstring)."""
        bundle = self.bundle = Path(bundle)
        meta_file = bundle / "bundle.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{bundle} is not a refface model bundle (no bundle.json)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{bundle}: bundle format {self.meta.get('format')} is not {BUNDLE_FORMAT}")
        train = nest_flat_train_keys(json.loads((bundle / "train.json").read_text()))
        if train.get("prompt_cache") and not Path(train["prompt_cache"]).is_absolute():
            train["prompt_cache"] = str(bundle / train["prompt_cache"])
        train.setdefault("reference_readout", "off")  # bundles written before it existed have none
        train.setdefault("degradation_embed", False)  # nor this
        self.cfg = build(TrainConfig, train, "train")
        if threads:
            torch.set_num_threads(threads)
        self.encoder, _, _ = load_identity_encoder(self.meta["encoder"], str(bundle / "encoder.safetensors"))
        net, codec, text = build_network(
            # the front end's and the general encoder's weights come with the pathway weights (model/),
            # not from train.front / train.composite.general_encoder_weights
            with_overrides(
                self.cfg, {"train_backbone": False, "front": None, "composite.general_encoder_weights": None}
            ),
            self.encoder.cfg.embedding_dim,
        )
        load_trainable(net, bundle / "model")
        self.crop_border = float(self.meta.get("crop_border", 0.0))
        self.module = IConFaceModule.from_config(
            net, codec, self.encoder, text, self.cfg, self.crop_border
        ).eval()
        self.speed = self._accelerate(device, merge, precision, compile)
        self.resolution = int(self.meta["resolution"])
        self.max_refs = int(self.meta["max_refs"])
        # RefSTAR: where the RefSel model comes from, and the masks of the last call
        own = bundle / "refsel.safetensors"
        self.refsel_path = own if own.is_file() else Path(refsel) if refsel else Path(DEFAULT_REFSEL)
        self._refsel = None
        self.masks_default = "none" if self.cfg.refstar.reference_masks == "none" else "predict"
        g = self.meta.get("reference_gate")  # pipelines.reference_gate; absent = references at full weight
        self.gate = ReferenceGate.from_dict(g) if g else None
        self.last_masks: dict = {"source": "none"}

    def refsel_model(self):
        """(RefSel U-Net, its version) loaded once from `refsel_path`; a missing file is an InputError."""
        if self._refsel is None:
            from pipelines.refsel import load_model, model_version

            if not self.refsel_path.is_file():
                raise InputError(
                    f"predicting conflict masks needs a RefSel model: {self.refsel_path} does not exist "
                    "(run `dvc repro refsel`, pass --refsel-model, or --ref-masks none)"
                )
            self._refsel = (load_model(self.refsel_path), model_version(self.refsel_path))
        return self._refsel

    def _masks(self, lq: list[np.ndarray], refs: list[list[np.ndarray]], ref_masks) -> list | None:
        """The masks for make_batch by `ref_masks` (see the module docstring); sets `last_masks`."""
        mode = self.masks_default if ref_masks is None else ref_masks
        if not any(refs):
            self.last_masks = {"source": "none"}
            return None
        if isinstance(mode, str):
            if mode == "none":
                self.last_masks = {"source": "none"}
                return None
            if mode != "predict":
                raise InputError(f"ref_masks {mode!r}: valid: none, predict, or one mask per reference")
            from pipelines.refstar import predict_masks

            model, version = self.refsel_model()
            self.last_masks = {"source": "predicted", "model": version}
            return predict_masks(model, lq, refs)
        if len(mode) != len(refs) or any(len(m) != len(r) for m, r in zip(mode, refs)):
            raise InputError("ref_masks: give one mask per reference of every image")
        out = []
        for i, ms in enumerate(mode):
            row = []
            for j, m in enumerate(ms):
                m = np.asarray(m)
                if m.ndim != 2 or m.dtype != np.uint8 or not np.isin(m, (0, 1, 255)).all():
                    raise InputError(
                        f"mask of reference {j + 1} (image {i}): expected a single-channel uint8 mask with "
                        f"values 0 (consistent), 1 (conflict), 255 (ignore); got {m.shape} {m.dtype}"
                    )
                if m.shape != (self.resolution, self.resolution):
                    m = np.asarray(
                        Image.fromarray(m).resize(
                            (self.resolution, self.resolution), Image.Resampling.NEAREST
                        )
                    )
                row.append(m)
            out.append(row)
        self.last_masks = {"source": "given"}
        return out

    def _accelerate(self, device: str, merge: bool, precision: str, compile: str | bool) -> dict:
        """Merge, move, cast and compile once (see the module docstring); returns what was done."""
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"device {device!r}: expected auto, cpu or cuda[:N]")
        if precision not in ("auto", "float32", "bf16"):
            raise ValueError(f"precision {precision!r}: expected auto, float32 or bf16")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        net = self.module.net
        merged = merge_lora(net.transformer) if merge else 0
        self.module.to(dev)
        bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
        if bf16:
            net.requires_grad_(False)  # inference: every weight is frozen here
            cast_frozen([net, self.module.codec, self.module.id_encoder], torch.bfloat16)
            self.module._low = None  # re-read by IConFaceModule.autocast
        compiled = compile is True or (compile == "auto" and dev.type == "cuda")
        if compiled:
            net.transformer.disable_gradient_checkpointing()  # inference: nothing to recompute
            net.compile_blocks()
        return {"device": str(dev), "lora_merged": merged, "bf16": bf16, "compiled": compiled}

    def _fit(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] == (self.resolution, self.resolution):
            return img
        return np.asarray(
            Image.fromarray(img).resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        )

    @torch.no_grad()
    def restore_batch(
        self,
        lq: list[np.ndarray],
        refs: list[list[np.ndarray]],
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        guidance_image: float | None = None,
        guidance_context: float | None = None,
        ref_ensemble: bool | None = None,
        ref_masks=None,
        gate: bool | None = None,
    ) -> np.ndarray:
        """(B, R, R, 3) uint8 restorations at the model's resolution R; refs[i] holds 0–max_refs images.

        guidance_image (s_i), guidance_context (s_c), ref_ensemble: seed 002's eq. 5 and eq. 6
        (models.guidance); None takes the bundle's setting. With any of them on, the prompt guidance is
        1 unless `guidance` is given (then the sampler refuses the pair). With ref_ensemble each reference
        goes through its own forward, so up to 3 are accepted whatever the model was trained with.
        `ref_masks` (RefSTAR): "predict", "none", masks per reference, or None for the model's default.
        `gate`: weigh the reference readout by the bundle's reference gate (None: when the bundle has one;
        False: full weight, as calibration needs); an image whose gate is shut (α = 0) is restored without
        its references, as in the blind mode (pipelines.reference_gate)."""
        s = self.meta["sampler"]
        sampler = {
            "guidance_image": s.get("guidance_image") if guidance_image is None else guidance_image,
            "guidance_context": s.get("guidance_context") if guidance_context is None else guidance_context,
            "ref_ensemble": bool(s.get("ref_ensemble", False) if ref_ensemble is None else ref_ensemble),
        }
        dual = sampler["guidance_image"] is not None or sampler["guidance_context"] is not None
        dual = dual or sampler["ref_ensemble"]
        if len(lq) != len(refs):
            raise InputError(f"{len(lq)} degraded images but {len(refs)} reference lists")
        limit = self.ref_limit(sampler["ref_ensemble"])
        for i, r in enumerate(refs):
            if len(r) > limit:
                hint = "" if sampler["ref_ensemble"] else " (ref_ensemble takes up to 3, one per forward)"
                raise InputError(f"image {i}: {len(r)} references; the model accepts at most {limit}{hint}")
        lq_f, refs_f = [self._fit(x) for x in lq], [[self._fit(r) for r in rs] for rs in refs]
        alpha = self.gate.alpha(lq_f) if self.gate is not None and gate is not False else None
        if alpha is not None:
            # A shut gate (α = 0) leaves the image's references out altogether: it is restored blind.
            refs_f = [[] if a == 0.0 else rs for a, rs in zip(alpha, refs_f)]
            if ref_masks is not None and not isinstance(ref_masks, str):
                ref_masks = [[] if a == 0.0 else ms for a, ms in zip(alpha, ref_masks)]
        batch = make_batch(lq_f, refs_f, ref_masks=self._masks(lq_f, refs_f, ref_masks))
        if alpha is not None:
            batch["ref_scale"] = torch.from_numpy(alpha)
        if batch["refs"].shape[1]:
            # The references are embedded as the shard embeddings were (the module applies the crop).
            refs = batch["refs"].flatten(0, 1).to(self.module.device)
            batch["z_refs"] = self.module.identity(refs).cpu().unflatten(0, batch["refs"].shape[:2])
        else:
            batch["z_refs"] = torch.zeros(len(lq), 0, self.encoder.cfg.embedding_dim)
        if guidance is None:
            guidance = 1.0 if dual else s["guidance"]  # eqs. 5-6 replace the prompt guidance
        out = self.module.restore(
            batch,
            steps=steps or s["steps"],
            guidance=guidance,
            seed=s["seed"] if seed is None else seed,
            **sampler,
        )
        return to_uint8(out)

    def restore_in_batches(
        self,
        lq: list[np.ndarray],
        refs: list[list[np.ndarray]],
        batch_size: int,
        gate: bool | None = None,
        steps: int | None = None,
        blind: np.ndarray | None = None,
    ) -> np.ndarray:
        """`restore_batch` over chunks of `batch_size` images (the same outputs: every image is sampled
        with its own noise), concatenated; what evaluation and the gate's calibration restore with.

        `blind`: this call's images already restored without references (by this method, with the same
        `batch_size` and `steps`). A chunk whose every image has its gate shut is then taken from it:
        `restore_batch` would restore that chunk without references anyway, from the same batch (the
        same images, no references, the same α), so the bytes are the same."""
        shut = self.shut(lq) if blind is not None and gate is not False else None
        parts = []
        for i in range(0, len(lq), batch_size):
            if shut is not None and shut[i : i + batch_size].all():
                parts.append(blind[i : i + batch_size])
            else:
                parts.append(
                    self.restore_batch(
                        lq[i : i + batch_size], refs[i : i + batch_size], gate=gate, steps=steps
                    )
                )
        return np.concatenate(parts)

    def shut(self, lq: list[np.ndarray]) -> np.ndarray:
        """(B,) bool: the images whose reference gate is shut (α = 0), restored blind whatever their
        references; none without a gate."""
        if self.gate is None:
            return np.zeros(len(lq), bool)
        return self.gate.alpha([self._fit(x) for x in lq]) == 0.0

    def ref_limit(self, ensemble: bool) -> int:
        """How many references one image may have: the trained max_refs, or 3 with the eq. 6 ensemble."""
        return max(self.max_refs, ENSEMBLE_MAX_REFS) if ensemble else self.max_refs

    @torch.no_grad()
    def front_only(self, lq: list[np.ndarray]) -> np.ndarray | None:
        """(B, R, R, 3) uint8: the front end's output alone (models.iconface.FrontEnd), or None when
        the model has none; evaluation reports it as its own row."""
        if getattr(self.module.net, "front", None) is None:
            return None
        batch = make_batch([self._fit(x) for x in lq], [[] for _ in lq])
        with self.module.autocast():
            out = self.module.clean(batch["lq"].to(self.module.device))
        return to_uint8(out.float())

    def restore(self, lq, refs=(), colour: bool = False, **kw) -> np.ndarray:
        """One image: `lq` and `refs` as paths or uint8 arrays; returns (R, R, 3) uint8. A grayscale
        input comes back grey (the luma of the restoration) unless `colour`."""
        refs = list(refs)
        limit = self.ref_limit(bool(kw.get("ref_ensemble") or self.meta["sampler"].get("ref_ensemble")))
        if len(refs) > limit:
            raise InputError(f"{len(refs)} references given; the model accepts at most {limit}")
        a = check_image(lq, "degraded image")
        rs = [check_image(r, f"reference {i + 1}") for i, r in enumerate(refs)]
        if kw.get("ref_masks") is not None and not isinstance(kw["ref_masks"], str):
            kw["ref_masks"] = [list(kw["ref_masks"])]  # one mask per reference of this one image
        out = self.restore_batch([a], [rs], **kw)[0]
        return out if colour or not is_grey(a) else to_grey(out)
