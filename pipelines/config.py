"""Typed configuration: every params.yaml section is mirrored by a frozen dataclass.

`build(cls, mapping, where)` turns a plain mapping (one params.yaml section) into `cls`, and fails
with a `ConfigError` that names the section, the offending key and the valid keys when a key is
unknown, missing or of the wrong type. Only `stages/` reads params.yaml; the library receives these
objects.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

# The names a params.yaml may use. The registries behind them (models.iconface.BACKBONES and VARIANTS,
# pipelines.degradations.PRESETS, pipelines.quality.WEIGHT_FILES) are checked to hold exactly
# these names (tests/test_config.py); keeping them here keeps this module free of project imports, so
# that a change to the model does not rerun the stages that only read their params.
BACKBONE_NAMES = ("tiny", "small", "klein_base_4b")
VARIANT_NAMES = ("concat", "+struct", "+id", "single_route", "full")
# ablate rows of RefSTAR's transfer (pipelines.refstar.ABLATE_ROWS), besides the IConFace variants
REFSTAR_ROW_NAMES = ("refstar_in_context", "refstar_decoupled", "refstar_decoupled_cycle")
# ablate rows of seed 002 (pipelines.ablation.SEED002_ROWS): Composite Context, and the same model sampled with
# the training-free multi-reference ensemble (its eq. 6)
SEED002_ROW_NAMES = ("composite", "composite_ensemble")
PRESET_NAMES = (
    "realesrgan",
    "bsrgan",
    "face_classic",
    "refldm_train",
    "refldm_moderate",
    "refldm_severe",
    "iconface_mixed",
)
WEIGHT_METRICS = (
    "lpips",
    "lpips_vgg",
    "lpips_heads",
    "dists",
    "dists_weights",
    "fid",
    "fid_stats",
    "clipiqa",
    "musiq",
    "maniqa",
)


class ConfigError(ValueError):
    """A params.yaml section does not match its dataclass."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items ({_type_name(tp)}), got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping ({_type_name(tp)}), got {value!r}")
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # a programming error


def build(cls: type, mapping: dict[str, Any] | None, where: str | None = None) -> Any:
    """Build the frozen dataclass `cls` from `mapping`, strictly.

    Unknown keys, missing keys without a default and values of the wrong type raise `ConfigError`
    naming `where` (the params.yaml path, e.g. ``pairs``) and the valid keys.
    """
    where = where or cls.__name__
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {mapping!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = ", ".join(sorted(fields))
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {valid}")
    kwargs = {}
    for name, f in fields.items():
        if name in mapping:
            kwargs[name] = _coerce(mapping[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing key {name!r}; valid keys: {valid}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def as_dict(obj: Any) -> dict[str, Any]:
    """The dataclass as plain, JSON-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

SourceKind = Literal["synthetic", "ffhq_ref", "celebref_hq", "folder_by_identity", "unlabelled_folder"]


@dataclass(frozen=True)
class SynthesizeConfig:
    """`synthesize`: the procedural identity-face source (the embedded default)."""

    seed: int = 7
    render_size: int = 128  # rendered at this size, then area-downsampled to image_size
    image_size: int = 64
    album_identities: int = 200  # the dataset pool, ingested like any album
    album_images_per_identity: tuple[int, int] = (2, 8)  # inclusive range
    album_singleton_fraction: float = 0.03  # identities with a single image (they have no reference)
    encoder_identities: int = 300  # a disjoint pool that trains the identity encoders
    encoder_images_per_identity: int = 8
    grid_identities: int = 8
    grid_images: int = 6
    # aligned: FFHQ-aligned crops as the datasets of the field (pipelines.synthetic.FRAMINGS); wild:
    # unaligned framing (roll ±0.22 rad, scale 0.85-1.08, shift ±7 %)
    framing: Literal["aligned", "wild"] = "aligned"
    # fine: people share skin, hair and face shape, and differ in the traits severe degradation destroys
    # (moles, freckles, scar, brows, iris: pipelines.synthetic.IDENTITY_CUES); mixed: the original draws
    identity_cues: Literal["fine", "mixed"] = "fine"

    def validate(self, where: str) -> None:
        if self.render_size < 32 or self.image_size < 16 or self.image_size > self.render_size:
            raise ConfigError(f"{where}: need render_size >= 32 and 16 <= image_size <= render_size")
        lo, hi = self.album_images_per_identity
        if not 1 <= lo <= hi:
            raise ConfigError(f"{where}.album_images_per_identity: need 1 <= min <= max, got {lo, hi}")
        if not 0.0 <= self.album_singleton_fraction < 1.0:
            raise ConfigError(f"{where}.album_singleton_fraction must lie in [0, 1)")


@dataclass(frozen=True)
class SourceConfig:
    """`source`: where the images come from."""

    kind: SourceKind = "synthetic"
    root: str = "data/synthetic/album"
    images_dir: str = "images"  # ffhq_ref: folder of FFHQ images under root (already resized)
    resize_method: str = "lanczos"  # ffhq_ref: how the user resized images1024x1024, recorded
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
    # raw albums (folder_by_identity, unlabelled_folder): `ffhq` detects and aligns every photo
    # (pipelines.faces) to align_size before ingest's checks; `none` takes the images as aligned crops
    align: Literal["none", "ffhq"] = "none"
    align_size: int = 512
    landmarks: Literal[5, 68] = 5  # 5: CC0 model, eyes onto the FFHQ template; 68: the ffhq-dataset quad
    face_policy: Literal["one", "largest", "center"] = "one"  # several faces: quarantine, or pick one
    min_face: int = 64  # photo pixels across the detected face box; smaller faces are quarantined
    landmark_models: str | None = None  # folder of dlib's .dat files (default: face-recognition-models)

    def validate(self, where: str) -> None:
        if self.align == "ffhq" and self.kind not in ("folder_by_identity", "unlabelled_folder"):
            raise ConfigError(
                f"{where}.align: ffhq applies to raw albums (folder_by_identity, unlabelled_folder), not "
                f"{self.kind!r}, whose images are aligned already"
            )
        if self.align_size < 32:
            raise ConfigError(f"{where}.align_size must be at least 32 (got {self.align_size})")


@dataclass(frozen=True)
class IngestConfig:
    """`ingest`: validation rules for every source image."""

    min_size: int = 32
    alpha: Literal["composite", "quarantine"] = "composite"  # alpha over white, or reject


@dataclass(frozen=True)
class EncoderArch:
    """An IR-style backbone: `units` per stage and `widths` (stem, stage1..stage4)."""

    seed: int = 1
    units: tuple[int, int, int, int] = (1, 1, 2, 1)
    widths: tuple[int, int, int, int, int] = (16, 16, 32, 64, 128)
    stem_stride: int = 2  # the stem halves 64 px inputs: 4x less compute than AdaFace's stride 1


@dataclass(frozen=True)
class TrainIdEncoderConfig:
    """`train_id_encoder`: the small identity encoders of the embedded default (AdaFace loss)."""

    input_size: int = 64
    embedding_dim: int = 512
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    holdout_fraction: float = 0.2  # identities of the encoder pool held out for verification
    margin: float = 0.4  # AdaFace m
    h: float = 0.333  # AdaFace h (norm concentration)
    scale: float = 64.0  # AdaFace s
    t_alpha: float = 0.01  # EMA of the batch norm statistics
    threads: int = 2
    primary: EncoderArch = field(default_factory=lambda: EncoderArch(seed=1))
    evaluator: EncoderArch = field(
        default_factory=lambda: EncoderArch(seed=2, units=(1, 1, 2, 1), widths=(16, 24, 48, 96, 160))
    )

    def validate(self, where: str) -> None:
        for arch in (self.primary, self.evaluator):
            if self.input_size % (16 * arch.stem_stride):
                raise ConfigError(
                    f"{where}.input_size must be a multiple of 16·stem_stride, got {self.input_size}"
                )
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"{where}.holdout_fraction must lie in (0, 1)")


@dataclass(frozen=True)
class EmbedConfig:
    """`embed`: which identity encoder embeds every manifest image."""

    encoder: Literal["small_ir", "adaface_ir50"] = "small_ir"
    checkpoint: str = "data/encoders/primary.safetensors"
    batch_size: int = 128
    threads: int = 2
    crop_border: float = 0.0  # fraction cropped from each edge first (FFHQ-Ref protocol: 0.0625)
    # which vectors group photos into identities in `pairs`: the primary encoder's (cosine distance,
    # pairs.link_distance) or dlib's face ResNet on real photos (Euclidean, pairs.dlib_link_distance)
    grouping: Literal["primary", "dlib_resnet"] = "primary"
    face_models: str | None = None  # folder of dlib's .dat files (default: face-recognition-models)
    # the independent encoder that measures identity (GT-ID, Ref-ID): the trained evaluator
    # (data/encoders/evaluator.safetensors, ArcFace's role) or dlib's face ResNet for real photos
    evaluator: Literal["trained", "dlib_resnet"] = "trained"


@dataclass(frozen=True)
class PairsConfig:
    """`pairs`: the FFHQ-Ref protocol (identity graph, identity-disjoint splits, ordered references)."""

    seed: int = 42
    link_distance: float = 0.4  # cosine distance below which two images are the same person
    dlib_link_distance: float = 0.6  # embed.grouping dlib_resnet: Euclidean, its authors' threshold
    min_eval_ref_distance: float = 0.1  # val/test references at least this far from the target
    identity_from: Literal["auto", "label", "graph"] = "auto"  # auto: the label when a source has one
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    max_refs: int = 9  # references kept per target (FFHQ-Ref test lists hold 2-9)
    check_released: bool = True  # ffhq_ref: rebuild the mapping from embeddings and report agreement

    def validate(self, where: str) -> None:
        if set(self.split_fractions) != {"train", "val", "test"}:
            raise ConfigError(f"{where}.split_fractions needs exactly the keys train, val, test")
        if abs(sum(self.split_fractions.values()) - 1.0) > 1e-6:
            raise ConfigError(f"{where}.split_fractions must sum to 1, got {self.split_fractions}")
        if not 0.0 < self.link_distance < 2.0:
            raise ConfigError(f"{where}.link_distance must lie in (0, 2)")


@dataclass(frozen=True)
class ShardsConfig:
    """`shards`: webdataset shards per split."""

    resolution: int = 64
    resize_method: Literal["area", "lanczos", "bicubic"] = "area"
    max_refs: int = 8
    samples_per_shard: int = 128
    preview_samples: int = 4

    def validate(self, where: str) -> None:
        if self.max_refs < 1:
            raise ConfigError(f"{where}.max_refs must be at least 1")


@dataclass(frozen=True)
class DegradeConfig:
    """`degrade`: the online degradation stream that feeds training."""

    preset: str = "iconface_mixed"
    seed: int = 0
    batch_size: int = 8
    max_in_flight: int = 4  # outstanding Ray tasks (memory bound = max_in_flight x batch)
    num_cpus: int = 2  # local Ray only; with RAY_ADDRESS the cluster's resources are used
    shuffle: bool = True

    def validate(self, where: str) -> None:
        if self.preset not in PRESET_NAMES:
            raise ConfigError(
                f"{where}.preset: unknown preset {self.preset!r}; valid: {', '.join(PRESET_NAMES)}"
            )
        if self.batch_size < 1 or self.max_in_flight < 1 or self.num_cpus < 1:
            raise ConfigError(f"{where}: batch_size, max_in_flight and num_cpus must be at least 1")


@dataclass(frozen=True)
class EvalSetsConfig:
    """`eval_sets`: frozen degraded test sets (seed + index per sample)."""

    seed: int = 42
    sets: dict[str, str] = field(
        default_factory=lambda: {"moderate": "refldm_moderate", "severe": "refldm_severe"}
    )  # set name -> preset
    split: str = "test"
    samples_per_shard: int = 128
    grid_samples: int = 6

    def validate(self, where: str) -> None:
        for name, preset in self.sets.items():
            if preset not in PRESET_NAMES:
                raise ConfigError(
                    f"{where}.sets.{name}: unknown preset {preset!r}; valid: {', '.join(PRESET_NAMES)}"
                )
            if not name.replace("_", "").isalnum():
                raise ConfigError(f"{where}.sets: set name {name!r} must be letters, digits and _")


@dataclass(frozen=True)
class TrainFrontConfig:
    """`train_front`: the degradation-removal front end (ours; DiffBIR's stage 1), trained by L2 on the
    train split with the `degrade` section's online degradations (models.iconface.FrontEnd)."""

    width: int = 48
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100  # then a cosine decay to 0 at `steps`
    seed: int = 0
    threads: int = 2
    log_every: int = 50
    val_samples: int = 64  # val targets per preset, degraded once (seed 42 + index)
    val_presets: tuple[str, ...] = ("refldm_moderate", "refldm_severe")

    def validate(self, where: str) -> None:
        if self.width < 1 or self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}: width, steps and batch_size must be at least 1")
        for name in self.val_presets:
            if name not in PRESET_NAMES:
                raise ConfigError(
                    f"{where}.val_presets: unknown preset {name!r}; valid: {', '.join(PRESET_NAMES)}"
                )


@dataclass(frozen=True)
class TrainConfig:
    """`train`: IConFace training (tiny on CPU by default; klein_base_4b with weights on GPUs)."""

    backbone: str = "small"  # tiny (smoke tests) | small (CPU training) | klein_base_4b
    weights: str | None = None  # local diffusers transformer folder (klein); None = random init (tiny)
    vae: str | None = None  # local AutoencoderKLFlux2 folder; None = pixel codec (embedded default)
    prompt_cache: str | None = None  # safetensors {prompt, empty} from models.prompt; None = synthetic (tiny)
    pixel_patch: int = 8  # 64 px -> 8x8 tokens per image (the CPU budget); the FLUX.2 VAE gives 1/16
    variant: str = "full"
    lora_rank: int = 16
    train_backbone: bool = True  # random backbones have no prior to keep frozen (false for klein)
    memory_tokens: int = 64  # 256 in the recipe (64 px images have 256 tokens)
    temperature: float = 1.0  # T of the reference aggregation (eq. 4)
    lambda_id: float = 0.30  # supplement eq. 1
    lambda_h: float = 0.25
    max_refs: int = 3
    ref_schedule: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)
    # uniform = the supplement. shifted (ours): σ = s·u/(1 + (s − 1)·u), FLUX.2's time shift on training's
    # draws with s = sigma_shift; s < 1 trains more at low σ (models.losses.sample_sigma)
    sigma_scheme: Literal["uniform", "logit_normal", "shifted"] = "shifted"
    sigma_shift: float = 0.5
    # 1.0 = the recipe (generation from pure noise). Below 1: training draws σ ∈ (0, sigma_max) and
    # sampling starts from the degraded latent noised to sigma_max (a budget setting for CPU models).
    sigma_max: float = 1.0
    # ours: the degradation-removal front end (models.iconface.FrontEnd, DiffBIR's stage 1) of this
    # width, its weights from the train_front stage (frozen here); the transformer conditions on its
    # output. front_end 0 = off (the paper).
    front_end: int = 48
    front: str | None = "data/front/front.safetensors"
    # ours: the head also reads an aligned fusion of the references' final tokens (models.iconface,
    # "Reference readout"). auto: on where the degraded readout is (a random backbone with x0_residual);
    # off = the paper's head (klein)
    reference_readout: Literal["auto", "on", "off"] = "auto"
    # velocity = the recipe (û from the network). x0_residual: the network predicts the clean latent as
    # a residual over the degraded one, ẑ0 = z_deg + f(·), û = (z_σ − ẑ0)/σ, and L_fm is taken in ẑ0
    # space (= σ²·‖û − u*‖²): a from-scratch CPU model starts at the degraded image instead of at noise.
    prediction: Literal["velocity", "x0_residual"] = "x0_residual"  # velocity = the recipe (klein)
    lr: float = 5e-4  # the CPU model's; the recipe's 1e-5 is for klein
    # constant = the recipe (a fixed learning rate); cosine: linear warm-up over warmup_steps, then a
    # cosine decay to 0 at max_steps (ours, for the short CPU budget)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 50
    weight_decay: float = 0.0
    batch_size: int = 8  # global; split evenly across ranks (recipe: 1)
    accumulate: int = 1  # recipe: 4
    max_steps: int = 1000
    precision: Literal[
        "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64"
    ] = "32-true"  # bf16-mixed on GPUs
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "tpu", "auto"] = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed"] = (
        "auto"
    )
    # local: Lightning in this process (devices x num_nodes ranks, `strategy`). ray: Ray Train workers on the
    # Ray cluster (RAY_ADDRESS, else local Ray), one DDP rank each (pipelines/ray_fit.py).
    launcher: Literal["local", "ray"] = "local"
    ray_workers: int = 2  # ray: training processes (DDP ranks); one GPU each when accelerator is gpu
    ray_cpus_per_worker: int = 1  # ray: CPUs reserved per worker (and its torch threads)
    # ray: inline = each worker degrades its own share of the stream (safe on small clusters); tasks = it
    # submits Ray tasks (needs free CPUs beyond the workers', or they starve)
    ray_degrade: Literal["inline", "tasks"] = "inline"
    ray_max_failures: int = 2  # ray: restarts of the worker group from the last checkpoint after a failure
    # ray: where Ray Train keeps checkpoints, a path every node sees or a URI (s3://...); null: the
    # train stage's <out>/ckpt/ray, a temporary folder elsewhere (one machine only)
    ray_storage: str | None = None
    gradient_checkpointing: bool = False
    # Storage dtype of the frozen weights (transformer but LoRA, VAE, identity encoder). auto: bf16
    # under bf16-mixed (LoRA and pathways stay float32 with float32 AdamW state), float32 otherwise.
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # torch.compile every transformer block (GPUs; paid once per process and shape); with
    # gradient_checkpointing the checkpoint sits inside each compiled block (IConFace.compile_blocks)
    compile: bool = False
    # compile without checkpointing: the fraction of activation memory the compiled blocks keep (< 1:
    # selective recomputation of the cheapest ops, torch's activation memory budget); 1 = keep all
    compile_memory_budget: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 10
    checkpoint_every: int = 50
    grid_every: int = 200
    val_samples: int = 32
    val_steps: int = 12
    val_guidance: float = 1.0  # the embedded default's prompt is synthetic: guidance has nothing to amplify
    val_preset: str = "refldm_severe"
    experiment: str = "refface"
    # Seed 002 (Composite Context, arXiv:2505.21905) as a conditioning of the same model: `composite` gives the
    # references to the transformer as Composite Context tokens (models.composite) instead of IConFace's
    # in-context latents and identity modulation.
    conditioning: Literal["iconface", "composite"] = "iconface"
    # composite: φ_G, the general face encoder: `small` (ours: a 64 px CLIP tower trained jointly) or
    # `farl_vit_b16` (the paper: FaRL ViT-B/16, frozen, from general_encoder_weights, a local checkpoint)
    general_encoder: Literal["small", "farl_vit_b16"] = "small"
    general_encoder_weights: str | None = None
    # composite: CFG training drops (Sec. 4 of 002, 0.1 each, independently): the context's identity
    # token and its general tokens (key-masked) with context_dropout, the degraded input (zeroed) with
    # image_dropout
    context_dropout: float = 0.1
    image_dropout: float = 0.1
    # adaptive = IConFace's λ* (supplement eq. 1); hard_example = seed 002's eq. 3 with a fixed λ
    id_loss: Literal["adaptive", "hard_example"] = "adaptive"
    hei_lambda: float = 0.6  # λ of 002's eq. 3 (the reference's weight)
    # ---- RefSTAR's transfer with masks (RefSTAR, arXiv:2507.10470; models/refstar.py, pipelines/refstar.py) ----
    # The shards the train stage reads (dvc.yaml: `--shards ${train.shards}` and a dep on that folder):
    # data/shards, or data/refsel/shards for reference_masks: refsel.
    shards: str = "data/shards"
    # none = IConFace (masks unused); refsel = the refsel stage's masks (annotated / predicted), which
    # needs shards: data/refsel/shards; truth = the synthetic ground-truth masks of data/shards (ours: the
    # oracle). A reference token is kept when >= mask_token_keep of its pixels are consistent.
    reference_masks: Literal["none", "refsel", "truth"] = "none"
    mask_token_keep: float = 0.5
    # in_context = one joint attention (RefSTAR eq. 3; the IConFace paper); decoupled = eq. 4 in every
    # block with scale decoupled_scale (eq. 4: 1) and rank-decoupled_rank reference K/V adapters
    reference_route: Literal["in_context", "decoupled"] = "in_context"
    decoupled_scale: float = 1.0
    decoupled_rank: int = 16
    # Mask-Compatible Cycle-Consistency loss (eq. 5) in the total of eq. 7: λ_GT·L_GT + λ_cycle·L_cycle
    cycle_loss: bool = False
    lambda_gt: float = 1.0
    lambda_cycle: float = 1.5
    cycle_lambda_l1: float = 1.0
    cycle_lambda_id: float = 1.2
    # λ_perc: only with cycle_lpips (torchvision AlexNet weights); else the term is off
    cycle_lambda_perc: float = 0.8
    cycle_lpips: str | None = None  # alexnet-owt-7be5be79.pth
    cycle_lpips_heads: str | None = None  # LPIPS v0.1 alex.pth; default: the installed lpips package's
    # max (ours): the cycle restores from the sampler's start σ = sigma_max (no clean signal in its input,
    # like the paper's one-step restorer); train: at the step's drawn σ (its noisy input holds (1-σ)·I_Ref)
    cycle_sigma: Literal["max", "train"] = "max"

    def validate(self, where: str) -> None:
        self._validate_compile(where)
        if not 0 < self.mask_token_keep <= 1:
            raise ConfigError(f"{where}.mask_token_keep must lie in (0, 1] (got {self.mask_token_keep})")
        if not self.sigma_shift > 0:
            raise ConfigError(f"{where}.sigma_shift must be > 0 (got {self.sigma_shift})")
        if self.decoupled_rank < 0:
            raise ConfigError(f"{where}.decoupled_rank must be 0 or more (got {self.decoupled_rank})")
        if self.cycle_loss and self.max_refs < 1:
            raise ConfigError(f"{where}.cycle_loss needs references (max_refs >= 1)")
        if self.conditioning == "composite" and (
            self.reference_masks != "none" or self.reference_route != "in_context" or self.cycle_loss
        ):
            raise ConfigError(
                f"{where}: RefSTAR's transfer (reference_masks, reference_route: decoupled, cycle_loss) acts on "
                "the in-context reference tokens, which conditioning: composite replaces; use conditioning: iconface"
            )
        if self.cycle_lpips_heads and not self.cycle_lpips:
            raise ConfigError(f"{where}.cycle_lpips_heads is set but cycle_lpips (the backbone) is not")
        for name in ("cycle_lpips", "cycle_lpips_heads"):
            path = getattr(self, name)
            if path is not None:
                from pathlib import Path

                if not Path(path).exists():
                    raise ConfigError(f"{where}.{name}: {path} does not exist; give a local path or null")
        if self.backbone not in BACKBONE_NAMES:
            raise ConfigError(
                f"{where}.backbone: unknown backbone {self.backbone!r}; valid: {', '.join(BACKBONE_NAMES)}"
            )
        if self.variant not in VARIANT_NAMES:
            raise ConfigError(
                f"{where}.variant: unknown variant {self.variant!r}; valid: {', '.join(VARIANT_NAMES)}"
            )
        if not 0 < self.sigma_max <= 1:
            raise ConfigError(
                f"{where}.sigma_max must lie in (0, 1] (got {self.sigma_max}); 1.0 is the recipe"
            )
        if self.lora_rank < 1:
            raise ConfigError(
                f"{where}.lora_rank must be at least 1 (got {self.lora_rank}); the recipe uses 16"
            )
        if not 0 <= self.max_refs <= 3:
            raise ConfigError(
                f"{where}.max_refs: the model accepts 0-3 references, got {self.max_refs}; set it to 3 or less"
            )
        if len(self.ref_schedule) != self.max_refs + 1 or abs(sum(self.ref_schedule) - 1) > 1e-6:
            raise ConfigError(
                f"{where}.ref_schedule needs max_refs + 1 = {self.max_refs + 1} probabilities summing to 1"
            )
        if self.launcher == "ray":
            if self.devices != 1 or self.num_nodes != 1:
                raise ConfigError(
                    f"{where}: launcher ray takes its ranks from ray_workers (one device each); set devices "
                    f"and num_nodes to 1 (got {self.devices} and {self.num_nodes})"
                )
            if self.accelerator not in ("cpu", "gpu", "cuda", "auto"):
                raise ConfigError(
                    f"{where}.accelerator {self.accelerator!r}: launcher ray runs CPU or GPU workers "
                    "(cpu, gpu, cuda, auto)"
                )
            if self.strategy not in ("auto", "ddp"):
                raise ConfigError(
                    f"{where}.strategy {self.strategy!r}: launcher ray runs DDP (RayDDPStrategy); use auto or ddp"
                )
            if self.ray_workers < 1 or self.ray_cpus_per_worker < 1 or self.ray_max_failures < -1:
                raise ConfigError(
                    f"{where}: ray_workers and ray_cpus_per_worker must be at least 1, ray_max_failures at "
                    "least -1 (-1 = retry without limit)"
                )
        world = self.ray_workers if self.launcher == "ray" else self.devices * self.num_nodes
        if self.batch_size % world:
            ranks = "ray_workers" if self.launcher == "ray" else "devices x num_nodes"
            raise ConfigError(
                f"{where}.batch_size {self.batch_size} is not divisible by {world} ranks ({ranks}); "
                f"use a multiple of {world}"
            )
        if self.front and not self.front_end:
            raise ConfigError(f"{where}.front is set but front_end is 0: give the front end's width")
        for name in ("weights", "vae", "prompt_cache"):
            path = getattr(self, name)
            if path is not None:
                from pathlib import Path

                if not Path(path).exists():
                    raise ConfigError(f"{where}.{name}: {path} does not exist; give a local path or null")
        if self.backbone == "klein_base_4b" and (
            self.weights is None or self.vae is None or self.prompt_cache is None
        ):
            raise ConfigError(
                f"{where}: backbone klein_base_4b needs weights, vae and prompt_cache (local paths)"
            )
        for name in ("context_dropout", "image_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(
                    f"{where}.{name} must lie in [0, 1) (got {getattr(self, name)}); 002 uses 0.1"
                )
        if not 0 <= self.hei_lambda <= 1:
            raise ConfigError(f"{where}.hei_lambda must lie in [0, 1] (got {self.hei_lambda}); 002 uses 0.6")
        if self.conditioning == "composite" and self.strategy in ("ddp", "ddp_spawn"):
            # a rank whose batch has no reference leaves the composite context out of its graph
            raise ConfigError(
                f"{where}.strategy {self.strategy}: conditioning composite needs "
                "ddp_find_unused_parameters_true (a batch without references does not use the context)"
            )
        if (
            self.conditioning == "composite"
            and self.general_encoder == "farl_vit_b16"
            and self.general_encoder_weights is None
        ):
            raise ConfigError(
                f"{where}.general_encoder farl_vit_b16 needs general_encoder_weights (a local FaRL "
                "ViT-B/16 checkpoint); `small` needs none"
            )

    def _validate_compile(self, where: str) -> None:
        """Compiled blocks only where benchmarks/gpu_check.py has run them on a GPU (the IConFace route,
        bf16-mixed or float32, one process): another combination is refused here rather than met as a
        crash inside a compiled kernel."""
        if not 0 < self.compile_memory_budget <= 1:
            raise ConfigError(
                f"{where}.compile_memory_budget must lie in (0, 1] (got {self.compile_memory_budget})"
            )
        if self.compile_memory_budget < 1 and (not self.compile or self.gradient_checkpointing):
            raise ConfigError(
                f"{where}.compile_memory_budget {self.compile_memory_budget} acts on compiled blocks without "
                "gradient checkpointing (it replaces it): set compile true and gradient_checkpointing false, "
                "or the budget to 1.0"
            )
        if not self.compile:
            return
        unproven = [
            f"{key} {value}"
            for key, value, proven in (
                ("conditioning", self.conditioning, ("iconface",)),
                ("reference_route", self.reference_route, ("in_context",)),
                ("reference_masks", self.reference_masks, ("none",)),
                ("cycle_loss", self.cycle_loss, (False,)),
                ("precision", self.precision, ("bf16-mixed", "32-true", "32")),
                ("launcher", self.launcher, ("local",)),
            )
            if value not in proven
        ]
        if unproven:
            raise ConfigError(
                f"{where}.compile: compiled blocks are proven on a GPU (benchmarks/gpu_check.py) with "
                "conditioning iconface, reference_route in_context, reference_masks none, no cycle loss, "
                f"precision bf16-mixed or 32-true and the local launcher; not with {', '.join(unproven)}. "
                "Set compile false, or run that combination through benchmarks/gpu_check.py first"
            )


@dataclass(frozen=True)
class AnnotatorNoiseConfig:
    edge_px: int = 1  # brush edges wander by up to this many pixels
    p_miss: float = 0.1  # a small conflict region is missed with this probability
    small_px: int = 12
    p_stray: float = 0.15  # a stray dab of conflict lands on the face


@dataclass(frozen=True)
class AnnotateConfig:
    """`annotate`: conflict-mask annotation of target–reference pairs (synthetic or Label Studio)."""

    backend: Literal["synthetic", "label_studio"] = "synthetic"
    project: str = "refface conflict masks"
    split: str = "train"
    pool: int = 300  # pairs to annotate (RefSTAR: 800 of ~12,000 by hand)
    seed: int = 0
    annotators: tuple[str, ...] = ("annotator-a@refface.local", "annotator-b@refface.local")
    double_fraction: float = 0.3  # synthetic: share of pairs a second annotator also paints
    noise: AnnotatorNoiseConfig = field(default_factory=AnnotatorNoiseConfig)
    media_root: str = ".labelstudio/media"  # label_studio: the server's local-files document root
    prediction_model: str | None = None  # label_studio: a refsel model.safetensors for pre-annotation

    def validate(self, where: str) -> None:
        if self.pool < 1:
            raise ConfigError(f"{where}.pool must be at least 1 (got {self.pool})")
        if len(self.project.strip()) < 3:
            raise ConfigError(f"{where}.project: Label Studio needs a title of at least 3 characters")
        if not self.annotators:
            raise ConfigError(f"{where}.annotators needs at least one name")
        if not 0 <= self.double_fraction <= 1:
            raise ConfigError(f"{where}.double_fraction must lie in [0, 1] (got {self.double_fraction})")


@dataclass(frozen=True)
class RefselConfig:
    """`refsel`: the RefSel-style conflict-mask U-Net: train on annotations, predict all pairs, review."""

    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64, 128)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3  # RefSTAR: AdamW, lr 1e-3, betas (0.5, 0.999)
    betas: tuple[float, float] = (0.5, 0.999)
    ohem_thresh: float = 0.7
    ohem_min_kept: float = 0.25
    preset: str = "realesrgan"  # RefSTAR degrades the ground truth with Real-ESRGAN's model
    review_confidence: float = 0.9  # pairs below this mean confidence go back to review
    review_max: int = 50
    threads: int = 2
    grid_samples: int = 6

    def validate(self, where: str) -> None:
        if self.preset not in PRESET_NAMES:
            raise ConfigError(
                f"{where}.preset: unknown preset {self.preset!r}; valid: {', '.join(PRESET_NAMES)}"
            )
        if len(self.widths) < 2:
            raise ConfigError(f"{where}.widths needs at least two levels")


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: the trained model in both modes on every evaluation set."""

    samples: int = 0  # paired targets per set: those with max(modes) references (0 = all)
    modes: tuple[int, ...] = (0, 1, 2, 3)  # reference counts
    steps: int = 8
    guidance: float = 1.0
    seed: int = 42
    batch_size: int = 16
    copy_tau: float = 12.0
    grid_samples: int = 6
    threads: int = 2
    weights: dict[str, str | None] = field(  # local files of the weight metrics (pipelines.quality)
        default_factory=lambda: dict.fromkeys(WEIGHT_METRICS)
    )

    def validate(self, where: str) -> None:
        bad = [m for m in self.modes if not 0 <= m <= 3]
        if bad or not self.modes:
            raise ConfigError(f"{where}.modes: reference counts must lie in 0..3, got {list(self.modes)}")
        unknown = sorted(set(self.weights) - set(WEIGHT_METRICS))
        if unknown:
            raise ConfigError(
                f"{where}.weights: unknown metric(s) {unknown}; valid: {', '.join(WEIGHT_METRICS)}"
            )


@dataclass(frozen=True)
class RegisterConfig:
    """`register`: MLflow pyfunc model, registry version, alias challenger, promotion gate to champion."""

    model_name: str = "refface"
    experiment: str = "refface"
    primary: str = "severe/1 reference/gt_id"  # set/row/metric of metrics/evaluate.json (paired)
    min_gain: float = 0.0
    guards: dict[str, float] = field(  # set/row/metric -> the largest regression allowed vs the champion
        default_factory=lambda: {
            "severe/no reference/psnr": 0.3,
            "severe/1 reference/psnr": 0.3,
            "moderate/1 reference/psnr": 0.3,
            "severe/1 reference/gt_id": 0.02,
            "severe/1 reference/copy_score": 0.05,
        }
    )

    def validate(self, where: str) -> None:
        for name in (self.primary, *self.guards):
            if name.count("/") != 2:
                raise ConfigError(f"{where}: metric name {name!r} must look like 'set/row/metric'")
        bad = {k: v for k, v in self.guards.items() if v < 0}
        if bad:
            raise ConfigError(f"{where}.guards: margins must be >= 0, got {bad}")


@dataclass(frozen=True)
class AblateConfig:
    """`ablate`: the variants of paper Table 3 under one short budget."""

    variants: tuple[str, ...] = VARIANT_NAMES + SEED002_ROW_NAMES + REFSTAR_ROW_NAMES
    steps: int = 60
    batch_size: int = 8
    val_samples: int = 32
    val_steps: int = 2
    seed: int = 0

    def validate(self, where: str) -> None:
        valid = VARIANT_NAMES + REFSTAR_ROW_NAMES + SEED002_ROW_NAMES
        bad = [v for v in self.variants if v not in valid]
        if bad or not self.variants:
            raise ConfigError(f"{where}.variants: unknown {bad}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class TuneConfig:
    """`tune`: an Optuna study of short train+evaluate trials (nested MLflow runs)."""

    study_name: str = "refface-tune"
    storage: str = "sqlite:///data/optuna/tune.db"  # any SQLAlchemy URL for a shared study
    n_trials: int = 3
    steps: int = 20
    report_every: int = 5
    val_samples: int = 8
    val_steps: int = 2
    batch_size: int = 8
    seed: int = 0
    pruner_startup_trials: int = 2
    parallel: int = 1  # >1: trials run as Ray tasks (local Ray or the cluster in RAY_ADDRESS)
    # false: every run of the stage starts the study afresh, so its outputs are a function of its inputs
    # (DVC). true: continue a shared study in `storage` (outputs then depend on its history).
    resume: bool = False
    space: dict[str, tuple[Any, ...]] = field(
        default_factory=lambda: {
            "lr": ("log", 1e-4, 2e-3),
            "lambda_id": ("float", 0.1, 0.6),
            "lambda_h": ("float", 0.0, 0.5),
            "temperature": ("float", 0.5, 2.0),
            "lora_rank": ("int", 4, 16),
            "memory_tokens": ("choice", 16, 32, 64),
        }
    )

    def validate(self, where: str) -> None:
        from dataclasses import fields as _fields

        tunable = {f.name for f in _fields(TrainConfig)}
        for name, spec in self.space.items():
            if name not in tunable:
                raise ConfigError(f"{where}.space.{name}: not a train parameter")
            if not spec or spec[0] not in ("log", "float", "int", "choice"):
                raise ConfigError(f"{where}.space.{name}: first item must be log, float, int or choice")
            if spec[0] != "choice" and len(spec) != 3:
                raise ConfigError(f"{where}.space.{name}: [{spec[0]}, low, high] expected")


SECTIONS: dict[str, type] = {
    "synthesize": SynthesizeConfig,
    "source": SourceConfig,
    "ingest": IngestConfig,
    "train_id_encoder": TrainIdEncoderConfig,
    "embed": EmbedConfig,
    "pairs": PairsConfig,
    "shards": ShardsConfig,
    "degrade": DegradeConfig,
    "eval_sets": EvalSetsConfig,
    "annotate": AnnotateConfig,
    "refsel": RefselConfig,
    "train_front": TrainFrontConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "register": RegisterConfig,
    "ablate": AblateConfig,
    "tune": TuneConfig,
}


OVERLAY_KEY = "overlay"  # params.yaml's top-level key naming a file of sections merged over it


def merge_overlay(params: dict[str, Any], overlay: dict[str, Any], where: str) -> dict[str, Any]:
    """`params` with `overlay` ({section: {key: value}}) merged over it, key by key; a section or key the
    params do not have is an error naming it (an overlay changes values, it adds no options)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    for section, values in overlay.items():
        if section == OVERLAY_KEY or section not in SECTIONS:
            raise ConfigError(
                f"{where}: unknown section {section!r}; valid sections: {', '.join(sorted(SECTIONS))}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section} must be a mapping of keys")
        base = out.setdefault(section, {})
        for key, value in values.items():
            if key not in base:
                raise ConfigError(f"{where}: {section}.{key} is not a key of params.yaml's {section} section")
            base[key] = value
    return out


def read_params(path: str | Path, overlay: str | Path | None = None) -> dict[str, Any]:
    """params.yaml parsed, with the file its `overlay` key names (or `overlay` here) merged over it. The
    overlay's path is relative to the working directory, as DVC runs stages from the repository root:
    `overlay: configs/recipe_gpu.yaml` turns the chain into the paper's recipe on GPUs."""
    import yaml

    def parse(p: Path) -> dict[str, Any]:
        if not p.is_file():
            raise ConfigError(f"{p} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections")
        return raw

    raw = parse(Path(path))
    name = overlay if overlay is not None else raw.get(OVERLAY_KEY)
    if name is None:
        return raw
    return merge_overlay(raw, parse(Path(name)), f"overlay {name}")


def load_sections(params: dict[str, Any], names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Build the named sections (all known ones by default) from a parsed params.yaml (its `overlay`
    key, when set, already applied: `stages._common.load_params`)."""
    if not isinstance(params, dict):
        raise ConfigError("params.yaml: expected a mapping of sections")
    params = {k: v for k, v in params.items() if k != OVERLAY_KEY}
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"params.yaml: unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(sorted(SECTIONS))}"
        )
    names = names or tuple(SECTIONS)
    return {n: build(SECTIONS[n], params.get(n), n) for n in names}
