"""pipelines.malloc: glibc keeps the memory a step frees (fewer page faults), the same bytes either way,
set by `import stages` and the tests, off with REFFACE_MALLOC=0, a user's GLIBC_TUNABLES kept."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from pipelines.malloc import SWITCH, TUNABLES, _mallopt, keep_freed_memory

needs_glibc = pytest.mark.skipif(_mallopt() is None, reason="the C library has no mallopt")


@needs_glibc
def test_sets_the_tunables_for_children_and_keeps_a_users_value():
    env: dict[str, str] = {}
    assert keep_freed_memory(env) is True
    assert env == {"GLIBC_TUNABLES": TUNABLES}
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert keep_freed_memory(mine) is True
    assert mine == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}


def test_refface_malloc_0_turns_it_off():
    env = {SWITCH: "0"}
    assert keep_freed_memory(env) is False
    assert env == {SWITCH: "0"}


@needs_glibc
def test_a_training_step_reuses_freed_memory_and_computes_the_same_bytes():
    """Ten steps of a small front end (benchmarks/bench_malloc.py's child) with and without the thresholds:
    the same weights, and the steps fault their activations in again only without them."""
    import bench_malloc

    on = bench_malloc.run(True, steps=10, width=16, batch=8, size=64)
    off = bench_malloc.run(False, steps=10, width=16, batch=8, size=64)
    assert on["digest"] == off["digest"]
    assert off["faults"] > 10 * on["faults"], (on, off)
