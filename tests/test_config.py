from pathlib import Path

import pytest
import yaml

from pipelines.config import (
    ConfigError,
    PairsConfig,
    SynthesizeConfig,
    TrainIdEncoderConfig,
    build,
    load_sections,
)

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_every_section():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    cfgs = load_sections(raw)
    assert cfgs["synthesize"].render_size == 128
    assert cfgs["train_id_encoder"].primary.units == (1, 1, 2, 1)
    assert isinstance(cfgs["pairs"].link_distance, float)


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        build(PairsConfig, {"link_distanse": 0.3}, "pairs")
    msg = str(e.value)
    assert (
        "pairs" in msg
        and "link_distanse" in msg
        and "link_distance" in msg
        and "min_eval_ref_distance" in msg
    )


def test_mistyped_values_are_rejected():
    with pytest.raises(ConfigError, match=r"pairs.max_refs: expected an integer"):
        build(PairsConfig, {"max_refs": "nine"}, "pairs")
    with pytest.raises(ConfigError, match=r"pairs.identity_from: 'both' is not one of"):
        build(PairsConfig, {"identity_from": "both"}, "pairs")
    with pytest.raises(ConfigError, match=r"synthesize.album_images_per_identity: expected 2 items"):
        build(SynthesizeConfig, {"album_images_per_identity": [1, 2, 3]}, "synthesize")
    with pytest.raises(ConfigError, match=r"expected true/false"):
        build(PairsConfig, {"check_released": "yes"}, "pairs")


def test_nested_sections_are_strict_too():
    with pytest.raises(
        ConfigError,
        match=r"train_id_encoder.primary: unknown key\(s\) width; valid keys: seed, stem_stride, units, widths",
    ):
        build(TrainIdEncoderConfig, {"primary": {"width": [1]}}, "train_id_encoder")


def test_semantic_checks():
    with pytest.raises(ConfigError, match="must sum to 1"):
        build(PairsConfig, {"split_fractions": {"train": 0.9, "val": 0.2, "test": 0.1}}, "pairs")


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown section"):
        load_sections({"shardz": {}})


def test_configs_are_frozen():
    cfg = build(PairsConfig, {}, "pairs")
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_params_yaml_is_the_one_source_of_defaults():
    """Every dataclass default equals params.yaml's value: a section left out of params.yaml (or a
    dataclass built in code) behaves as the committed params say, and no comment can disagree."""
    import dataclasses

    from pipelines.config import SECTIONS, build

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    diffs = []

    def compare(where: str, default, committed) -> None:
        """Key by key, into nested sections (train.ray, train.refstar, ...: their fields' defaults are
        their classes' own, so those classes are held to params.yaml too)."""
        for f in dataclasses.fields(default):
            a, b = getattr(default, f.name), getattr(committed, f.name)
            if dataclasses.is_dataclass(a):
                compare(f"{where}.{f.name}", a, b)
            elif a != b:
                diffs.append(f"{where}.{f.name}: dataclass {a!r}, params.yaml {b!r}")

    for name, cls in SECTIONS.items():
        compare(name, build(cls, {}, name), build(cls, raw.get(name), name))
    assert not diffs, "defaults disagree with params.yaml:\n" + "\n".join(diffs)


def test_train_has_one_nested_section_per_optional_system():
    """train.ray, train.composite and train.refstar are nested sections of params.yaml, built strictly;
    their switches (launcher, conditioning, shards) stay at the top of `train`."""
    from pipelines.config import CompositeTrainConfig, RayTrainConfig, RefstarTrainConfig, TrainConfig

    for cls in (
        RayTrainConfig,
        CompositeTrainConfig,
        RefstarTrainConfig,
    ):  # a section's default is its class's
        assert getattr(TrainConfig(), cls.__name__.removesuffix("TrainConfig").lower()) == cls()
    train = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    assert {k for k, v in train.items() if isinstance(v, dict)} == {"ray", "composite", "refstar"}
    assert {"launcher", "conditioning", "shards"} <= set(train)
    cfg = build(TrainConfig, train, "train")
    assert isinstance(cfg.ray, RayTrainConfig) and cfg.ray.workers == 2 and cfg.ray.degrade == "inline"
    assert isinstance(cfg.composite, CompositeTrainConfig) and cfg.composite.hei_lambda == 0.6
    assert isinstance(cfg.refstar, RefstarTrainConfig) and cfg.refstar.lambda_cycle == 1.5
    with pytest.raises(
        ConfigError, match=r"train.refstar: unknown key\(s\) cycle_los; valid keys: cycle_lambda_id"
    ):
        build(TrainConfig, {"refstar": {"cycle_los": True}}, "train")
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) ray_workers"):
        build(TrainConfig, {"ray_workers": 2}, "train")  # the flat keys of before are gone
    with pytest.raises(ConfigError, match=r"train.composite.image_dropout must lie in \[0, 1\)"):
        build(TrainConfig, {"composite": {"image_dropout": 1.0}}, "train")
    with pytest.raises(ConfigError, match=r"train.refstar.decoupled_rank must be 0 or more"):
        build(TrainConfig, {"refstar": {"decoupled_rank": -1}}, "train")
    with pytest.raises(ConfigError, match=r"train.refstar.cycle_lpips_heads is set but cycle_lpips"):
        build(TrainConfig, {"refstar": {"cycle_lpips_heads": "x.pth"}}, "train")
    with pytest.raises(ConfigError, match=r"train.refstar.cycle_loss needs references"):
        build(TrainConfig, {"max_refs": 0, "ref_schedule": [1.0], "refstar": {"cycle_loss": True}}, "train")


def test_with_overrides_and_flat_dict_reach_the_nested_sections():
    from pipelines.config import TrainConfig, flat_dict, with_overrides

    base = build(TrainConfig, {}, "train")
    cfg = with_overrides(base, {"lr": 1e-3, "refstar.cycle_loss": True, "ray.workers": 4})
    assert (cfg.lr, cfg.refstar.cycle_loss, cfg.ray.workers) == (1e-3, True, 4)
    assert cfg.refstar.lambda_cycle == base.refstar.lambda_cycle and cfg.ray.storage is None
    assert with_overrides(base, {}) == base
    flat = flat_dict(cfg)
    assert flat["ray.workers"] == 4 and flat["refstar.cycle_loss"] is True and flat["lr"] == 1e-3
    assert flat["ref_schedule"] == [0.3, 0.3, 0.2, 0.2]  # plain values, as as_dict gives them
    assert not any(isinstance(v, dict) for v in flat.values()) and "ray" not in flat
    assert len(flat) == len(as_dict_leaves(cfg))


def as_dict_leaves(cfg) -> list:
    from pipelines.config import as_dict

    def leaves(d):
        return [x for v in d.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    return leaves(as_dict(cfg))


def test_an_overlay_merges_into_the_nested_sections_and_adds_no_keys():
    """An overlay's `train.refstar: {cycle_loss: true}` changes that key only (the section's other values
    stay params.yaml's); a key params.yaml lacks, nested or flat, is an error naming it."""
    from pipelines.config import TrainConfig, merge_overlay

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["refstar"]["lambda_cycle"] = 2.0  # a committed value that is not the default
    merged = merge_overlay(raw, {"train": {"lr": 1e-3, "refstar": {"cycle_loss": True}}}, "overlay o.yaml")
    assert merged["train"]["refstar"] == {**raw["train"]["refstar"], "cycle_loss": True}
    assert raw["train"]["refstar"]["cycle_loss"] is False  # the params are not changed in place
    cfg = build(TrainConfig, merged["train"], "train")
    assert cfg.refstar.cycle_loss and cfg.refstar.lambda_cycle == 2.0 and cfg.lr == 1e-3
    for bad, key in (
        ({"train": {"refstar": {"cycle_los": True}}}, "train.refstar.cycle_los"),
        ({"train": {"ray_workers": 4}}, "train.ray_workers"),
        ({"train": {"ray": {"workers": 4, "gpus": 1}}}, "train.ray.gpus"),
    ):
        with pytest.raises(ConfigError, match=rf"overlay o.yaml: {key} is not a key of params.yaml's"):
            merge_overlay(raw, bad, "overlay o.yaml")


def test_tune_searches_the_top_level_train_keys():
    from dataclasses import replace

    from pipelines.config import TrainConfig, TuneConfig

    tune = build(TuneConfig, {"space": {"lr": ["log", 1e-4, 1e-3], "lora_rank": ["int", 4, 8]}}, "tune")
    cfg = replace(
        build(TrainConfig, {}, "train"), **{"lr": 2e-4, "lora_rank": 8}
    )  # as stages.tune applies a trial
    assert (cfg.lr, cfg.lora_rank) == (2e-4, 8) and sorted(tune.space) == ["lora_rank", "lr"]
    for name in ("refstar", "ray_workers"):  # a nested section, or a key of before
        with pytest.raises(ConfigError, match=f"tune.space.{name}: not a top-level train parameter"):
            build(TuneConfig, {"space": {name: ["float", 0.1, 0.5]}}, "tune")


def test_name_lists_match_their_registries():
    from models.iconface import BACKBONES, VARIANTS
    from pipelines.config import BACKBONE_NAMES, PRESET_NAMES, VARIANT_NAMES, WEIGHT_METRICS
    from pipelines.degradations import PRESETS
    from pipelines.quality import WEIGHT_FILES

    assert tuple(BACKBONES) == BACKBONE_NAMES and tuple(VARIANTS) == VARIANT_NAMES
    assert tuple(PRESETS) == PRESET_NAMES and tuple(WEIGHT_FILES) == WEIGHT_METRICS


@pytest.mark.parametrize(
    "key,value",
    [
        ("sigma_scheme", "unifrom"),
        ("precision", "bf16_mixed"),
        ("strategy", "dpp"),
        ("accelerator", "cuda:0"),
    ],
)
def test_plain_string_options_are_validated_with_the_valid_values(key, value):
    """A typo fails when params are read (before Ray, MLflow or Lightning start), naming the valid values."""
    from pipelines.config import ConfigError, TrainConfig, build

    with pytest.raises(ConfigError) as e:
        build(TrainConfig, {key: value}, "train")
    msg = str(e.value)
    valid = {
        "sigma_scheme": "'uniform'",
        "precision": "'bf16-mixed'",
        "strategy": "'ddp'",
        "accelerator": "'gpu'",
    }
    assert f"train.{key}" in msg and repr(value) in msg and "is not one of" in msg and valid[key] in msg
