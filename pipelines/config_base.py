"""The typed-config machinery: `build(cls, mapping, where)` turns a plain mapping (one params.yaml
section) into the frozen dataclass `cls`, failing with a `ConfigError` that names the section, the
offending key and the valid keys when a key is unknown, missing or of the wrong type; `as_dict` goes back.
Also the registry names a params.yaml may use (checked against the registries in tests/test_config.py).
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
# the ablate row of the trained default fine-tuned as it is (its reference readout as trained): the seed
# systems' rows are paired against it (pipelines.ablation.ADDON_BASELINES)
DEFAULT_ROW = "default"
PRESET_NAMES = (
    "realesrgan",
    "bsrgan",
    "face_classic",
    "refldm_train",
    "refldm_moderate",
    "refldm_severe",
    "iconface_mixed",
    "iconface_refldm",
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


def flat_dict(obj: Any) -> dict[str, Any]:
    """`as_dict` with the nested sections' keys flattened to dotted names (`ray.workers`), e.g. for
    MLflow params; other mapping values stay whole."""
    plain = as_dict(obj)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= {f"{f.name}.{k}": v for k, v in flat_dict(value).items()}
        else:
            out[f.name] = plain[f.name]
    return out
