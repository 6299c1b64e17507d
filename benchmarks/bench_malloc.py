"""What keeping freed memory in the process (pipelines.malloc) saves on a training step, and that it
computes the same bytes.

    python benchmarks/bench_malloc.py [--steps 60] [--repeats 2] [--width 48] [--batch 16] [--size 64]

Runs the front end's training step (`train_front`'s shape by default: width 48, batch 16, 64 px; random
inputs, so no data is needed) in fresh subprocesses, with glibc's thresholds (`import stages`) and
without them (REFFACE_MALLOC=0), alternating, `--repeats` times each. Prints per run: wall seconds of the
steps, user and system CPU seconds, minor page faults, and a digest of the weights; then the median ratio
with/without. The machine's speed drifts between runs (a shared VM), which the alternation and the
system-time and fault counts (not wall time alone) are there to see through.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import stages
import hashlib, json, resource, sys, time, torch
from models.pathways import FrontEnd
steps, width, batch, size = map(int, sys.argv[1:5])
torch.manual_seed(0)
torch.set_num_threads(2)
net = FrontEnd(width)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(1)
def step():
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    loss = torch.nn.functional.mse_loss(net(x), x.flip(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()[:16]
print(json.dumps({"wall": t1 - t0, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                  "faults": r1.ru_minflt - r0.ru_minflt, "digest": digest}))
"""


def run(on: bool, steps: int, width: int, batch: int, size: int) -> dict:
    """One fresh process: `steps` front-end steps after a warm-up one, with (`on`) or without the thresholds;
    its wall, user and system seconds, minor faults and weight digest. tests/test_malloc.py calls it too."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["REFFACE_MALLOC"] = "1" if on else "0"
    argv = [str(a) for a in (steps, width, batch, size)]
    p = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    rows = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (False, True):
            r = run(on, args.steps, args.width, args.batch, args.size)
            rows[on].append(r)
            print(
                f"{'kept  ' if on else 'glibc '} {args.steps} steps: wall {r['wall']:6.1f} s  user {r['user']:6.1f} s"
                f"  sys {r['sys']:5.1f} s  minor faults {r['faults']:>9,}  weights {r['digest']}"
            )
    digests = {r["digest"] for rs in rows.values() for r in rs}

    def med(on, k):
        return statistics.median(r[k] for r in rows[on])

    print(
        f"kept / glibc's defaults (medians): wall {med(True, 'wall') / med(False, 'wall'):.2f}x, "
        f"system time {med(True, 'sys') / med(False, 'sys'):.2f}x, "
        f"faults {med(True, 'faults') / max(med(False, 'faults'), 1):.3f}x; "
        f"weights {'byte-identical' if len(digests) == 1 else 'DIFFER'} across all {2 * args.repeats} runs"
    )


if __name__ == "__main__":
    main()
