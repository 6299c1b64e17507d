"""The reference-count schedule of IConFace training (supplement: 30 % none, 30 % one, 20 % two, 20 % three).

For each drawn target a count k is drawn from the schedule, then k DISTINCT references are drawn from
the target's available ones (never duplicated). When the target has fewer than k, all it has are
used and the shortfall is recorded. Draws are a pure function of (seed, key, epoch).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

DEFAULT_SCHEDULE = (0.3, 0.3, 0.2, 0.2)


@dataclass(frozen=True)
class RefDraw:
    wanted: int  # count drawn from the schedule
    chosen: tuple[int, ...]  # indices into the target's reference list (distinct, sorted by draw order)

    @property
    def shortfall(self) -> int:
        return self.wanted - len(self.chosen)


def check_schedule(schedule: tuple[float, ...], max_refs: int) -> None:
    if len(schedule) != max_refs + 1:
        raise ValueError(
            f"reference schedule has {len(schedule)} entries; needs max_refs + 1 = {max_refs + 1} (counts 0..{max_refs})"
        )
    if any(p < 0 for p in schedule) or abs(sum(schedule) - 1.0) > 1e-6:
        raise ValueError(f"reference schedule {schedule} must be non-negative and sum to 1")


def draw_refs(available: int, schedule: tuple[float, ...], seed: int, key: str, epoch: int) -> RefDraw:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(key.encode()), epoch & 0xFFFFFFFF, 0xFEF])
    wanted = int(rng.choice(len(schedule), p=np.asarray(schedule) / sum(schedule)))
    k = min(wanted, available)
    chosen = tuple(int(i) for i in rng.permutation(available)[:k]) if k else ()
    return RefDraw(wanted, chosen)
