"""Procedural identity faces: the embedded default source, with exact ground-truth conflict masks.

A face is the sum of two parameter sets:

* **identity traits** (fixed per person, what references carry and severe degradation destroys):
  fine marks — moles, freckles, a scar — at identity-fixed positions in the face frame, iris colour,
  brow shape (thickness, arch, tilt, length), nose (width, length), face shape (aspect, jaw), skin tone,
  hair colour and volume, eye spacing;
* **per-image states** (what survives degradation, may differ between a target and its reference):
  pose (yaw; roll, scale and shift only within the framing: FFHQ-aligned by default, see FRAMINGS), expression (closed / open / smile), eyes open or closed, glasses,
  beard, lip colour, lighting direction and strength, background.

Rendering is vectorised numpy over a pixel grid: every part is a soft signed-distance coverage
(about one pixel of anti-aliasing), composited back to front, at `render_size` and area-downsampled to
`image_size`. Everything derives from integer seeds, so the same seed gives byte-identical images.

Geometry lives in one place (`_Geometry`): the renderer and `conflict_mask` evaluate the same shapes,
so a mask is exact in the reference's pixel grid at any size.
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
# Geometry: one place for every shape, evaluated on any pixel grid
# --------------------------------------------------------------------------------------------------


def _cover(sdf: np.ndarray, px: float) -> np.ndarray:
    """Soft coverage of the region sdf < 0 with about one pixel (`px` in frame units) of anti-aliasing."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def _ellipse_sdf(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    # Approximate distance: radial excess scaled by the smaller semi-axis (exact for circles).
    return (np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) - 1.0) * min(a, b)


def _segment_sdf(x, y, x0, y0, x1, y1, half_width):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)) - half_width


class _Geometry:
    """All shapes of one face on an S×S grid. Attributes are coverage maps in [0, 1], shape (S, S)."""

    def __init__(self, spec: FaceSpec, size: int, state: State | None = None):
        """`state` overrides the spec's local state while keeping its pose (for conflict footprints)."""
        ident, pose = spec.identity, spec.state
        st = state or pose
        self.size = size
        self.px = 2.0 / size / pose.scale  # one pixel in face-frame units
        c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)  # pixel centres in [-1, 1]
        gx, gy = np.meshgrid(c, c)  # (S, S)
        # Image -> face frame: undo shift, roll and scale.
        cr, sr = math.cos(pose.roll), math.sin(pose.roll)
        ux, uy = (gx - pose.shift_x) / pose.scale, (gy - pose.shift_y) / pose.scale
        self.x = cr * ux + sr * uy  # (S, S)
        self.y = -sr * ux + cr * uy
        self.cy, self.sy = math.cos(pose.yaw), math.sin(pose.yaw)
        self.ident, self.st = ident, st
        x, y = self.x, self.y

        fa, fb = 0.62 * ident.face_aspect * 1.15, 0.78  # face semi-axes
        self.fa, self.fb = fa, fb
        fx = 0.06 * self.sy  # the outline moves a little with yaw
        p = np.where(y > 0, ident.jaw, 2.0)
        r = (np.abs((x - fx) / (fa * (0.82 + 0.18 * self.cy))) ** p + np.abs(y / fb) ** p) ** (1.0 / p)
        self.face = _cover((r - 1.0) * fa, self.px)
        # Hair: a cap behind and over the top of the face; volume is an identity trait.
        hv = ident.hair_volume
        cap = _ellipse_sdf(x, y, fx, -0.12, fa + hv + 0.06, fb + hv * 0.6)
        cap = np.maximum(cap, y - (0.05 + 0.5 * hv))  # cut at cheek height
        fringe = np.maximum(_ellipse_sdf(x, y, fx, -0.95, fa * 1.05, 0.42 + 0.4 * hv), -r + 0.0)
        self.hair_back = _cover(cap, self.px)
        self.hair_front = _cover(fringe, self.px) * self.face
        neck = np.maximum(np.abs(x - fx * 0.5) - fa * 0.45, 0.5 - y)
        self.neck = _cover(neck, self.px) * (1 - self.face)

        # Eyes (depth 0.55 for yaw), brows above them.
        self.eye_centres = []
        eye, iris, pupil, lid = (np.zeros_like(x) for _ in range(4))
        brow = np.zeros_like(x)
        for side in (-1.0, 1.0):
            ex = self._project(side * ident.eye_spacing, 0.55)
            ey = ident.eye_height
            ew = 0.12 * self._foreshorten(side)
            self.eye_centres.append((ex, ey))
            if st.eyes_open:
                eye = np.maximum(eye, _cover(_ellipse_sdf(x, y, ex, ey, ew, 0.065), self.px))
                iris = np.maximum(
                    iris, _cover(_ellipse_sdf(x, y, ex, ey, 0.055 * self._foreshorten(side), 0.055), self.px)
                )
                pupil = np.maximum(pupil, _cover(_ellipse_sdf(x, y, ex, ey, 0.022, 0.022), self.px))
            else:
                lid = np.maximum(
                    lid, _cover(_segment_sdf(x, y, ex - ew, ey + 0.01, ex + ew, ey + 0.01, 0.014), self.px)
                )
            bx0 = ex - side * 0.02
            bl = ident.brow_length * self._foreshorten(side)
            t = np.clip((x - bx0) / bl, -1.0, 1.0)
            by = ey - 0.13 - ident.brow_arch * (1 - t**2) + side * ident.brow_tilt * 0.2 * t
            bsdf = np.maximum(np.abs(y - by) - ident.brow_thickness / 2, np.abs(x - bx0) - bl)
            brow = np.maximum(brow, _cover(bsdf, self.px))
        self.eye, self.iris, self.pupil, self.lid, self.brow = (
            eye * self.face,
            iris * eye,
            pupil * eye,
            lid,
            brow,
        )
        # Footprint of the eye region (either state), for conflict masks.
        self.eye_region = np.zeros_like(x)
        for ex, ey in self.eye_centres:
            self.eye_region = np.maximum(
                self.eye_region, _cover(_ellipse_sdf(x, y, ex, ey, 0.17, 0.1), self.px)
            )

        # Nose (depth 1.0): tip, nostrils and a ridge.
        nx = self._project(0.0, 1.0)
        ny = ident.eye_height + ident.nose_length + 0.05
        nw = ident.nose_width
        self.nose_tip = _cover(_ellipse_sdf(x, y, nx, ny - 0.02, nw * 0.8, 0.05), self.px)
        nostril = np.zeros_like(x)
        for side in (-1.0, 1.0):
            nostril = np.maximum(
                nostril,
                _cover(
                    _ellipse_sdf(x, y, nx + side * nw * 0.55 * self.cy, ny + 0.025, 0.028, 0.016), self.px
                ),
            )
        self.nostril = nostril
        ridge_x = self._project(0.0, 0.8)
        self.ridge = _cover(
            _segment_sdf(x, y, ridge_x, ident.eye_height + 0.05, nx, ny - 0.06, 0.012), self.px
        )
        self.nose_y = ny

        # Mouth (depth 0.7).
        mx, my = self._project(0.0, 0.7), ny + 0.17
        mw = 0.2 * (0.8 + 0.2 * self.cy)
        self.mouth_centre = (mx, my)
        t = np.clip((x - mx) / mw, -1.0, 1.0)
        if st.expression == "closed":
            lips = _cover(np.maximum(np.abs(y - my) - 0.028, np.abs(x - mx) - mw), self.px)
            inner = _cover(np.maximum(np.abs(y - my) - 0.006, np.abs(x - mx) - mw * 0.9), self.px)
            teeth = np.zeros_like(x)
        elif st.expression == "open":
            lips = _cover(_ellipse_sdf(x, y, mx, my + 0.02, mw * 0.85, 0.1), self.px)
            inner = _cover(_ellipse_sdf(x, y, mx, my + 0.02, mw * 0.65, 0.07), self.px)
            teeth = inner * _cover(np.abs(y - (my - 0.03)) - 0.018, self.px)
        else:  # smile: an upward-curved band with teeth
            curve = my + 0.05 * (1 - t**2) - 0.02
            band = np.maximum(np.abs(y - curve) - 0.04 * (1 - 0.6 * t**2), np.abs(x - mx) - mw * 1.1)
            lips = _cover(band, self.px)
            inner = _cover(
                np.maximum(np.abs(y - curve) - 0.02 * (1 - 0.8 * t**2), np.abs(x - mx) - mw), self.px
            )
            teeth = inner * _cover(y - curve, self.px)
        self.lips, self.mouth_inner, self.teeth = lips * self.face, inner * self.face, teeth * self.face

        # Beard: lower face below the nose, around the mouth.
        bsdf = np.maximum(ny + 0.06 - y, (r - 1.0) * fa)  # below the nose, inside the face
        bsdf = np.maximum(bsdf, -_ellipse_sdf(x, y, mx, my + 0.01, mw * 1.05, 0.07))
        bsdf = np.maximum(bsdf, np.abs(x - fx) - fa * 0.85)
        self.beard_region = _cover(bsdf, self.px) * self.face
        self.beard = self.beard_region if st.beard else np.zeros_like(x)

        # Glasses: two rings and a bridge.
        g = np.zeros_like(x)
        for ex, ey in self.eye_centres:
            ring = np.abs(_ellipse_sdf(x, y, ex, ey, 0.16, 0.11)) - 0.018
            g = np.maximum(g, _cover(ring, self.px))
        (lx, ly), (rx, ry) = self.eye_centres
        g = np.maximum(g, _cover(_segment_sdf(x, y, lx + 0.16, ly, rx - 0.16, ry, 0.014), self.px))
        self.glasses_region = g
        self.lens = np.zeros_like(x)
        for ex, ey in self.eye_centres:
            self.lens = np.maximum(self.lens, _cover(_ellipse_sdf(x, y, ex, ey, 0.16, 0.11), self.px))
        self.glasses = g if st.glasses else np.zeros_like(x)

        # Fine identity marks (on skin only).
        marks = np.zeros_like(x)
        for mxx, myy, mr in ident.moles:
            marks = np.maximum(
                marks, _cover(_ellipse_sdf(x, y, self._project(mxx, 0.6), myy, mr * self.cy, mr), self.px)
            )
        self.moles = marks
        fr = np.zeros_like(x)
        for fxx, fyy in ident.freckles:
            fr = np.maximum(
                fr, 0.6 * _cover(_ellipse_sdf(x, y, self._project(fxx, 0.7), fyy, 0.018, 0.018), self.px)
            )
        self.freckles = fr
        if ident.scar is not None:
            x0, y0, x1, y1 = ident.scar
            self.scar = _cover(
                _segment_sdf(x, y, self._project(x0, 0.6), y0, self._project(x1, 0.6), y1, 0.012), self.px
            )
        else:
            self.scar = np.zeros_like(x)

    def _project(self, fx: float, depth: float) -> float:
        """Horizontal position of a face-frame point of `depth` after yaw."""
        return fx * self.cy + depth * 0.35 * self.sy

    def _foreshorten(self, side: float) -> float:
        """Width factor of a feature on `side` (-1 left, +1 right) under yaw: the far side shrinks."""
        return float(np.clip(self.cy * (1.0 + 0.35 * side * self.sy), 0.35, 1.2))

    def skin_normal_light(self, azimuth: float, strength: float) -> np.ndarray:
        """Lambert-like shading factor over the face ellipsoid for a light at `azimuth`."""
        nx = np.clip(self.x / (self.fa * 1.05), -1, 1)
        ny = np.clip(self.y / (self.fb * 1.05), -1, 1)
        nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0, 1))
        lx, ly, lz = math.cos(azimuth) * 0.8, math.sin(azimuth) * 0.8, 0.6
        return (1 - strength) + strength * 1.25 * np.clip(nx * lx + ny * ly + nz * lz, 0, 1)


# --------------------------------------------------------------------------------------------------
# Rendering and masks
# --------------------------------------------------------------------------------------------------


def _over(img: np.ndarray, cov: np.ndarray, colour) -> None:
    """Composite a flat colour over `img` (S, S, 3) with coverage `cov` (S, S), in place.

    Only the bounding box of the coverage is touched: most parts cover a few percent of the image.
    """
    rows = np.flatnonzero(cov.max(axis=1) > 0)
    if rows.size == 0:
        return
    cols = np.flatnonzero(cov.max(axis=0) > 0)
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    sub = img[box]
    sub += cov[box][..., None] * (np.asarray(colour, dtype=np.float32) - sub)


def _lip_colour(spec: FaceSpec) -> np.ndarray:
    if spec.state.lip == "natural":
        return np.array(spec.identity.skin) * np.array([0.85, 0.55, 0.55])
    return np.array(_LIP_COLOURS[spec.state.lip], dtype=np.float64)


def render(spec: FaceSpec, render_size: int = 128, image_size: int = 64) -> np.ndarray:
    """Render `spec` to an (image_size, image_size, 3) uint8 RGB image (area-downsampled from render_size)."""
    g = _Geometry(spec, render_size)
    ident, st = spec.identity, spec.state
    S = render_size
    # Background: a linear gradient between two colours.
    c = ((np.arange(S) + 0.5) / S * 2 - 1).astype(np.float32)
    gx, gy = np.meshgrid(c, c)
    c0, c1, ang = st.background
    t = np.clip(0.5 + 0.5 * (gx * math.cos(ang) + gy * math.sin(ang)), 0, 1)[..., None]
    img = ((1 - t) * np.asarray(c0, np.float32) + t * np.asarray(c1, np.float32)).astype(
        np.float32
    )  # (S, S, 3)

    skin = np.asarray(ident.skin)
    hair = np.asarray(ident.hair)
    _over(img, g.hair_back, hair)
    _over(img, g.neck, skin * 0.82)
    _over(img, g.face, skin)
    _over(img, g.freckles * g.face, skin * np.array([0.72, 0.58, 0.48]))
    _over(img, g.moles * g.face, np.array([60.0, 38.0, 30.0]))
    _over(img, g.scar * g.face, skin * np.array([1.05, 0.78, 0.78]))
    _over(img, g.ridge * 0.35, skin * 1.08)
    _over(img, g.nose_tip * 0.45, skin * 0.86)
    _over(img, g.nostril, skin * 0.45)
    _over(img, g.eye, np.array([240.0, 240.0, 236.0]))
    _over(img, g.iris, np.asarray(ident.iris))
    _over(img, g.pupil, np.array([15.0, 12.0, 12.0]))
    _over(img, g.lid, skin * 0.55)
    _over(img, g.brow * g.face, hair * 0.8)
    _over(img, g.beard * (1 - g.lips), hair * 0.85)
    _over(img, g.lips, _lip_colour(spec))
    _over(img, g.mouth_inner, np.array([70.0, 20.0, 25.0]))
    _over(img, g.teeth, np.array([235.0, 232.0, 220.0]))
    _over(img, g.hair_front, hair)
    # Lighting acts on the head (face, neck, hair), not on the background.
    head = np.clip(g.face + g.neck + g.hair_back, 0, 1)
    shade = g.skin_normal_light(st.light_azimuth, st.light_strength)
    img *= (1 - head + head * shade)[..., None]
    if st.glasses:
        _over(img, g.lens * 0.18, np.array([180.0, 200.0, 220.0]))
        _over(img, g.glasses, np.asarray(st.glasses_colour))
    img = np.clip(img, 0, 255)
    if image_size != S:
        f = S // image_size
        if f * image_size != S:
            raise ValueError(f"render_size {S} must be a multiple of image_size {image_size}")
        img = img.reshape(image_size, f, image_size, f, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


def conflict_mask(target: FaceSpec, reference: FaceSpec, size: int, dilate_px: int = 1) -> np.ndarray:
    """Exact ground-truth conflict mask of `reference` w.r.t. `target`, in the reference's pixel grid.

    Returns (size, size) uint8 by the mask contract: 255 outside the reference's face skin (background,
    hair, neck), 1 where the reference's local state differs from the target's (the footprint of both
    states, drawn at the reference's pose), 0 elsewhere on the face.
    """
    g_ref = _Geometry(reference, size)
    g_tgt_state = _Geometry(reference, size, state=target.state)  # target's state at the ref's pose
    face = (g_ref.face >= 0.5) & (g_ref.hair_front < 0.5)
    conflict = np.zeros((size, size), dtype=bool)
    for kind in conflict_kinds(target, reference):
        if kind == "mouth":
            # Both states' lips, drawn at the reference's pose.
            region = np.maximum(g_ref.lips, g_tgt_state.lips)
        elif kind == "eyes":
            region = g_ref.eye_region
        elif kind == "glasses":
            region = g_ref.glasses_region
        else:  # beard
            region = g_ref.beard_region
        conflict |= region >= 0.5
    if dilate_px > 0:
        conflict = _dilate(conflict, dilate_px)
    mask = np.full((size, size), MASK_IGNORE, dtype=np.uint8)
    mask[face] = MASK_CONSISTENT
    mask[conflict & face] = MASK_CONFLICT
    # A conflicting accessory that leaves the face outline (glasses rims) is still a conflict.
    mask[conflict & ~face & (g_ref.face >= 0.5)] = MASK_CONFLICT
    return mask


def conflict_kinds(target: FaceSpec, reference: FaceSpec) -> list[str]:
    """Which local states differ between a target and its reference (the mask's conflict types)."""
    t, r = target.state, reference.state
    kinds = []
    if t.expression != r.expression or t.lip != r.lip:
        kinds.append("mouth")
    if t.eyes_open != r.eyes_open:
        kinds.append("eyes")
    if t.glasses != r.glasses:
        kinds.append("glasses")
    if t.beard != r.beard:
        kinds.append("beard")
    return kinds


def conflict_type_masks(target: FaceSpec, reference: FaceSpec, size: int) -> dict[str, np.ndarray]:
    """Per conflict type, the boolean footprint in the reference's grid (for per-type accuracy)."""
    out = {}
    for kind in conflict_kinds(target, reference):
        out[kind] = (
            conflict_mask(
                FaceSpec(target.identity, _only(reference.state, target.state, kind)), reference, size
            )
            == MASK_CONFLICT
        )
    return out


def _only(ref_state: State, tgt_state: State, kind: str) -> State:
    """The reference's state with only `kind` taken from the target (isolates one conflict type)."""
    d = asdict(ref_state)
    src = asdict(tgt_state)
    keys = {
        "mouth": ("expression", "lip"),
        "eyes": ("eyes_open",),
        "glasses": ("glasses",),
        "beard": ("beard",),
    }[kind]
    for k in keys:
        d[k] = src[k]
    d["glasses_colour"] = tuple(d["glasses_colour"])
    c0, c1, a = d["background"]
    d["background"] = (tuple(c0), tuple(c1), a)
    return State(**d)


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy > r * r:
                continue
            shifted = np.zeros_like(m)
            ys = slice(max(dy, 0), m.shape[0] + min(dy, 0))
            yd = slice(max(-dy, 0), m.shape[0] + min(-dy, 0))
            xs = slice(max(dx, 0), m.shape[1] + min(dx, 0))
            xd = slice(max(-dx, 0), m.shape[1] + min(-dx, 0))
            shifted[yd, xd] = m[ys, xs]
            out |= shifted
    return out


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
