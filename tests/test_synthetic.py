import numpy as np

from pipelines.synthetic import (
    MASK_CONFLICT,
    MASK_IGNORE,
    FaceSpec,
    State,
    conflict_kinds,
    conflict_mask,
    conflict_type_masks,
    face_spec,
    render,
    sample_identity,
)


def _with(state: State, **kw) -> State:
    d = {**state.__dict__, **kw}
    return State(**d)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    a = render(face_spec(7, "album", 3, 1), 128, 64)
    b = render(face_spec(7, "album", 3, 1), 128, 64)
    c = render(face_spec(8, "album", 3, 1), 128, 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert a.tobytes() == b.tobytes()
    assert np.abs(a.astype(int) - c).mean() > 5


def test_identity_traits_are_fixed_and_states_vary():
    s = [face_spec(7, "album", 5, j) for j in range(6)]
    assert all(x.identity == s[0].identity for x in s)
    assert len({(x.state.yaw, x.state.expression, x.state.glasses) for x in s}) > 1
    assert sample_identity(7, "album", 5) != sample_identity(7, "album", 6)
    assert sample_identity(7, "album", 5) != sample_identity(7, "encoder", 5)  # pools are disjoint


def test_resolution_is_configurable():
    assert render(face_spec(1, "album", 0, 0), 96, 48).shape == (48, 48, 3)
    assert render(face_spec(1, "album", 0, 0), 128, 128).shape == (128, 128, 3)


def test_spec_json_round_trip_renders_identically():
    spec = face_spec(7, "album", 2, 3)
    again = FaceSpec.from_json(spec.to_json())
    assert again == spec
    assert render(again).tobytes() == render(spec).tobytes()


def test_mask_contract_and_no_conflict_for_identical_state():
    spec = face_spec(7, "album", 1, 0)
    m = conflict_mask(spec, spec, 64)
    assert m.dtype == np.uint8 and m.shape == (64, 64)
    assert set(np.unique(m)) == {0, MASK_IGNORE}
    assert conflict_kinds(spec, spec) == []
    # corners are background: ignore
    assert m[0, 0] == MASK_IGNORE and m[-1, -1] == MASK_IGNORE


def test_each_state_difference_marks_its_own_region():
    ref = face_spec(7, "album", 1, 0)
    ref = FaceSpec(
        ref.identity,
        _with(ref.state, glasses=False, beard=False, eyes_open=True, expression="closed", lip="natural"),
    )
    cases = {
        "glasses": _with(ref.state, glasses=True),
        "eyes": _with(ref.state, eyes_open=False),
        "mouth": _with(ref.state, expression="open"),
        "beard": _with(ref.state, beard=True),
    }
    g = ref  # reference geometry for region checks
    for kind, tstate in cases.items():
        target = FaceSpec(ref.identity, tstate)
        assert conflict_kinds(target, ref) == [kind]
        m = conflict_mask(target, ref, 64)
        conflict = m == MASK_CONFLICT
        assert conflict.sum() > 10, kind
        ys, xs = np.nonzero(conflict)
        cy = ys.mean() / 64
        if kind in ("glasses", "eyes"):
            assert cy < 0.5, (kind, cy)  # upper face
        else:
            assert cy > 0.5, (kind, cy)  # lower face
    # The union of types equals the mask of a pair that differs in all of them.
    all_t = FaceSpec(
        ref.identity, _with(ref.state, glasses=True, eyes_open=False, expression="open", beard=True)
    )
    per = conflict_type_masks(all_t, g, 64)
    assert set(per) == {"mouth", "eyes", "glasses", "beard"}
    union = np.any(np.stack(list(per.values())), 0)
    assert np.array_equal(union, conflict_mask(all_t, g, 64) == MASK_CONFLICT)


def test_mask_lives_in_the_reference_grid():
    ref = face_spec(7, "album", 2, 0)
    left = FaceSpec(ref.identity, _with(ref.state, shift_x=-0.07, glasses=True))
    right = FaceSpec(ref.identity, _with(ref.state, shift_x=0.07, glasses=True))
    target = FaceSpec(ref.identity, _with(ref.state, glasses=False))
    ml, mr = conflict_mask(target, left, 64), conflict_mask(target, right, 64)
    xl = np.nonzero(ml == 1)[1].mean()
    xr = np.nonzero(mr == 1)[1].mean()
    assert xr - xl > 3  # moves with the reference, not with the target


def test_aligned_framing_keeps_every_other_draw():
    """FFHQ-aligned photos (the default) vary roll, scale and shift only by landmark noise; every other
    state (yaw, expression, glasses, ...) is the same draw as in the unaligned framing."""
    import pytest

    from pipelines.synthetic import FRAMINGS, sample_state

    for j in range(20):
        a, w = sample_state(7, "album", 4, j), sample_state(7, "album", 4, j, "wild")
        assert abs(a.roll) <= 0.02 and 0.98 <= a.scale <= 1.02 and abs(a.shift_x) <= 0.01
        assert _with(a, roll=w.roll, scale=w.scale, shift_x=w.shift_x, shift_y=w.shift_y) == w
    assert max(abs(sample_state(7, "album", 4, j, "wild").roll) for j in range(20)) > 0.05
    assert set(FRAMINGS) == {"aligned", "wild"}
    with pytest.raises(ValueError, match="unknown framing 'tilted'"):
        sample_state(7, "album", 4, 0, "tilted")


def test_identity_cues_fine_shares_colour_and_shape_mixed_keeps_the_first_draws():
    """`fine` (the default): people share a few skin tones, hair colours and a narrow face shape, and
    differ in marks, brows and iris; `mixed` reproduces the original draws (before `identity_cues`)."""
    import pytest

    from pipelines.synthetic_people import _HAIR_COLOURS, _SKIN_TONES, IDENTITY_CUES

    fine = [sample_identity(7, "album", i) for i in range(60)]
    mixed = [sample_identity(7, "album", i, "mixed") for i in range(60)]
    # `mixed`'s person 5 (values recorded before `identity_cues` existed)
    assert mixed[5].skin == (184.9, 116.42, 82.44) and mixed[5].moles == ((0.3311, 0.3164, 0.0487),)

    def nearest(colour, palette):
        return int(np.argmin(((palette - np.asarray(colour)) ** 2).sum(1)))

    assert {nearest(f.skin, _SKIN_TONES) for f in fine} <= set(IDENTITY_CUES["fine"]["skin"])
    assert {nearest(f.hair, _HAIR_COLOURS) for f in fine} <= set(IDENTITY_CUES["fine"]["hair"])
    assert np.ptp([f.face_aspect for f in fine]) < 0.5 * np.ptp([m.face_aspect for m in mixed])
    assert min(len(f.moles) for f in fine) >= 2 and len({f.moles for f in fine}) == 60  # marks identify
    assert fine[5] == face_spec(7, "album", 5, 2).identity  # the default
    with pytest.raises(ValueError, match="unknown identity cues 'coarse'"):
        sample_identity(7, "album", 0, "coarse")


def test_masks_from_a_kept_reference_geometry_equal_fresh_ones():
    """conflict_mask keeps each reference's geometry for the next pairs (shards draws one mask per
    (target, reference) pair): masks drawn after others, with the geometry reused, equal masks drawn
    from a cleared cache, for every pair of a small album and more than one size."""
    from pipelines.synthetic import _reference_geometry

    specs = [face_spec(7, "album", p, j) for p in range(2) for j in range(4)]
    pairs = [(t, r, size) for size in (32, 64) for t in specs for r in specs if r is not t]
    _reference_geometry.cache_clear()
    kept = [conflict_mask(t, r, size) for t, r, size in pairs]
    assert _reference_geometry.cache_info().hits > 0
    fresh = []
    for t, r, size in pairs:
        _reference_geometry.cache_clear()
        fresh.append(conflict_mask(t, r, size))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(kept, fresh))
    assert any((m == MASK_CONFLICT).any() for m in kept)
