"""`train`: the typed section of IConFace training (pipelines.config holds the other sections)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipelines.config_base import BACKBONE_NAMES, PRESET_NAMES, VARIANT_NAMES, ConfigError


def _check_paths(obj: Any, names: tuple[str, ...], where: str) -> None:
    """Each of `names` (local paths, or None) exists where given."""
    for name in names:
        path = getattr(obj, name)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{where}.{name}: {path} does not exist; give a local path or null")


@dataclass(frozen=True)
class RayTrainConfig:
    """`train.ray`: Ray Train's workers, with `train.launcher: ray` (pipelines/ray_fit.py)."""

    workers: int = 2  # training processes (DDP ranks); one GPU each when accelerator is gpu
    cpus_per_worker: int = 1  # CPUs reserved per worker (and its torch threads)
    # inline = each worker degrades its own share of the stream (safe on small clusters); tasks = it
    # submits Ray tasks (needs free CPUs beyond the workers', or they starve)
    degrade: Literal["inline", "tasks"] = "inline"
    max_failures: int = 2  # restarts of the worker group from the last checkpoint after a failure
    # where Ray Train keeps checkpoints, a path every node sees or a URI (s3://...); null: the
    # train stage's <out>/ckpt/ray, a temporary folder elsewhere (one machine only)
    storage: str | None = None


@dataclass(frozen=True)
class CompositeTrainConfig:
    """`train.composite`: seed 002's Composite Context (arXiv:2505.21905), with `train.conditioning: composite`."""

    # φ_G, the general face encoder: `small` (ours: a 64 px CLIP tower trained jointly) or
    # `farl_vit_b16` (the paper: FaRL ViT-B/16, frozen, from general_encoder_weights, a local checkpoint)
    general_encoder: Literal["small", "farl_vit_b16"] = "small"
    general_encoder_weights: str | None = None
    # CFG training drops (Sec. 4 of 002, 0.1 each, independently): the context's identity token and its
    # general tokens (key-masked) with context_dropout, the degraded input (zeroed) with image_dropout
    context_dropout: float = 0.1
    image_dropout: float = 0.1
    # adaptive = IConFace's λ* (supplement eq. 1); hard_example = seed 002's eq. 3 with a fixed λ
    id_loss: Literal["adaptive", "hard_example"] = "adaptive"
    hei_lambda: float = 0.6  # λ of 002's eq. 3 (the reference's weight)

    def validate(self, where: str) -> None:
        """The dropouts and HEI λ; what depends on the rest of `train` is TrainConfig's."""
        for name in ("context_dropout", "image_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(
                    f"{where}.{name} must lie in [0, 1) (got {getattr(self, name)}); 002 uses 0.1"
                )
        if not 0 <= self.hei_lambda <= 1:
            raise ConfigError(f"{where}.hei_lambda must lie in [0, 1] (got {self.hei_lambda}); 002 uses 0.6")


@dataclass(frozen=True)
class RefstarTrainConfig:
    """`train.refstar`: RefSTAR's transfer with masks (arXiv:2507.10470; models/refstar.py, pipelines/refstar.py)."""

    # none = IConFace (masks unused); refsel = the refsel stage's masks (annotated / predicted), which
    # needs train.shards: data/refsel/shards; truth = the synthetic ground-truth masks of data/shards (ours:
    # the oracle). A reference token is kept when >= mask_token_keep of its pixels are consistent.
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
        """Ranges and the LPIPS files; what depends on the rest of `train` is TrainConfig's."""
        if not 0 < self.mask_token_keep <= 1:
            raise ConfigError(f"{where}.mask_token_keep must lie in (0, 1] (got {self.mask_token_keep})")
        if self.decoupled_rank < 0:
            raise ConfigError(f"{where}.decoupled_rank must be 0 or more (got {self.decoupled_rank})")
        if self.cycle_lpips_heads and not self.cycle_lpips:
            raise ConfigError(f"{where}.cycle_lpips_heads is set but cycle_lpips (the backbone) is not")
        _check_paths(self, ("cycle_lpips", "cycle_lpips_heads"), where)


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
    # ours: the transformer's own training degradations (a preset name); None = `degrade.preset`, the
    # front end's. iconface_refldm: half IConFace's mild-to-moderate mix, half ReF-LDM's training range,
    # which reaches the severe test set's blur and downscaling (pipelines.degradations.iconface_refldm)
    degrade_preset: str | None = "iconface_refldm"
    # ours: the head also reads an aligned fusion of the references' final tokens (models.iconface,
    # "Reference readout"). auto: on where the degraded readout is (a random backbone with x0_residual);
    # off = the paper's head (klein)
    reference_readout: Literal["auto", "on", "off"] = "auto"
    # ours: the modulation also reads the degraded input's log-sharpness (models.iconface, "Degradation
    # embedding"), so one checkpoint can treat mild and severe inputs apart; false = the paper
    degradation_embed: bool = True
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
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)  # launcher ray: its workers
    gradient_checkpointing: bool = False
    # Storage dtype of the frozen weights (transformer but LoRA, VAE, identity encoder). auto: bf16
    # under bf16-mixed (LoRA and pathways stay float32 with float32 AdamW state), float32 otherwise.
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # torch.compile every transformer block (GPUs; paid once per process and shape); with
    # gradient_checkpointing the checkpoint sits inside each compiled block (IConFace.compile_blocks)
    compile: bool = False
    # with gradient_checkpointing: the fraction of the blocks (the first ones) whose activations are
    # recomputed; less than 1 trades memory for the recomputation of the others
    checkpoint_fraction: float = 1.0
    # with gradient_checkpointing: what a checkpointed block keeps for its backward. full: its inputs
    # (the whole block is recomputed); save_attention: also its attention outputs; save_matmuls: also
    # the outputs of its matrix products (the most memory, the least recomputation)
    checkpoint_policy: Literal["full", "save_matmuls", "save_attention"] = "full"
    seed: int = 0
    threads: int = 2
    log_every: int = 10
    checkpoint_every: int = 50
    grid_every: int = 500  # each grid restores the validation batch (val_steps, with and without refs)
    val_samples: int = 32
    val_steps: int = 12
    val_guidance: float = 1.0  # the embedded default's prompt is synthetic: guidance has nothing to amplify
    val_preset: str = "refldm_severe"
    experiment: str = "refface"
    # Seed 002 (Composite Context, arXiv:2505.21905) as a conditioning of the same model: `composite` gives the
    # references to the transformer as Composite Context tokens (models.composite) instead of IConFace's
    # in-context latents and identity modulation.
    conditioning: Literal["iconface", "composite"] = "iconface"
    composite: CompositeTrainConfig = field(default_factory=CompositeTrainConfig)  # conditioning composite
    # The shards the train stage reads (dvc.yaml: `--shards ${train.shards}` and a dep on that folder):
    # data/shards, or data/refsel/shards for refstar.reference_masks: refsel.
    shards: str = "data/shards"
    refstar: RefstarTrainConfig = field(default_factory=RefstarTrainConfig)  # RefSTAR's transfer

    def validate(self, where: str) -> None:
        """Every check of the section; the first that fails raises a ConfigError naming `where`.key."""
        self._validate_compile(where)
        self._validate_transfer(where)
        self._validate_model(where)
        self._validate_ranks(where)
        self._validate_paths(where)
        self._validate_composite(where)

    def _validate_transfer(self, where: str) -> None:
        """The σ draw, and RefSTAR's options that act with the rest (`train.refstar` checks its ranges)."""
        rs = self.refstar
        if not self.sigma_shift > 0:
            raise ConfigError(f"{where}.sigma_shift must be > 0 (got {self.sigma_shift})")
        if rs.cycle_loss and self.max_refs < 1:
            raise ConfigError(f"{where}.refstar.cycle_loss needs references (max_refs >= 1)")
        if self.conditioning == "composite" and (
            rs.reference_masks != "none" or rs.reference_route != "in_context" or rs.cycle_loss
        ):
            raise ConfigError(
                f"{where}.refstar: RefSTAR's transfer (reference_masks, reference_route: decoupled, cycle_loss) "
                "acts on the in-context reference tokens, which conditioning: composite replaces; use "
                "conditioning: iconface"
            )

    def _validate_model(self, where: str) -> None:
        """Backbone, variant, σ_max, LoRA rank and the reference counts."""
        if self.backbone not in BACKBONE_NAMES:
            raise ConfigError(
                f"{where}.backbone: unknown backbone {self.backbone!r}; valid: {', '.join(BACKBONE_NAMES)}"
            )
        if self.variant not in VARIANT_NAMES:
            raise ConfigError(
                f"{where}.variant: unknown variant {self.variant!r}; valid: {', '.join(VARIANT_NAMES)}"
            )
        if self.degrade_preset is not None and self.degrade_preset not in PRESET_NAMES:
            raise ConfigError(
                f"{where}.degrade_preset: unknown preset {self.degrade_preset!r}; valid: "
                f"{', '.join(PRESET_NAMES)} (or null: degrade.preset)"
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

    def _validate_ranks(self, where: str) -> None:
        """The launcher's ranks: Ray Train's settings, and a batch that divides over the ranks."""
        if self.launcher == "ray":
            if self.devices != 1 or self.num_nodes != 1:
                raise ConfigError(
                    f"{where}: launcher ray takes its ranks from ray.workers (one device each); set devices "
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
            for name, least in (("workers", 1), ("cpus_per_worker", 1), ("max_failures", -1)):
                if getattr(self.ray, name) < least:
                    raise ConfigError(
                        f"{where}.ray.{name} must be at least {least} (got {getattr(self.ray, name)})"
                        + ("; -1 = retry without limit" if name == "max_failures" else "")
                    )
        world = self.ray.workers if self.launcher == "ray" else self.devices * self.num_nodes
        if self.batch_size % world:
            ranks = "ray.workers" if self.launcher == "ray" else "devices x num_nodes"
            raise ConfigError(
                f"{where}.batch_size {self.batch_size} is not divisible by {world} ranks ({ranks}); "
                f"use a multiple of {world}"
            )

    def _validate_paths(self, where: str) -> None:
        """Local weights: the front end, the FLUX.2 folders and the prompt cache exist where given."""
        if self.front and not self.front_end:
            raise ConfigError(f"{where}.front is set but front_end is 0: give the front end's width")
        _check_paths(self, ("weights", "vae", "prompt_cache"), where)
        if self.backbone == "klein_base_4b" and (
            self.weights is None or self.vae is None or self.prompt_cache is None
        ):
            raise ConfigError(
                f"{where}: backbone klein_base_4b needs weights, vae and prompt_cache (local paths)"
            )

    def _validate_composite(self, where: str) -> None:
        """Seed 002's composite context: its DDP strategy and its encoder's weights (`train.composite`
        checks its ranges)."""
        if self.conditioning == "composite" and self.strategy in ("ddp", "ddp_spawn"):
            # a rank whose batch has no reference leaves the composite context out of its graph
            raise ConfigError(
                f"{where}.strategy {self.strategy}: conditioning composite needs "
                "ddp_find_unused_parameters_true (a batch without references does not use the context)"
            )
        if (
            self.conditioning == "composite"
            and self.composite.general_encoder == "farl_vit_b16"
            and self.composite.general_encoder_weights is None
        ):
            raise ConfigError(
                f"{where}.composite.general_encoder farl_vit_b16 needs general_encoder_weights (a local FaRL "
                "ViT-B/16 checkpoint); `small` needs none"
            )

    def _validate_compile(self, where: str) -> None:
        """Compiled blocks only where benchmarks/gpu_check.py has run them on a GPU (the IConFace route,
        bf16-mixed or float32, one process): another combination is refused here rather than met as a
        crash inside a compiled kernel."""
        if not 0 < self.checkpoint_fraction <= 1:
            raise ConfigError(
                f"{where}.checkpoint_fraction must lie in (0, 1] (got {self.checkpoint_fraction})"
            )
        if self.checkpoint_fraction < 1 and not self.gradient_checkpointing:
            raise ConfigError(
                f"{where}.checkpoint_fraction {self.checkpoint_fraction} needs gradient_checkpointing: true"
            )
        if self.checkpoint_policy != "full" and not self.gradient_checkpointing:
            raise ConfigError(
                f"{where}.checkpoint_policy {self.checkpoint_policy} needs gradient_checkpointing: true"
            )
        if not self.compile:
            return
        unproven = [
            f"{key} {value}"
            for key, value, proven in (
                ("conditioning", self.conditioning, ("iconface",)),
                ("refstar.reference_route", self.refstar.reference_route, ("in_context",)),
                ("refstar.reference_masks", self.refstar.reference_masks, ("none",)),
                ("refstar.cycle_loss", self.refstar.cycle_loss, (False,)),
                ("precision", self.precision, ("bf16-mixed", "32-true", "32")),
                ("launcher", self.launcher, ("local",)),
            )
            if value not in proven
        ]
        if unproven:
            raise ConfigError(
                f"{where}.compile: compiled blocks are proven on a GPU (benchmarks/gpu_check.py) with "
                "conditioning iconface, refstar.reference_route in_context, refstar.reference_masks none, no "
                "cycle loss, "
                f"precision bf16-mixed or 32-true and the local launcher; not with {', '.join(unproven)}. "
                "Set compile false, or run that combination through benchmarks/gpu_check.py first"
            )


def with_overrides(cfg: TrainConfig, changes: Mapping[str, Any]) -> TrainConfig:
    """`cfg` with `changes` applied, as `dataclasses.replace` does; a key of a nested section is written
    "section.key" (`{"refstar.cycle_loss": True, "lr": 1e-3}`). Like replace, it does not validate."""
    top = {k: v for k, v in changes.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for k, v in changes.items():
        if "." in k:
            section, key = k.split(".", 1)
            nested.setdefault(section, {})[key] = v
    return replace(cfg, **top, **{name: replace(getattr(cfg, name), **kw) for name, kw in nested.items()})
