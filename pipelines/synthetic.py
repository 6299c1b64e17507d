"""Rendering of the synthetic people (`pipelines.synthetic_people`) and their exact conflict masks.

Rendering is vectorised numpy over a pixel grid: every part is a soft signed-distance coverage
(about one pixel of anti-aliasing), composited back to front, at `render_size` and area-downsampled to
`image_size`. Everything derives from integer seeds, so the same seed gives byte-identical images.

Geometry lives in one place (`_Geometry`): the renderer and `conflict_mask` evaluate the same shapes,
so a mask is exact in the reference's pixel grid at any size. The people's names and specs are
re-exported here, so `from pipelines.synthetic import face_spec, render` gives both halves.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict

import numpy as np

from pipelines.synthetic_people import (  # noqa: F401  (re-exported: the source's public names)
    _LIP_COLOURS,
    CONFLICT_TYPES,
    EXPRESSIONS,
    FRAMINGS,
    IDENTITY_CUES,
    MASK_CONFLICT,
    MASK_CONSISTENT,
    MASK_IGNORE,
    POOLS,
    FaceSpec,
    Identity,
    State,
    face_spec,
    identity_name,
    image_name,
    images_per_identity,
    sample_identity,
    sample_state,
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
        self._outline()
        self._eyes()
        self._nose()
        self._mouth()
        self._beard()
        self._glasses()
        self._marks()

    def _outline(self) -> None:
        """Face outline (identity shape, turned with yaw), hair behind and over it, neck."""
        ident, x, y = self.ident, self.x, self.y
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
        self._r, self._fx = r, fx  # the outline's radius map and yaw offset (the beard reuses them)

    def _eyes(self) -> None:
        """Eyes (depth 0.55 for yaw; open or closed lids) and brows above them, and the eye region."""
        ident, st, x, y = self.ident, self.st, self.x, self.y
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

    def _nose(self) -> None:
        """Nose (depth 1.0): tip, nostrils and a ridge."""
        ident, x, y = self.ident, self.x, self.y
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

    def _mouth(self) -> None:
        """Mouth (depth 0.7) in the state's expression: lips, the inside, teeth."""
        st, x, y = self.st, self.x, self.y
        mx, my = self._project(0.0, 0.7), self.nose_y + 0.17
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
        self.mouth_width = mw

    def _beard(self) -> None:
        """Beard region (lower face below the nose, around the mouth) and the beard if the state has one."""
        st, x, y = self.st, self.x, self.y
        r, fa, fx, ny = self._r, self.fa, self._fx, self.nose_y
        (mx, my), mw = self.mouth_centre, self.mouth_width
        bsdf = np.maximum(ny + 0.06 - y, (r - 1.0) * fa)  # below the nose, inside the face
        bsdf = np.maximum(bsdf, -_ellipse_sdf(x, y, mx, my + 0.01, mw * 1.05, 0.07))
        bsdf = np.maximum(bsdf, np.abs(x - fx) - fa * 0.85)
        self.beard_region = _cover(bsdf, self.px) * self.face
        self.beard = self.beard_region if st.beard else np.zeros_like(x)

    def _glasses(self) -> None:
        """Glasses region (two rings and a bridge), lenses, and the glasses if the state has them."""
        st, x, y = self.st, self.x, self.y
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

    def _marks(self) -> None:
        """Fine identity marks on skin: moles, freckles, a scar."""
        ident, x, y = self.ident, self.x, self.y
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


@functools.lru_cache(maxsize=8)
def _reference_geometry(spec: FaceSpec, size: int) -> _Geometry:
    """A reference's own geometry, kept for the next masks of the same reference: `shards` draws one mask
    per (target, reference) pair and a person's photos are each other's references, so consecutive pairs
    share most of them (the embedded default: 8 entries draw each of its 1866 images once, as many as
    unbounded; 4 would draw 6850). A 512² geometry holds about 35 MB, hence the small bound. Read-only:
    nothing assigns to a `_Geometry` after its constructor."""
    return _Geometry(spec, size)


def conflict_mask(target: FaceSpec, reference: FaceSpec, size: int, dilate_px: int = 1) -> np.ndarray:
    """Exact ground-truth conflict mask of `reference` w.r.t. `target`, in the reference's pixel grid.

    Returns (size, size) uint8 by the mask contract: 255 outside the reference's face skin (background,
    hair, neck), 1 where the reference's local state differs from the target's (the footprint of both
    states, drawn at the reference's pose), 0 elsewhere on the face.
    """
    g_ref = _reference_geometry(reference, size)
    face = (g_ref.face >= 0.5) & (g_ref.hair_front < 0.5)
    conflict = np.zeros((size, size), dtype=bool)
    for kind in conflict_kinds(target, reference):
        if kind == "mouth":
            # Both states' lips, drawn at the reference's pose (the target's state at the ref's pose).
            g_tgt_state = _Geometry(reference, size, state=target.state)
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
