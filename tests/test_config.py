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
    for name, cls in SECTIONS.items():
        default, committed = build(cls, {}, name), build(cls, raw.get(name), name)
        for f in dataclasses.fields(cls):
            if getattr(default, f.name) != getattr(committed, f.name):
                diffs.append(
                    f"{name}.{f.name}: dataclass {getattr(default, f.name)!r}, params.yaml "
                    f"{getattr(committed, f.name)!r}"
                )
    assert not diffs, "defaults disagree with params.yaml:\n" + "\n".join(diffs)


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
