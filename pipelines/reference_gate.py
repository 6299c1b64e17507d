"""The reference gate: how much the references may change a restoration, from how degraded its input is.

A restoration from a mildly degraded photo needs little from the references: the photo itself shows
who it is. The gate weighs the reference readout (models.pathways.ReferenceReadout, the head's
reference evidence Δ) per image by

    α(s) = clip((s_sharp − s) / (s_sharp − s_blurred), 0, 1),    s = mean |∇² grey(input)|

the input's own sharpness (uint8 units, at the model's resolution): references at full weight on inputs
as blurred as a typical severe one (s ≤ s_blurred), not at all on inputs sharp enough that they did not
help (s ≥ s_sharp), linearly between. For 0 < α the references' tokens take part in the attention and
α multiplies Δ (`Conditioning.ref_scale`); where the gate is shut (α = 0) the restorer leaves the image's
references out altogether, so that it is restored exactly as in the blind mode. The fit below assumes the
gated gain is α·δ, which is zero at α = 0; with the tokens still attending it was not: on the moderate set
(every input shut) 2 and 3 references − blind were −0.0001 [−0.0002, −0.0000] GT-ID and −0.02 dB, the
tokens' own effect (docs/results.md, "More people in the album").

`calibrate` fits the two constants on the validation split, never on the evaluation targets. Each
evaluation preset degrades the validation targets (sample i with default_rng(seed + i)); each target is
restored blind and with its first reference (gate open), and δ_i = cos(out_1ref, gt) − cos(out_blind, gt)
is measured with the model's own (primary) identity encoder. s_blurred is the lowest per-preset median of
s. s_sharp is the threshold whose gate gives the validation targets the largest total gain, Σ_i α(s_i)·δ_i
(α taken as scaling the gain), searched over s_blurred and every validation s above it, among the
thresholds under which **no preset loses**: each preset's mean gated gain, mean_i α(s_i)·δ_i over its own
targets, is at least zero (references must not hurt any degradation regime to help another). A tie keeps
the lower (the stricter gate). If the references' full weight gains at least as much and loses no
preset, there is no gate (α = 1); if no admissible threshold gains anything, the gate is shut
(s_sharp = s_blurred = 0: α = 0 on every input).

A least-squares line δ ≈ a + b·log s over all presets is recorded beside the gate (its slope is in the
report). The first version of the gate took s_sharp where that line crosses zero; with two evaluation
presets the line only joins two clusters, and its crossing can lie where no validation target says the
references help (docs/results.md: it opened the gate on the sharpest moderate inputs of a model that
reads its input's sharpness). The largest total gain alone, without the per-preset condition, traded the
moderate preset for the severe one on a model sampled with 4 steps: s_sharp 16.4, the moderate
validation targets' mean gated gain −0.0008, and on the moderate test set 1 reference − blind −0.0007
[−0.0012, −0.0003] (docs/results.md, "The gate's fit").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from pipelines.degradations import get_preset
from pipelines.evaluation import cosine, embed
from pipelines.shards import decode_sample, iter_raw, shard_paths


@dataclass(frozen=True)
class ReferenceGate:
    """α(s) of the module docstring (s_blurred ≤ s_sharp)."""

    sharp: float
    blurred: float

    def alpha(self, images: list[np.ndarray]) -> np.ndarray:
        """(B,) float32 weights of the reference readout for uint8 RGB images at the model's resolution."""
        return self.alpha_of(sharpness(images)).astype(np.float32)

    def alpha_of(self, s: np.ndarray) -> np.ndarray:
        """α of sharpness values `s` (float64)."""
        span = max(self.sharp - self.blurred, 1e-6)
        return np.clip((self.sharp - np.asarray(s, np.float64)) / span, 0.0, 1.0)

    def as_dict(self) -> dict:
        return {"statistic": "sharpness", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ReferenceGate:
        if d.get("statistic") != "sharpness":
            raise ValueError(f"reference gate: unknown statistic {d.get('statistic')!r} (valid: sharpness)")
        return cls(d["sharp"], d["blurred"])


def sharpness(images: list[np.ndarray]) -> np.ndarray:
    """(B,) mean |Laplacian| of each uint8 RGB image's grey version (lower: blurrier). The model's
    degradation embedding computes the same statistic in torch (models.pathways.sharpness_tensor)."""
    out = []
    for x in images:
        grey = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY).astype(np.float64)
        out.append(np.abs(cv2.Laplacian(grey, cv2.CV_64F)).mean())
    return np.array(out, np.float64)


def fit(s: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> tuple[ReferenceGate | None, dict]:
    """The gate from per-preset sharpness `s` and reference gains `delta` (module docstring), None when
    it stays open, and the fit's record (the line's slope and intercept, the validation's total gain
    with the gate and with the references at full weight, each preset's mean gain under the gate)."""
    keys = sorted(s)
    sv = np.concatenate([s[k] for k in keys]).astype(np.float64)
    dv = np.concatenate([delta[k] for k in keys]).astype(np.float64)
    x = np.log(np.maximum(sv, 1e-6))
    record: dict = {
        "slope_per_log_s": None,
        "intercept": None,
        "gain_gated": None,
        "gain_open": None,
        "mean_gain_gated": None,
    }
    if len(sv) == 0:
        return None, record
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = (float(v) for v in np.polyfit(x, dv, 1))
        record.update(slope_per_log_s=slope, intercept=intercept)

    def per_preset(gate: ReferenceGate | None) -> dict[str, float]:
        """Each preset's mean gain under `gate` (None: full weight)."""
        return {
            k: float(
                ((1.0 if gate is None else gate.alpha_of(s[k])) * np.asarray(delta[k], np.float64)).mean()
            )
            for k in keys
            if len(s[k])
        }

    blurred = min(float(np.median(s[k])) for k in keys if len(s[k]))
    best, best_gain = None, 0.0
    for t in np.unique(np.concatenate([[blurred], sv[sv > blurred]])):  # ascending: a tie keeps the lower
        gate = ReferenceGate(float(t), blurred)
        gain = float((gate.alpha_of(sv) * dv).sum())
        if gain > best_gain and min(per_preset(gate).values()) >= 0:  # no preset loses
            best, best_gain = gate, gain
    open_gain = float(dv.sum())
    record.update(gain_gated=round(best_gain, 6), gain_open=round(open_gain, 6))
    if open_gain >= best_gain and open_gain > 0 and min(per_preset(None).values()) >= 0:  # no gate
        record.update(gain_gated=round(open_gain, 6), mean_gain_gated=_rounded(per_preset(None)))
        return None, record
    if best is None:  # no admissible threshold gains anything: the references are shut out
        record["mean_gain_gated"] = {k: 0.0 for k in keys}
        return ReferenceGate(0.0, 0.0), record
    record["mean_gain_gated"] = _rounded(per_preset(best))
    return best, record


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in d.items()}


def validation_samples(shards: str, preset: str, seed: int, limit: int) -> list[dict]:
    """The validation split's targets with at least one reference (the first `limit`, 0 = all), sample i
    of the split degraded by `preset` with default_rng(seed + i)."""
    fn, out = get_preset(preset), []
    for i, raw in enumerate(iter_raw(shard_paths(shards, "val"))):
        if json.loads(raw["meta.json"])["ref_count"] < 1:
            continue
        s = decode_sample(raw)
        s["lq"], _ = fn(s["gt"], np.random.default_rng(seed + i))
        out.append(s)
        if limit and len(out) == limit:
            break
    return out


def calibrate(
    restorer,
    shards: str,
    presets: dict[str, str],
    seed: int,
    limit: int,
    border: float,
    batch_size: int = 16,
):
    """(gate, record): the gate fitted with `restorer` (its gate open; batches of `batch_size`) on the
    validation split of `shards` degraded by each of `presets` ({name: preset}); the record holds the
    fit and, per preset, the number of targets, the quantiles of s and the mean reference gain. A
    validation split without a target that has a reference gives no gate (α = 1) and says so in the
    record's `reason`."""

    def restore(lq, refs):
        return restorer.restore_in_batches(lq, refs, batch_size, gate=False)

    s, delta, per = {}, {}, {}
    for name, preset in sorted(presets.items()):
        samples = validation_samples(shards, preset, seed, limit)
        if not samples:
            reason = f"{shards}: the validation split has no target with a reference to fit the gate on"
            return None, {
                "slope_per_log_s": None,
                "intercept": None,
                "gain_gated": None,
                "gain_open": None,
                "sets": {},
                "gate": None,
                "reason": reason,
            }
        lq = [x["lq"] for x in samples]
        gt = embed(restorer.encoder, np.stack([x["gt"] for x in samples]), border)
        blind = restore(lq, [[] for _ in samples])
        one = restore(lq, [x["refs"][:1] for x in samples])
        e_blind, e_one = embed(restorer.encoder, blind, border), embed(restorer.encoder, one, border)
        s[name], delta[name] = sharpness(lq), cosine(e_one, gt) - cosine(e_blind, gt)
        per[name] = {
            "preset": preset,
            "n": len(samples),
            "s_quantiles_10_50_90": [round(float(q), 4) for q in np.quantile(s[name], [0.1, 0.5, 0.9])],
            "mean_gain_1ref": round(float(delta[name].mean()), 4),
        }
    gate, record = fit(s, delta)
    return gate, {**record, "sets": per, "gate": None if gate is None else gate.as_dict()}


def write_gate(bundle: str | Path, gate: ReferenceGate) -> None:
    """Record `gate` in the bundle's bundle.json (read back by pipelines.restorer.Restorer)."""
    meta_file = Path(bundle) / "bundle.json"
    meta = json.loads(meta_file.read_text())
    meta["reference_gate"] = gate.as_dict()
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
