"""pipelines.malloc: glibc keeps the memory a step frees (fewer page faults), the same bytes either way,
set by `import stages` and the tests, off with REFFACE_MALLOC=0, a user's GLIBC_TUNABLES kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pipelines.malloc import SWITCH, TUNABLES, _mallopt, keep_freed_memory

needs_glibc = pytest.mark.skipif(_mallopt() is None, reason="the C library has no mallopt")


def _run(code: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", SWITCH)}
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


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


# Twelve training steps of a small front end: the page faults of the last ten (a training step frees its
# activations and allocates them again), and a digest of the weights.
TRAIN = """
import stages
import hashlib, json, resource, torch
from models.pathways import FrontEnd
torch.manual_seed(0)
torch.set_num_threads(2)
net = FrontEnd(16)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(1)
def step():
    x = torch.rand(8, 3, 64, 64, generator=g) * 2 - 1
    loss = torch.nn.functional.mse_loss(net(x), x.flip(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
h = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()
print(json.dumps({"faults": faults, "digest": h}))
"""


@needs_glibc
def test_a_training_step_reuses_freed_memory_and_computes_the_same_bytes():
    """Measured on the 2-core machine: 256 faults with it, 60,282 without; the weights byte-identical."""
    on = _run(TRAIN)
    off = _run(TRAIN, **{SWITCH: "0"})
    assert on["digest"] == off["digest"]
    assert off["faults"] > 10 * on["faults"], (on, off)
