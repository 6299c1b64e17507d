"""The synthetic people of the embedded default source: who they are and how each photograph shows them.

A face is the sum of two parameter sets:

* **identity traits** (`Identity`, fixed per person, what references carry and severe degradation
  destroys): fine marks — moles, freckles, a scar — at identity-fixed positions in the face frame, iris
  colour, brow shape (thickness, arch, tilt, length), nose (width, length), face shape (aspect, jaw),
  skin tone, hair colour and volume, eye spacing;
* **per-image states** (`State`, what survives degradation, may differ between a target and its
  reference): pose (yaw; roll, scale and shift only within the framing: FFHQ-aligned by default, see
  FRAMINGS), expression (closed / open / smile), eyes open or closed, glasses, beard, lip colour,
  lighting direction and strength, background.

Everything derives from integer seeds (`face_spec`), so the same seed gives the same face;
`pipelines.synthetic` renders it and computes exact conflict masks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Mask contract (docs/architecture.md): 0 consistent face region, 1 conflict, 255 ignore.
MASK_CONSISTENT, MASK_CONFLICT, MASK_IGNORE = 0, 1, 255
CONFLICT_TYPES = ("mouth", "eyes", "glasses", "beard")
EXPRESSIONS = ("closed", "open", "smile")
POOLS = {"album": 1, "encoder": 2}

_SKIN_TONES = np.array(
    [[246, 214, 190], [234, 192, 160], [222, 170, 130], [198, 140, 100], [160, 105, 70], [110, 72, 48]],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [
        [30, 22, 18],
        [70, 45, 28],
        [120, 80, 45],
        [190, 150, 90],
        [150, 60, 30],
        [140, 140, 140],
        [230, 220, 200],
    ],
    dtype=np.float64,
)
_IRIS_COLOURS = np.array(
    [[70, 45, 25], [110, 75, 40], [60, 110, 160], [80, 140, 90], [130, 130, 120], [40, 30, 25]],
    dtype=np.float64,
)
_LIP_COLOURS = {  # per image (make-up); "natural" is derived from the skin tone
    "red": (190, 30, 45),
    "pink": (220, 110, 140),
    "plum": (120, 40, 80),
}


@dataclass(frozen=True)
class Identity:
    """Traits of one person. Positions are in the face frame (x right, y down, face radius ~1)."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    iris: tuple[float, float, float]
    hair_volume: float
    face_aspect: float  # width / height of the face ellipse
    jaw: float  # superellipse exponent of the lower face (small = pointed chin)
    eye_spacing: float
    eye_height: float
    brow_thickness: float
    brow_arch: float
    brow_tilt: float
    brow_length: float
    nose_width: float
    nose_length: float
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    freckles: tuple[tuple[float, float], ...]
    scar: tuple[float, float, float, float] | None  # (x0, y0, x1, y1)


@dataclass(frozen=True)
class State:
    """The state of one photograph."""

    yaw: float
    roll: float
    scale: float
    shift_x: float
    shift_y: float
    expression: str
    eyes_open: bool
    glasses: bool
    glasses_colour: tuple[float, float, float]
    beard: bool
    lip: str  # "natural" or a key of _LIP_COLOURS
    light_azimuth: float
    light_strength: float
    background: tuple[tuple[float, float, float], tuple[float, float, float], float]  # two colours, angle


@dataclass(frozen=True)
class FaceSpec:
    """Everything needed to render one image (and recompute its masks)."""

    identity: Identity
    state: State

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> FaceSpec:
        i = dict(d["identity"])
        i["skin"], i["hair"], i["iris"] = tuple(i["skin"]), tuple(i["hair"]), tuple(i["iris"])
        i["moles"] = tuple(tuple(m) for m in i["moles"])
        i["freckles"] = tuple(tuple(f) for f in i["freckles"])
        i["scar"] = None if i["scar"] is None else tuple(i["scar"])
        s = dict(d["state"])
        s["glasses_colour"] = tuple(s["glasses_colour"])
        c0, c1, ang = s["background"]
        s["background"] = (tuple(c0), tuple(c1), ang)
        return FaceSpec(Identity(**i), State(**s))


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def _colour(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> tuple[float, float, float]:
    # Interpolate between two neighbouring palette entries, then jitter: a continuum of colours.
    i = rng.integers(len(palette))
    j = min(len(palette) - 1, i + 1)
    c = palette[i] + rng.uniform(0, 1) * (palette[j] - palette[i]) + rng.normal(0, jitter, 3)
    return tuple(float(v) for v in np.clip(c, 0, 255).round(2))


# Identity cues: which traits tell people apart. `mixed`: skin, hair, face shape, eye spacing and nose
# drawn from wide ranges, so colour and shape alone identify a person and survive any degradation, and
# the identity encoders look at little else (docs/results.md, "Identity cues of the synthetic people").
# `fine` (the default): as in a real population, many people share a skin tone, a hair colour and a
# face shape (a few palette entries, narrow shape ranges), and what tells them apart are the traits
# that severe degradation destroys and a clean reference shows at 64 px: moles (bigger: 1-2.5 px),
# freckles, a scar, brow shape, iris colour.
# (ranges: moles count, mole radius, freckle p, scar p, face aspect, jaw, eye spacing, eye height,
# nose width, nose length, hair volume, skin palette rows, hair palette rows, colour jitter)
IDENTITY_CUES = {
    "mixed": dict(
        moles=(1, 5),
        mole_r=(0.035, 0.06),
        freckle_p=0.35,
        scar_p=0.3,
        aspect=(0.7, 0.88),
        jaw=(1.5, 2.6),
        eye_spacing=(0.3, 0.42),
        eye_height=(-0.22, -0.08),
        nose_w=(0.07, 0.15),
        nose_l=(0.2, 0.36),
        hair_volume=(0.05, 0.3),
        skin=None,
        hair=None,
        jitter=(6.0, 8.0),
    ),
    "fine": dict(
        moles=(2, 6),
        mole_r=(0.045, 0.075),
        freckle_p=0.5,
        scar_p=0.5,
        aspect=(0.77, 0.81),
        jaw=(1.9, 2.2),
        eye_spacing=(0.35, 0.37),
        eye_height=(-0.16, -0.13),
        nose_w=(0.1, 0.12),
        nose_l=(0.27, 0.3),
        hair_volume=(0.12, 0.2),
        skin=(1, 2, 3),
        hair=(0, 1, 2),
        jitter=(1.5, 2.0),
    ),
}


def _shared_colour(
    rng: np.random.Generator, palette: np.ndarray, rows, jitter: float
) -> tuple[float, float, float]:
    # One of a few shared palette entries with a small jitter: a colour many people have.
    c = palette[rows[int(rng.integers(len(rows)))]] + rng.normal(0, jitter, 3)
    return tuple(float(v) for v in np.clip(c, 0, 255).round(2))


def sample_identity(seed: int, pool: str, index: int, cues: str = "fine") -> Identity:
    """Identity traits of person `index` of `pool` ('album' or 'encoder'): a pure function of its key
    and the identity cues (IDENTITY_CUES)."""
    if cues not in IDENTITY_CUES:
        raise ValueError(f"unknown identity cues {cues!r}; valid: {', '.join(IDENTITY_CUES)}")
    c = IDENTITY_CUES[cues]
    rng = _rng(seed, POOLS[pool], index, 0)
    n_moles = int(rng.integers(c["moles"][0], c["moles"][1]))
    moles = []
    for _ in range(n_moles):
        ang = rng.uniform(0, 2 * math.pi)
        r = rng.uniform(0.25, 0.75)
        moles.append(
            (
                round(r * math.cos(ang) * 0.8, 4),
                round(r * math.sin(ang) * 0.9, 4),
                round(rng.uniform(*c["mole_r"]), 4),
            )
        )
    freckles: list[tuple[float, float]] = []
    if rng.uniform() < c["freckle_p"]:
        for _ in range(int(rng.integers(12, 28))):
            side = rng.choice([-1.0, 1.0])
            freckles.append((round(side * rng.uniform(0.12, 0.55), 4), round(rng.uniform(0.0, 0.35), 4)))
    scar = None
    if rng.uniform() < c["scar_p"]:
        x0, y0 = rng.uniform(-0.55, 0.55), rng.uniform(-0.55, 0.4)
        ang = rng.uniform(0, math.pi)
        ln = rng.uniform(0.15, 0.3)
        scar = tuple(round(v, 4) for v in (x0, y0, x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)))
    js, jh = c["jitter"]
    skin = (
        _colour(rng, _SKIN_TONES, js)
        if c["skin"] is None
        else _shared_colour(rng, _SKIN_TONES, c["skin"], js)
    )
    hair = (
        _colour(rng, _HAIR_COLOURS, jh)
        if c["hair"] is None
        else _shared_colour(rng, _HAIR_COLOURS, c["hair"], jh)
    )
    return Identity(
        skin=skin,
        hair=hair,
        iris=_colour(rng, _IRIS_COLOURS, 10.0),
        hair_volume=round(rng.uniform(*c["hair_volume"]), 4),
        face_aspect=round(rng.uniform(*c["aspect"]), 4),
        jaw=round(rng.uniform(*c["jaw"]), 4),
        eye_spacing=round(rng.uniform(*c["eye_spacing"]), 4),
        eye_height=round(rng.uniform(*c["eye_height"]), 4),
        brow_thickness=round(rng.uniform(0.035, 0.09), 4),
        brow_arch=round(rng.uniform(-0.02, 0.09), 4),
        brow_tilt=round(rng.uniform(-0.25, 0.25), 4),
        brow_length=round(rng.uniform(0.13, 0.22), 4),
        nose_width=round(rng.uniform(*c["nose_w"]), 4),
        nose_length=round(rng.uniform(*c["nose_l"]), 4),
        moles=tuple(moles),
        freckles=tuple(freckles),
        scar=scar,
    )


# Framing of a photograph: (roll, scale, shift_x, shift_y) ranges. `aligned` is how the datasets of the
# field are prepared (FFHQ, FFHQ-Ref, CelebRef-HQ: eyes and mouth moved to the FFHQ template by a
# similarity transform), left with the residual of landmark noise; yaw and expression stay per-photo
# states. `wild`: unaligned crops (roll ±0.22 rad, scale 0.85–1.08, shift ±7 %).
FRAMINGS = {
    "aligned": ((-0.02, 0.02), (0.98, 1.02), (-0.01, 0.01), (-0.01, 0.01)),
    "wild": ((-0.22, 0.22), (0.85, 1.08), (-0.07, 0.07), (-0.06, 0.06)),
}


def sample_state(
    seed: int, pool: str, identity_index: int, image_index: int, framing: str = "aligned"
) -> State:
    """The state of photograph `image_index` of a person: a pure function of its key and the framing
    (the same draws in either framing: only the ranges of roll, scale and shift differ)."""
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; valid: {', '.join(FRAMINGS)}")
    roll, scale, sx, sy = FRAMINGS[framing]
    rng = _rng(seed, POOLS[pool], identity_index, image_index + 1)
    lips = ["natural", "natural", "natural", *sorted(_LIP_COLOURS)]
    bg0 = tuple(float(v) for v in rng.uniform(20, 235, 3).round(2))
    bg1 = tuple(float(v) for v in np.clip(np.array(bg0) + rng.normal(0, 40, 3), 0, 255).round(2))
    return State(
        yaw=round(rng.uniform(-0.5, 0.5), 4),
        roll=round(rng.uniform(*roll), 4),
        scale=round(rng.uniform(*scale), 4),
        shift_x=round(rng.uniform(*sx), 4),
        shift_y=round(rng.uniform(*sy), 4),
        expression=str(rng.choice(EXPRESSIONS, p=[0.5, 0.2, 0.3])),
        eyes_open=bool(rng.uniform() < 0.8),
        glasses=bool(rng.uniform() < 0.25),
        glasses_colour=tuple(float(v) for v in rng.uniform(0, 90, 3).round(2)),
        beard=bool(rng.uniform() < 0.2),
        lip=str(rng.choice(lips)),
        light_azimuth=round(rng.uniform(-math.pi, math.pi), 4),
        light_strength=round(rng.uniform(0.0, 0.45), 4),
        background=(bg0, bg1, round(rng.uniform(0, 2 * math.pi), 4)),
    )


def face_spec(
    seed: int, pool: str, identity_index: int, image_index: int, framing: str = "aligned", cues: str = "fine"
) -> FaceSpec:
    return FaceSpec(
        sample_identity(seed, pool, identity_index, cues),
        sample_state(seed, pool, identity_index, image_index, framing),
    )


# --------------------------------------------------------------------------------------------------
# Pools
# --------------------------------------------------------------------------------------------------


def images_per_identity(
    seed: int, pool: str, n_identities: int, lo: int, hi: int, singleton_fraction: float
) -> list[int]:
    """How many photographs each person of a pool has (deterministic)."""
    rng = _rng(seed, POOLS[pool], 0xC0FFEE)
    counts = rng.integers(lo, hi + 1, n_identities)
    singles = rng.uniform(size=n_identities) < singleton_fraction
    return [1 if s else int(c) for c, s in zip(counts, singles)]


def identity_name(pool: str, index: int) -> str:
    return f"{pool[:3]}{index:05d}"


def image_name(pool: str, identity_index: int, image_index: int) -> str:
    return f"{identity_name(pool, identity_index)}_{image_index:02d}"
