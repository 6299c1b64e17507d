import numpy as np
import pytest

from pipelines.refschedule import DEFAULT_SCHEDULE, check_schedule, draw_refs


def test_realised_proportions_match_the_schedule():
    draws = [draw_refs(5, DEFAULT_SCHEDULE, 0, f"t{i}", 0) for i in range(20000)]
    counts = np.bincount([len(d.chosen) for d in draws], minlength=4) / len(draws)
    assert np.allclose(counts, DEFAULT_SCHEDULE, atol=0.012)
    assert all(len(set(d.chosen)) == len(d.chosen) and d.shortfall == 0 for d in draws)  # never duplicated


def test_shortfall_is_recorded_and_nothing_is_duplicated():
    draws = [draw_refs(1, DEFAULT_SCHEDULE, 0, f"t{i}", 0) for i in range(5000)]
    assert max(len(d.chosen) for d in draws) == 1
    short = [d for d in draws if d.wanted > 1]
    assert short and all(d.shortfall == d.wanted - 1 for d in short)
    assert all(draw_refs(0, DEFAULT_SCHEDULE, 0, f"t{i}", 0).chosen == () for i in range(100))


def test_draws_are_reproducible_and_vary_by_epoch():
    a = [draw_refs(4, DEFAULT_SCHEDULE, 1, f"t{i}", 0) for i in range(200)]
    assert a == [draw_refs(4, DEFAULT_SCHEDULE, 1, f"t{i}", 0) for i in range(200)]
    assert a != [draw_refs(4, DEFAULT_SCHEDULE, 1, f"t{i}", 1) for i in range(200)]


def test_configurable_and_checked():
    d = [draw_refs(3, (0.0, 0.0, 0.0, 1.0), 0, f"t{i}", 0) for i in range(50)]
    assert all(len(x.chosen) == 3 for x in d)
    with pytest.raises(ValueError, match="needs max_refs"):
        check_schedule((0.5, 0.5), 3)
    with pytest.raises(ValueError, match="sum to 1"):
        check_schedule((0.5, 0.5, 0.5, 0.5), 3)
