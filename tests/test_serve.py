"""The pyfunc model served as the README says: `make serve` (`mlflow models serve` with the venv's bin on
PATH) on loopback, from a shell whose PATH lacks the venv. Bad requests get HTTP 400 with the
project's own message (row, column, problem) and no stack trace; a fifth reference column is refused,
not dropped; after a hundred bad requests a good one is answered as before. Also: the Makefile's
server targets see the venv, and the pyfunc's checks in process, with and without mlflow."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_bundle
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STAMPS = (".venv/.installed", ".venv/.installed-dev")  # `make -o STAMP`: take the venv as installed (no pip)
NAME = "refface-serve-test"


def _bare_env(**extra: str) -> dict[str, str]:
    """The environment of a shell without the venv: its bin off PATH, no VIRTUAL_ENV."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != VENV_BIN]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(path or ["/usr/bin", "/bin"]), **extra}


def _make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *(a for st in STAMPS for a in ("-o", st)), *args],
        cwd=ROOT,
        env=env or _bare_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _faces(n: int) -> list[np.ndarray]:
    from pipelines.synthetic import face_spec, render

    return [render(face_spec(3, "album", 0, j), 64, 32) for j in range(n)]


# ---- the Makefile ----------------------------------------------------------------------------------


def test_server_targets_run_with_the_venv_on_path():
    r = _make("-n", "serve", "ui", "label-studio", "label-studio-stop")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        'mlflow models serve -m "models:/refface@champion" --env-manager local -h 127.0.0.1 -p 5001',
        "mlflow ui --backend-store-uri sqlite:///mlflow.db -h 127.0.0.1 -p 5000",
        "python -m annotation.server start --port 8080",
        "python -m annotation.server stop",
    ]
    r = _make("-n", "serve", "MODEL=models:/other/3", "PORT=5999")
    assert '-m "models:/other/3"' in r.stdout and r.stdout.rstrip().endswith("-p 5999")
    # every `make ...` line of the README names a target of this Makefile
    lines = [ln.split("#")[0].split() for ln in (ROOT / "README.md").read_text().splitlines()]
    makes = [ln[1:] for ln in lines if ln[:1] == ["make"]]
    assert ["serve"] in makes and ["label-studio"] in makes
    for args in makes:
        r = _make("-n", *args)
        assert r.returncode == 0, (args, r.stderr)
    # a recipe of this Makefile, run from a shell without the venv, finds the venv's uvicorn and python
    assert str(VENV_BIN) not in _bare_env()["PATH"].split(os.pathsep)
    probe = "probe: ; @command -v uvicorn; command -v python; command -v mlflow; command -v dvc"
    r = _make("--eval", probe, "probe")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(VENV_BIN / x) for x in ("uvicorn", "python", "mlflow", "dvc")]


# ---- the model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("serve_bundle"))


def _bad_requests() -> list[tuple[dict, list[str]]]:
    """(dataframe_split body, words the answer's message must hold): each malformed in one way."""
    lq, ref = (_b64(_png(x)) for x in _faces(2))
    png = _png(_faces(1)[0])

    def split(columns, *rows):
        return {"dataframe_split": {"columns": columns, "data": [list(r) for r in rows]}}

    return [
        (split(["lq"], ["%%%"]), ["row 0 lq", "not a base64-encoded image"]),
        (split(["lq", "ref1"], [lq, _b64(b"hello, world")]), ["row 0 ref1", "not a readable image"]),
        (split(["lq", "ref1"], [lq, ref], ["", ref]), ["row 1 lq", "empty"]),
        (split(["lq", "ref2"], [lq, _b64(png[: len(png) // 2])]), ["row 0 ref2", "truncated"]),
        (
            split(["lq", "ref1", "ref2", "ref3", "ref4"], [lq, ref, ref, ref, ref]),
            ["ref4", "at most 3 references"],
        ),
        (split(["lq", "ref_1"], [lq, ref]), ["ref_1", "unknown"]),
        (split(["ref1"], [ref]), ["`lq`"]),
        (split(["lq"], [7]), ["row 0 lq", "string", "int"]),
    ]


def _assert_refused(resp, words: list[str]) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[-1000:])
    body = resp.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE", body
    for w in words:
        assert w in body["message"], (w, body["message"])
    assert set(body) <= {"error_code", "message", "sqlstate", "error_class"}, body  # no stack_trace
    for leak in ("Traceback", "stack_trace", "Failed to predict data", str(ROOT), "site-packages"):
        assert leak not in resp.text, (leak, resp.text[-1000:])


def test_predict_refuses_bad_input_in_process(bundle, monkeypatch):
    """The checks without a server: each bad request raises a ValueError (an MlflowException too)
    whose message survives the scoring server's rewrite; without mlflow, the plain InputError."""
    from types import SimpleNamespace

    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipelines.registry import RestorerModel
    from pipelines.restorer import InputError

    model = RestorerModel()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
    for body, words in _bad_requests():
        split = body["dataframe_split"]
        frame = pd.DataFrame(split["data"], columns=split["columns"])
        with pytest.raises(MlflowException) as info:
            model.predict(None, frame)
        exc = info.value
        assert isinstance(exc, ValueError) and isinstance(exc.__cause__, InputError)
        own = exc.message
        assert all(w in own for w in words), (words, own)
        exc.message = f"Failed to predict data '{frame}'. \nError: {exc.message}"  # as the server does
        assert json.loads(exc.serialize_as_json())["message"] == own and exc.get_http_status_code() == 400
    lq, ref = _faces(2)
    ok = model.predict(
        None, pd.DataFrame({"lq": [_b64(_png(lq))], "ref1": [_b64(_png(ref))], "ref2": [None]})
    )
    assert list(ok.columns) == ["restored"] and len(ok) == 1
    # without mlflow (the GPU check): the project's InputError itself
    monkeypatch.setitem(sys.modules, "mlflow.exceptions", None)
    with pytest.raises(InputError, match="at most 3 references") as info:
        model.predict(None, pd.DataFrame({"lq": [_b64(_png(lq))], "ref4": [_b64(_png(ref))]}))
    assert not isinstance(info.value, MlflowException)


# ---- served ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    """The bundle logged by the project's own code (`log_model_version`) into a fresh sqlite store,
    alias `champion`, served by `make serve` from a shell without the venv on PATH."""
    import httpx
    import mlflow

    from pipelines.registry import log_model_version
    from stages.register import CODE_PATHS

    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment(NAME, artifact_location=(tmp / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            version = log_model_version(bundle, NAME, CODE_PATHS)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
    finally:
        mlflow.set_tracking_uri(None)
    port = _free_port()
    proc = subprocess.Popen(
        [
            "make",
            "-s",
            "--no-print-directory",
            *(a for st in STAMPS for a in ("-o", st)),
            "serve",
            f"MODEL=models:/{NAME}@champion",
            f"PORT={port}",
        ],
        cwd=ROOT,
        env=_bare_env(MLFLOW_TRACKING_URI=uri, REFFACE_PROGRESS="0"),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "serve.log", "wb"),  # noqa: SIM115 (closed with the process)
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 120, (
                "no /ping within 120 s: " + (tmp / "serve.log").read_text()[-3000:]
            )
            time.sleep(0.25)
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_served_model_refuses_bad_requests_and_keeps_serving(served):
    lq, ref = _faces(2)
    lq64, ref64 = _b64(_png(lq)), _b64(_png(ref))

    def good() -> bytes:
        body = {"dataframe_split": {"columns": ["lq", "ref1"], "data": [[lq64, ref64], [lq64, ""]]}}
        resp = served.post("/invocations", json=body)
        assert resp.status_code == 200, resp.text[-2000:]
        preds = resp.json()["predictions"]
        assert len(preds) == 2
        raw = base64.b64decode(preds[0]["restored"])
        img = Image.open(io.BytesIO(raw))
        assert img.size == (32, 32) and img.mode == "RGB"
        return raw

    before = good()
    cases = _bad_requests()
    for body, words in cases:
        _assert_refused(served.post("/invocations", json=body), words)
    t = time.perf_counter()
    for i in range(100):
        body, words = cases[i % len(cases)]
        resp = served.post("/invocations", json=body)
        assert 400 <= resp.status_code < 500 and "Traceback" not in resp.text, resp.text[-500:]
    bad_s = (time.perf_counter() - t) / 100
    assert good() == before  # answered as before
    # the other request formats reach the same checks
    records = {"dataframe_records": [{"lq": lq64, "ref1": ref64}, {"lq": lq64}]}
    assert served.post("/invocations", json=records).status_code == 200
    for inputs in ({"inputs": {"lq": [lq64], "ref1": [ref64]}}, {"inputs": [{"lq": lq64, "ref1": ref64}]}):
        resp = served.post("/invocations", json=inputs)
        assert resp.status_code == 200, resp.text[-1000:]
    _assert_refused(
        served.post("/invocations", json={"inputs": {"lq": [lq64], "ref4": [ref64]}}), ["ref4", "at most 3"]
    )
    print(f"a refused request took {bad_s * 1000:.0f} ms on average")
