"""The MLflow side of a trained restorer: the pyfunc model and the promotion gate.

Pyfunc input: a DataFrame with `lq` (a base64-encoded PNG/JPEG of the degraded face) and optional
`ref1`, `ref2`, `ref3` (base64 images; empty, null or missing = no reference); any other column (a
fourth reference `ref4`, a misspelt name) is refused. Output: a DataFrame with `restored` (base64 PNG)
per row. A bad request raises `InputError` naming the row, the column and the problem; under MLflow it
is also an `MlflowException` with INVALID_PARAMETER_VALUE, so `mlflow models serve` answers HTTP 400
with that message as JSON and no stack trace. Inference params (MLflow `params=`): `guidance_image` (s_i) and
`guidance_context` (s_c) of seed 002's eq. 5 and `ref_ensemble` (its eq. 6), as in `refface restore`;
unset, the bundle's sampler settings apply. The model rebuilds the network from the bundle's trainable weights and
its configured backbone (pipelines/restorer.py); it is not a torch.export graph (an exported graph fixes input sizes).

Gate (`decide`): the challenger against the champion, by name "set/row/metric" in the evaluate
stage's results. The primary metric is compared PAIRED, target by target (the evaluations'
`per_target.json`), with a 95 % bootstrap interval: the challenger is promoted only when the interval
lies above `min_gain`. Every guard metric's mean must not regress by more than its margin (copy scores
are lower-is-better). Without a champion the challenger is promoted.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipelines.quality import LOWER_IS_BETTER as QUALITY_LOWER_IS_BETTER

try:  # the pyfunc base class; imported lazily elsewhere so that pipelines do not need mlflow at import
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object

REF_COLUMNS = ("ref1", "ref2", "ref3")
SAMPLER_PARAMS = ("guidance_image", "guidance_context", "ref_ensemble")  # seed 002's eqs. 5-6
LOWER_IS_BETTER = ("copy_score", *QUALITY_LOWER_IS_BETTER)


def encode_image(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(text: str, name: str) -> np.ndarray:
    """The image of a base64 column, read by the loader ingest and the CLI use (`load_rgb`: EXIF,
    alpha, grayscale replicated). Whitespace in the text is ignored (`base64` wraps its lines); an
    `InputError` names `name` and says whether the text is no base64 or its bytes are no image."""
    from pipelines.images import ImageProblem, load_rgb
    from pipelines.restorer import InputError, check_image

    if not isinstance(text, str):
        raise InputError(f"{name}: expected a base64-encoded image as a string, got {type(text).__name__}")
    text = "".join(text.split())
    if not text:
        raise InputError(f"{name}: empty; expected a base64-encoded image")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error
        raise InputError(f"{name}: not a base64-encoded image ({exc})") from exc
    try:
        arr, _ = load_rgb(name, data=raw)
    except ImageProblem as exc:
        detail = str(exc).removeprefix(f"{name}: ")
        raise InputError(
            f"{name}: its base64 decodes to {len(raw)} bytes that are not a readable image ({detail})"
        ) from exc
    return check_image(arr, name)


def _missing(value) -> bool:
    """An empty cell: None, NaN (a column absent from some records) or the empty string."""
    return (
        value is None
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and not value)
    )


def _as_frame(model_input):
    """The request as a DataFrame: MLflow hands `dataframe_split`/`dataframe_records` over as one,
    `inputs`/`instances` as a dict of columns or a list of records (the model logs no input schema,
    so nothing converted them)."""
    import pandas as pd

    from pipelines.restorer import InputError

    def cell(v):  # MLflow's `inputs` parser gives 0-d numpy arrays for scalars
        return v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v

    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        cols = {
            k: [cell(x) for x in np.atleast_1d(np.asarray(v, dtype=object))] for k, v in model_input.items()
        }
        if len({len(v) for v in cols.values()}) > 1:
            raise InputError(f"input: columns {sorted(map(str, cols))} have different lengths")
        return pd.DataFrame(cols)
    if isinstance(model_input, list | np.ndarray) and all(isinstance(r, dict) for r in model_input):
        return pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in model_input])
    raise InputError(
        f"input: expected a table with columns lq, {', '.join(REF_COLUMNS)} "
        f"(dataframe_split, dataframe_records or inputs), got {type(model_input).__name__}"
    )


def check_columns(columns) -> None:
    """InputError unless `columns` are `lq` and at most the three reference columns."""
    from pipelines.restorer import InputError

    names = [str(c) for c in columns]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise InputError(f"columns {twice}: given more than once")
    if "lq" not in names:
        raise InputError("input needs a column `lq` (base64 image of the degraded face)")
    extra = [c for c in names if re.fullmatch(r"ref\d+", c) and c not in REF_COLUMNS]
    if extra:
        raise InputError(f"columns {extra}: at most 3 references (ref1, ref2, ref3)")
    unknown = [c for c in names if c not in ("lq", *REF_COLUMNS)]
    if unknown:
        raise InputError(f"columns {unknown}: unknown; valid: lq, {', '.join(REF_COLUMNS)}")


_BAD_REQUEST = None


def request_error(exc: ValueError) -> Exception:
    """The exception a bad request raises from `predict`: with mlflow importable an `MlflowException`
    (INVALID_PARAMETER_VALUE, HTTP 400) that is also a ValueError, carrying `exc`'s message; without
    mlflow (the GPU check) `exc` itself.

    MLflow's scoring server answers an `MlflowException` from predict with its JSON
    `{"error_code", "message", ...}` and the mapped status; any other exception becomes a 400 with a
    generic message and the formatted traceback in `stack_trace`. It also rewrites the message of an
    `MlflowException` to "Failed to predict data '<the input frame>'. Error: ..." (the whole
    request's repr, base64 included): the message of this class is written once, so the answer holds
    the project's own message only."""
    global _BAD_REQUEST
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    except ImportError:
        return exc
    if _BAD_REQUEST is None:

        class BadRequest(MlflowException, ValueError):
            @property
            def message(self) -> str:
                return self._message

            @message.setter
            def message(self, value: str) -> None:
                if not hasattr(self, "_message"):  # set by MlflowException.__init__, kept after
                    self._message = value

        _BAD_REQUEST = BadRequest
    return _BAD_REQUEST(str(exc), error_code=INVALID_PARAMETER_VALUE)


class RestorerModel(PythonModel):
    """MLflow pyfunc around `Restorer`; artifact `bundle` is the restorer bundle folder."""

    def load_context(self, context) -> None:
        from pipelines.restorer import Restorer

        self.restorer = Restorer(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        from pipelines.restorer import InputError

        try:
            return self._predict(model_input, params or {})
        except InputError as exc:
            raise request_error(exc) from exc

    def _predict(self, model_input, params: dict):
        import pandas as pd

        from pipelines.restorer import InputError

        frame = _as_frame(model_input)
        check_columns(frame.columns)
        unknown = sorted(set(params) - set(SAMPLER_PARAMS))
        if unknown:
            raise InputError(f"params {unknown}: unknown; valid: {', '.join(SAMPLER_PARAMS)}")
        sampler = {k: params[k] for k in SAMPLER_PARAMS if params.get(k) is not None}
        if "ref_ensemble" in sampler:
            sampler["ref_ensemble"] = bool(sampler["ref_ensemble"])
        out = []
        for i, row in enumerate(frame.to_dict("records")):
            if _missing(row["lq"]):
                raise InputError(f"row {i} lq: empty; expected a base64-encoded image")
            lq = decode_image(row["lq"], f"row {i} lq")
            refs = [decode_image(row[c], f"row {i} {c}") for c in REF_COLUMNS if not _missing(row.get(c))]
            try:
                restored = self.restorer.restore(lq, refs, **sampler)
            except InputError as exc:
                raise InputError(f"row {i}: {exc}") from exc
            out.append(encode_image(restored))
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


TAG_LIMIT = 5000  # MLflow's longest tag value


def evaluation_tag(flat: dict) -> str:
    """A model version's `evaluation` tag: the flat metrics in sorted order, as many whole entries as fit
    MLflow's tag limit (always valid JSON; the full set is the register run's evaluation.json)."""
    kept: dict = {}
    size = 2  # the braces
    for k in sorted(flat):
        entry = len(json.dumps({k: flat[k]})) - 2 + (2 if kept else 0)  # ", " between entries
        if size + entry > TAG_LIMIT:
            break
        kept[k], size = flat[k], size + entry
    return json.dumps(kept, sort_keys=True)


def flatten(metrics: dict) -> dict[str, float]:
    """{"set/row/metric": value} of the evaluate stage's numeric results."""
    out = {}
    for s, rows in metrics.get("sets", {}).items():
        for row, ms in rows.items():
            for m, v in ms.items():
                if isinstance(v, int | float) and v is not None:
                    out[f"{s}/{row}/{m}"] = float(v)
    return out


def target_values(per_target: dict | None, name: str) -> tuple[list[str], list[float]] | None:
    """(target keys, per-target values) of metric "set/row/metric" in an evaluate `per_target.json`."""
    if not per_target:
        return None
    s, row, m = name.split("/")
    block = per_target.get(s, {})
    values = block.get("rows", {}).get(row, {}).get(m)
    return None if values is None else (list(block.get("keys", [])), [float(v) for v in values])


def decide(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    gate: Gate,
    challenger_targets: dict | None = None,
    champion_targets: dict | None = None,
    seed: int = 0,
) -> tuple[bool, list[str]]:
    """(promote?, reasons) of the challenger against the champion.

    Primary: the paired difference challenger − champion of the primary metric on the SAME targets
    (`per_target.json` of both evaluations) with a 95 % bootstrap interval; the challenger is promoted
    only when the whole interval lies above `min_gain` (an interval that includes zero is no
    difference, and no difference is no promotion). Without per-target values for both, or on
    different targets, the models are not comparable and the challenger is refused. Guards: the mean of
    each guard metric must not regress by more than its margin (copy scores are lower-is-better).
    """
    from pipelines.stats import paired_bootstrap

    if champion is None:
        return True, ["no champion yet: the first model becomes champion"]
    reasons, ok = [], True
    if challenger.get(gate.primary) is None:
        return False, [f"primary metric {gate.primary} is missing from the challenger's evaluation"]
    a, b = target_values(challenger_targets, gate.primary), target_values(champion_targets, gate.primary)
    if a is None or b is None:
        return False, [
            f"primary {gate.primary}: no per-target values for "
            f"{'the challenger' if a is None else 'the champion'}; a paired comparison is impossible"
        ]
    if a[0] != b[0]:
        return False, [f"primary {gate.primary}: challenger and champion were evaluated on different targets"]
    d = paired_bootstrap(a[1], b[1], seed=seed)
    if d.lo > gate.min_gain:
        reasons.append(
            f"primary {gate.primary}: challenger − champion {d.text()} on {d.n} paired targets; "
            f"the interval lies above min_gain {gate.min_gain}"
        )
    else:
        ok = False
        reasons.append(
            f"primary {gate.primary}: challenger − champion {d.text()} on {d.n} paired targets; "
            f"the interval does not lie above min_gain {gate.min_gain} (no demonstrated gain)"
        )
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


BLOCKING = ("regresses by", "does not lie above", "is missing", "impossible", "different targets")


def blocking(reasons: list[str]) -> list[str]:
    """The reasons of `decide` that refused a promotion (the phrases it writes for a failed check)."""
    return [r for r in reasons if any(b in r for b in BLOCKING)]


def bundle_sha(bundle) -> str:
    """sha256 over the bundle's files (relative names and bytes, sorted): the registry's identity of a model."""
    import hashlib
    from pathlib import Path

    bundle = Path(bundle)
    h = hashlib.sha256()
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        h.update(f.relative_to(bundle).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def model_signature():
    """The pyfunc signature: the output column and the sampler params, and NO input schema.

    MLflow enforces an input schema before `predict` (mlflow/models/utils.py `_enforce_schema`) and
    drops every column the schema does not name, with a warning in the server's log only: a fourth
    reference `ref4` or a misspelt `ref_1` would vanish and the row be restored without it. Without
    an input schema the request's columns reach `RestorerModel.predict` as sent, which refuses any
    but `lq`, `ref1`, `ref2`, `ref3` (the module docstring; the logged input example shows them).
    Models logged with the former schema (`lq` required, `ref1`-`ref3` optional) keep it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "restored")]),
        params=ParamSchema(
            [
                ParamSpec("guidance_image", "double", None),
                ParamSpec("guidance_context", "double", None),
                ParamSpec("ref_ensemble", "boolean", None),
            ]
        ),
    )


def log_model_version(bundle, name: str, code_paths: list[str]) -> str:
    """Log the bundle as a pyfunc model in the active run, register it under `name`, tag its bundle
    sha; returns the new version."""
    import json
    from pathlib import Path

    import mlflow
    from mlflow import MlflowClient

    bundle = Path(bundle)
    resolution = json.loads((bundle / "bundle.json").read_text())["resolution"]
    example = example_input(resolution)
    signature = model_signature()
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=RestorerModel(),
        artifacts={"bundle": str(bundle)},
        code_paths=code_paths,
        signature=signature,
        input_example=example,
        registered_model_name=name,
        pip_requirements=[],
    )
    version = str(info.registered_model_version)
    MlflowClient().set_model_version_tag(name, version, "bundle_sha", bundle_sha(bundle))
    return version


def find_version(client, name: str, sha: str):
    """The registered version of `name` holding the bundle `sha`, or None (also when `name` is unknown)."""
    from mlflow.exceptions import MlflowException

    try:
        for mv in client.search_model_versions(f"name='{name}'"):
            if mv.tags.get("bundle_sha") == sha:
                return mv
    except MlflowException:
        return None
    return None


def example_input(resolution: int):
    import pandas as pd

    from pipelines.synthetic import face_spec, render

    imgs = [render(face_spec(11, "album", 0, j), 2 * resolution, resolution) for j in range(2)]
    lq = np.asarray(imgs[0][::2, ::2].repeat(2, 0).repeat(2, 1))  # a blocky stand-in for a degraded face
    return pd.DataFrame(
        {"lq": [encode_image(lq)], "ref1": [encode_image(imgs[1])], "ref2": [""], "ref3": [""]}
    )
