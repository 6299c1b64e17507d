"""The MLflow side of a trained restorer: the pyfunc model and the promotion gate.

Pyfunc input: a DataFrame with `lq` (a base64-encoded PNG/JPEG of the degraded face) and optional
`ref1`, `ref2`, `ref3` (base64 images; empty or missing = no reference). Output: a DataFrame with
`restored` (base64 PNG) per row. The model rebuilds the network from the bundle's trainable weights and
its configured backbone (pipelines/restorer.py); it is not a torch.export graph (FACTS: fixed sizes).

Gate: the challenger's metrics against the champion's, by name "set/row/metric" in the evaluate
stage's results. The primary metric must not fall below the champion's + `min_gain`; every guard
metric must not regress by more than its margin (copy scores are lower-is-better). Without a
champion the challenger is promoted.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

try:  # the pyfunc base class; imported lazily elsewhere so that pipelines do not need mlflow at import
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object

REF_COLUMNS = ("ref1", "ref2", "ref3")
LOWER_IS_BETTER = ("copy_score",)


def encode_image(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(text: str, name: str) -> np.ndarray:
    from pipelines.restorer import InputError, check_image

    try:
        raw = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.mode in ("L", "LA", "I", "I;16", "F", "1"):
                raise InputError(f"{name}: a grayscale image ({im.mode}); the model restores colour photos")
            arr = np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{name}: not a base64-encoded image ({exc.__class__.__name__}: {exc})") from exc
    return check_image(arr, name)


class RestorerModel(PythonModel):
    """MLflow pyfunc around `Restorer`; artifact `bundle` is the restorer bundle folder."""

    def load_context(self, context) -> None:
        from pipelines.restorer import Restorer

        self.restorer = Restorer(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        if "lq" not in model_input.columns:
            raise ValueError("input needs a column `lq` (base64 image of the degraded face)")
        extra = [c for c in model_input.columns if c.startswith("ref") and c not in REF_COLUMNS]
        if extra:
            raise ValueError(f"columns {extra}: at most 3 references (ref1, ref2, ref3)")
        out = []
        for i, row in enumerate(model_input.to_dict("records")):
            lq = decode_image(row["lq"], f"row {i} lq")
            refs = [
                decode_image(row[c], f"row {i} {c}")
                for c in REF_COLUMNS
                if c in row and isinstance(row[c], str) and row[c]
            ]
            out.append(encode_image(self.restorer.restore(lq, refs)))
        return pd.DataFrame({"restored": out})


@dataclass(frozen=True)
class Gate:
    primary: str = "severe/1 reference/ref_id_evaluator"
    min_gain: float = 0.0
    guards: dict[str, float] = field(default_factory=dict)  # "set/row/metric" -> allowed regression


def lookup(metrics: dict, name: str) -> float | None:
    s, row, m = name.split("/")
    v = metrics.get("sets", {}).get(s, {}).get(row, {}).get(m)
    return None if v is None else float(v)


def flatten(metrics: dict) -> dict[str, float]:
    """{"set/row/metric": value} of the evaluate stage's numeric results."""
    out = {}
    for s, rows in metrics.get("sets", {}).items():
        for row, ms in rows.items():
            for m, v in ms.items():
                if isinstance(v, int | float) and v is not None:
                    out[f"{s}/{row}/{m}"] = float(v)
    return out


def decide(
    challenger: dict[str, float], champion: dict[str, float] | None, gate: Gate
) -> tuple[bool, list[str]]:
    """(promote?, reasons) comparing flattened metrics."""
    if champion is None:
        return True, ["no champion yet: the first model becomes champion"]
    reasons, ok = [], True
    c, h = challenger.get(gate.primary), champion.get(gate.primary)
    if c is None:
        return False, [f"primary metric {gate.primary} is missing from the challenger's evaluation"]
    if h is None:
        reasons.append(f"primary {gate.primary}: champion has no value; challenger {c:.4f} accepted")
    elif c < h + gate.min_gain:
        ok = False
        reasons.append(f"primary {gate.primary}: {c:.4f} < champion {h:.4f} + min_gain {gate.min_gain}")
    else:
        reasons.append(f"primary {gate.primary}: {c:.4f} >= champion {h:.4f} + min_gain {gate.min_gain}")
    for name, margin in sorted(gate.guards.items()):
        c, h = challenger.get(name), champion.get(name)
        if c is None or h is None:
            reasons.append(f"guard {name}: not comparable (challenger {c}, champion {h})")
            continue
        lower = name.split("/")[-1] in LOWER_IS_BETTER
        regress = (c - h) if lower else (h - c)
        if regress > margin:
            ok = False
            reasons.append(f"guard {name}: {c:.4f} vs champion {h:.4f} regresses by {regress:.4f} > {margin}")
        else:
            reasons.append(f"guard {name}: {c:.4f} vs champion {h:.4f} within {margin}")
    return ok, reasons
