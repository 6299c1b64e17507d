"""Typed configuration: every params.yaml section is mirrored by a frozen dataclass.

`build(cls, mapping, where)` turns a plain mapping (one params.yaml section) into `cls`, and fails
with a `ConfigError` that names the section, the offending key and the valid keys when a key is
unknown, missing or of the wrong type. Only `stages/` reads params.yaml; the library receives these
objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.config_base import (  # noqa: F401 (the names every caller imports from here)
    BACKBONE_NAMES,
    DEFAULT_ROW,
    PRESET_NAMES,
    REFSTAR_ROW_NAMES,
    SEED002_ROW_NAMES,
    VARIANT_NAMES,
    WEIGHT_METRICS,
    ConfigError,
    as_dict,
    build,
    flat_dict,
)
from pipelines.train_config import (  # noqa: F401 (re-exported)
    CompositeTrainConfig,
    RayTrainConfig,
    RefstarTrainConfig,
    TrainConfig,
    with_overrides,
)

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
    album_identities: int = 400  # the dataset pool, ingested like any album
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
class GateConfig:
    """`evaluate.reference_gate`: the reference readout's weight per input from its sharpness, fitted on
    the validation split (pipelines.reference_gate)."""

    kind: Literal["sharpness", "none"] = "sharpness"  # none: references at full weight on every input
    targets: int = 0  # validation targets per evaluation preset (0 = all with a reference)
    seed: int = 100000  # validation target i is degraded with default_rng(seed + i)


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: the trained model in both modes on every evaluation set."""

    samples: int = 0  # paired targets per set: those with max(modes) references (0 = all)
    modes: tuple[int, ...] = (0, 1, 2, 3)  # reference counts
    steps: int = 4
    guidance: float = 1.0
    seed: int = 42
    batch_size: int = 16
    # the blind mode also sampled with this many steps, paired with the front end alone: how much of the
    # transformer's gap to the front end is the sampler's trajectory (0: not restored)
    front_probe_steps: int = 2
    copy_tau: float = 12.0
    grid_samples: int = 6
    threads: int = 2
    weights: dict[str, str | None] = field(  # local files of the weight metrics (pipelines.quality)
        default_factory=lambda: dict.fromkeys(WEIGHT_METRICS)
    )
    reference_gate: GateConfig = field(default_factory=GateConfig)

    def validate(self, where: str) -> None:
        if self.front_probe_steps < 0 or self.front_probe_steps >= self.steps:
            raise ConfigError(
                f"{where}.front_probe_steps: {self.front_probe_steps}; expected 0 (off) or fewer than steps "
                f"({self.steps})"
            )
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
    """`ablate`: the variants of paper Table 3, seed 002's and RefSTAR's rows under one budget.

    protocol `finetune`: every row starts from the trained default (the train stage's model) and trains
    `steps` more steps at `lr` (linear warm-up over `warmup_steps`, then cosine to 0), so that each row
    differs from its baseline by its one change; `scratch`: every row trains from the seed with the
    train section's schedule."""

    variants: tuple[str, ...] = VARIANT_NAMES + (DEFAULT_ROW,) + SEED002_ROW_NAMES + REFSTAR_ROW_NAMES
    protocol: str = "finetune"
    steps: int = 40
    lr: float = 1e-4
    warmup_steps: int = 10
    batch_size: int = 4
    val_samples: int = 64
    val_steps: int = 1
    seed: int = 0
    # Table 3's rows' reference readout (ours, models.iconface): "off" = the paper's head, the default's
    # readout weights left out (with it, the readout carries the references past the pathways those rows
    # remove); "as_trained" = as the train section has it. The other rows keep the default's.
    table3_readout: Literal["off", "as_trained"] = "off"

    def validate(self, where: str) -> None:
        valid = VARIANT_NAMES + (DEFAULT_ROW,) + REFSTAR_ROW_NAMES + SEED002_ROW_NAMES
        bad = [v for v in self.variants if v not in valid]
        if bad or not self.variants:
            raise ConfigError(f"{where}.variants: unknown {bad}; valid: {', '.join(valid)}")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"{where}.variants: a row is listed twice: {list(self.variants)}")
        table3 = [v for v in self.variants if v in VARIANT_NAMES]
        if table3 != sorted(table3, key=VARIANT_NAMES.index):  # each is paired with the one before it
            raise ConfigError(
                f"{where}.variants: Table 3's variants must come in its order ({', '.join(VARIANT_NAMES)}), "
                f"got {table3}"
            )
        if self.protocol not in ("finetune", "scratch"):
            raise ConfigError(f"{where}.protocol: {self.protocol!r}; valid: finetune, scratch")
        if self.steps < 1:
            raise ConfigError(f"{where}.steps must be at least 1, got {self.steps}")
        if self.protocol == "finetune" and not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                f"{where}.warmup_steps must lie in [0, steps) with protocol finetune, got {self.warmup_steps}"
            )
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be positive, got {self.lr}")


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
        import dataclasses
        from typing import get_type_hints

        # the top-level keys of `train`; its nested sections (ray, composite, refstar) are not tunable
        tunable = {k for k, tp in get_type_hints(TrainConfig).items() if not dataclasses.is_dataclass(tp)}
        for name, spec in self.space.items():
            if name not in tunable:
                raise ConfigError(f"{where}.space.{name}: not a top-level train parameter")
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
        out[section] = _merge_section(out.get(section) or {}, values, SECTIONS[section], section, where)
    return out


def _merge_section(base: dict, values: dict, cls: type, path: str, where: str) -> dict:
    """`base` (a section of params.yaml at `path`, built as `cls`) with `values` merged over it key by key,
    into its nested sections too (`train.ray`: {workers: 4} changes that key only); a key `base` lacks is
    an error."""
    import dataclasses
    from typing import get_type_hints

    hints = get_type_hints(cls)
    out = dict(base)
    for key, value in values.items():
        if key not in out:
            raise ConfigError(f"{where}: {path}.{key} is not a key of params.yaml's {path} section")
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge_section(out[key], value, sub, f"{path}.{key}", where)
        else:
            out[key] = value
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
