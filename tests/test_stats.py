import numpy as np

from pipelines.stats import paired_bootstrap


def test_a_clear_shift_is_higher_and_noise_is_no_difference():
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 60)
    up = paired_bootstrap(b + 0.5 + rng.normal(0, 0.1, 60), b)
    assert up.verdict == "higher" and up.lo > 0.4 and up.hi < 0.6 and up.n == 60
    same = paired_bootstrap(b + rng.normal(0, 0.1, 60), b)
    assert same.verdict == "no difference" and same.lo < 0 < same.hi


def test_pairing_removes_the_between_target_spread():
    """Unpaired, a 0.05 gain on targets spread over ±1 would be invisible; paired it is clear."""
    b = np.linspace(-1, 1, 40)
    r = paired_bootstrap(b + 0.05, b)
    assert r.verdict == "higher" and abs(r.mean - 0.05) < 1e-12


def test_fixed_seed_and_nan_pairs_dropped():
    a, b = np.array([1.0, 2.0, np.nan, 4.0]), np.array([0.5, 1.0, 1.0, 3.0])
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    assert paired_bootstrap(a, b).n == 3


def test_a_difference_below_the_printed_resolution_is_no_difference():
    """A constant +1e-6 shift has a zero-width interval above zero, but prints as +0.0000: no win."""
    b = np.linspace(0, 1, 20)
    assert paired_bootstrap(b + 1e-6, b).verdict == "no difference"
