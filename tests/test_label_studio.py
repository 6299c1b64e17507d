"""The annotation loop against a REAL Label Studio server started by the project on 127.0.0.1.

A scripted annotator works as a person would through the API: the annotate stage pushes tasks, two
annotators submit brush masks (synthetic ground truth with human-like noise), a reviewer accepts one,
someone submits a malformed one; the stage pulls, decodes exactly, keeps every version, reports
agreement; the refsel stage trains the mask model, reports accuracy per conflict type and sends doubtful
pairs back as tasks with its prediction attached; pre-annotation of new tasks carries the model version.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_pair_shards

from annotation.labeling import mask_to_result, result_to_mask
from annotation.project import LabelStudioError, connect
from annotation.server import LabelStudioServer, ServerError
from annotation.simulated import AnnotatorNoise, annotator_rng, simulate
from pipelines.refsel import iter_pairs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ls")
    creds = {
        "LABEL_STUDIO_USERNAME": "admin@refface.test",
        "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
        "LABEL_STUDIO_USER_TOKEN": secrets.token_hex(16),  # made up per run, never in git
    }
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    srv = LabelStudioServer(root / "data", root / "media", _free_port())
    srv.start()
    try:
        yield srv, creds["LABEL_STUDIO_USER_TOKEN"]
    finally:
        srv.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_server_refuses_a_busy_port_and_bad_credentials(server, tmp_path, monkeypatch):
    srv, token = server
    with pytest.raises(ServerError, match="already answers"):
        LabelStudioServer(tmp_path / "d", tmp_path / "m", srv.port).start()
    monkeypatch.setenv("LABEL_STUDIO_USERNAME", "not-an-email")
    with pytest.raises(ServerError, match="e-mail"):
        LabelStudioServer(tmp_path / "d", tmp_path / "m", _free_port()).env()
    with pytest.raises(LabelStudioError, match="rejected the API token"):
        connect(srv.url, "0" * 32)
    with pytest.raises(LabelStudioError, match="not reachable"):
        connect(f"http://127.0.0.1:{_free_port()}", token)
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_URL"):
        monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
        connect(None, token)


def _stage(module, params, env, *args):
    r = subprocess.run(
        [sys.executable, "-m", module, "--params", str(params), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env, "REFFACE_PROGRESS": "0"},
        timeout=900,
    )
    return r


def test_scripted_annotators_through_the_real_server(server, tmp_path):
    srv, token = server
    env = {"LABEL_STUDIO_URL": srv.url, "LABEL_STUDIO_API_KEY": token}
    client = connect(srv.url, token)
    shards = make_pair_shards(tmp_path / "shards", identities=(8, 2, 3))
    truth = {p.key: p for p in iter_pairs(shards, "train")}
    cfg = {
        "annotate": {
            "backend": "label_studio",
            "pool": 40,
            "media_root": str(srv.media_root),
            "project": "test one",
        },
        "refsel": {
            "epochs": 25,
            "widths": [16, 32, 64],
            "batch_size": 16,
            "review_max": 6,
            "review_confidence": 0.999,
        },
    }
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    ann = tmp_path / "ann"
    a_args = ("--shards", str(shards), "--out", str(ann), "--metrics", str(tmp_path / "a.json"))

    # 1. Push: 40 tasks; pushing again creates none.
    r = _stage("stages.annotate", params, env, *a_args)
    assert r.returncode == 0, r.stderr[-3000:]
    project = next(p for p in client.projects.list() if p.title == "test one")
    tasks = {t.data["pair_key"]: t for t in client.tasks.list(project=project.id, fields="all")}
    assert len(tasks) == 40
    assert _stage("stages.annotate", params, env, *a_args).returncode == 0
    assert len(list(client.tasks.list(project=project.id))) == 40
    # The images are served to the browser by the server itself.
    import httpx

    t0 = next(iter(tasks.values()))
    img = httpx.get(srv.url + t0.data["ref"], headers={"Authorization": f"Token {token}"})
    assert img.status_code == 200 and img.content[:4] == b"\x89PNG"

    # 2. Annotators at work (the scripted annotator: synthetic truth + human-like noise).
    users = {n: client.users.create(username=n, email=f"{n}@refface.test") for n in ("ann1", "ann2", "rev")}
    submitted: dict[int, np.ndarray] = {}
    for i, (key, task) in enumerate(sorted(tasks.items())):
        who = ["ann1", "ann2"] if i % 3 == 0 else ["ann1"]
        for name in who:
            m = simulate(truth[key].truth, annotator_rng(1, name, key), AnnotatorNoise())
            a = client.annotations.create(
                id=task.id, result=mask_to_result(m, key, salt=name), completed_by=users[name].id
            )
            submitted[a.id] = m
    keys = sorted(tasks)
    accepted_key = keys[0]
    acc_mask = truth[accepted_key].truth
    res = mask_to_result(acc_mask, accepted_key, salt="rev")
    res.append({"from_name": "review", "to_name": "ref", "type": "choices", "value": {"choices": ["accept"]}})
    acc = client.annotations.create(id=tasks[accepted_key].id, result=res, completed_by=users["rev"].id)
    bad = mask_to_result(truth[keys[1]].truth, keys[1], salt="bad")
    bad[0]["value"]["brushlabels"] = ["teeth"]
    bad_ann = client.annotations.create(id=tasks[keys[1]].id, result=bad, completed_by=users["ann2"].id)

    # 3. Pull: exact decoding, agreement, review decides, the malformed one is quarantined by task.
    r = _stage("stages.annotate", params, env, *a_args)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "a.json").read_text())
    assert m["pairs_decided"] == 40 and m["quarantined"] == 1 and m["states"]["reviewed"] == 1
    assert m["multi_annotated_pairs"] >= 13 and 0 < m["agreement_conflict_iou"] < 1
    store = [json.loads(line) for line in (ann / "annotations.jsonl").read_text().splitlines()]
    assert len(store) == len(submitted) + 2
    for rec in store:
        if rec["annotation_id"] in submitted:
            np.testing.assert_array_equal(
                result_to_mask(rec["result"], 32, 32, rec["pair_key"]), submitted[rec["annotation_id"]]
            )
            assert rec["annotator"].endswith("@refface.test") and rec["created_at"]
    decisions = {
        json.loads(x)["pair_key"]: json.loads(x) for x in (ann / "decisions.jsonl").read_text().splitlines()
    }
    assert (
        decisions[accepted_key]["annotation_id"] == acc.id
        and decisions[accepted_key]["annotator"] == "rev@refface.test"
    )
    quarantine = [json.loads(x) for x in (ann / "quarantine.jsonl").read_text().splitlines()]
    assert (
        quarantine[0]["annotation_id"] == bad_ann.id
        and "teeth" in quarantine[0]["reason"]
        and keys[1] in quarantine[0]["reason"]
    )

    # 4. An edit is a new version: both are kept, the newest decides.
    first_id, first_mask = next(
        (k, v) for k, v in submitted.items() if decisions[keys[2]]["annotation_id"] == k
    )
    edited = np.where(acc_mask == 255, 255, 0).astype(np.uint8)
    client.annotations.update(id=first_id, result=mask_to_result(edited, keys[2], salt="edit"))
    assert _stage("stages.annotate", params, env, *a_args).returncode == 0
    store2 = [json.loads(line) for line in (ann / "annotations.jsonl").read_text().splitlines()]
    assert len(store2) == len(store) + 1
    versions = [r for r in store2 if r["annotation_id"] == first_id]
    assert len(versions) == 2

    # 5. The mask model: trained on the pulled masks; doubtful pairs go back with the prediction attached.
    out = tmp_path / "refsel"
    r = _stage(
        "stages.refsel",
        params,
        env,
        "--shards",
        str(shards),
        "--annotate",
        str(ann),
        "--out",
        str(out),
        "--metrics",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "loss.csv"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rm = json.loads((tmp_path / "r.json").read_text())
    print("\nper-type accuracy (test split):", json.dumps(rm["per_type"], indent=1))
    assert rm["per_type"]["all"]["accuracy"] > rm["baseline_no_conflict"]["all"]
    assert rm["review_pushed"] == rm["review_queue"] > 0
    review = [json.loads(x) for x in (out / "review.jsonl").read_text().splitlines()]
    tasks = {t.data["pair_key"]: t for t in client.tasks.list(project=project.id, fields="all")}
    for rv in review:
        preds = client.predictions.list(task=tasks[rv["pair_key"]].id)
        assert [p.model_version for p in preds] == [rm["model_version"]]
        assert preds[0].result and preds[0].result[0]["type"] == "brushlabels"

    # 6. Pre-annotation: a bigger pool with the model attaches its masks to the new tasks.
    cfg["annotate"] |= {"pool": 50, "prediction_model": str(out / "model.safetensors")}
    params.write_text(yaml.safe_dump(cfg))
    r = _stage("stages.annotate", params, env, *a_args)
    assert r.returncode == 0, r.stderr[-3000:]
    am = json.loads((tmp_path / "a.json").read_text())
    assert am["tasks"] == 50 and am["model_version"] == rm["model_version"] and am["predictions_pushed"] > 0
    pool = {json.loads(x)["pair_key"] for x in (ann / "pool.jsonl").read_text().splitlines()}
    reviewed = {rv["pair_key"] for rv in review}
    assert len(list(client.tasks.list(project=project.id))) == len(pool | reviewed)
    assert am["predictions_pushed"] == len(pool - reviewed)  # once per (task, model version)


def test_annotation_of_a_vanished_pair_is_kept_and_named(server, tmp_path):
    srv, token = server
    env = {"LABEL_STUDIO_URL": srv.url, "LABEL_STUDIO_API_KEY": token}
    client = connect(srv.url, token)
    shards = make_pair_shards(tmp_path / "shards", identities=(2, 1, 1))
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "annotate": {
                    "backend": "label_studio",
                    "pool": 4,
                    "media_root": str(srv.media_root),
                    "project": "test two",
                }
            }
        )
    )
    a_args = ("--shards", str(shards), "--out", str(tmp_path / "ann"), "--metrics", str(tmp_path / "a.json"))
    assert _stage("stages.annotate", params, env, *a_args).returncode == 0
    project = next(p for p in client.projects.list() if p.title == "test two")
    client.projects.import_tasks(
        id=project.id,
        request=[
            {
                "gt": "/data/local-files/?d=refface/x.png",
                "ref": "/data/local-files/?d=refface/x.png",
                "pair_key": "gone__pair",
                "instructions": "",
            }
        ],
    )
    t = next(
        t for t in client.tasks.list(project=project.id, fields="all") if t.data["pair_key"] == "gone__pair"
    )
    client.annotations.create(id=t.id, result=mask_to_result(np.ones((32, 32), np.uint8), "gone__pair"))
    assert _stage("stages.annotate", params, env, *a_args).returncode == 0
    q = [json.loads(x) for x in (tmp_path / "ann" / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 1 and f"task {t.id} (gone__pair)" in q[0]["reason"] and "image gone" in q[0]["reason"]
    assert "gone__pair" in (tmp_path / "ann" / "annotations.jsonl").read_text()
    # The shards rendered again (the same pair keys, other pixels): each pair gets a new task whose
    # images have new file names; the old tasks, their images and annotations stay, and the annotation
    # drawn on the old pixels is quarantined with the reason instead of deciding the new pair's mask.
    old = {t.data["pair_key"]: t for t in client.tasks.list(project=project.id, fields="all")}
    key = sorted(k for k in old if k != "gone__pair")[0]
    drawn = client.annotations.create(id=old[key].id, result=mask_to_result(np.ones((32, 32), np.uint8), key))
    shards2 = make_pair_shards(tmp_path / "shards2", identities=(2, 1, 1), seed=4)
    a2 = ("--shards", str(shards2), "--out", str(tmp_path / "ann"), "--metrics", str(tmp_path / "a.json"))
    assert _stage("stages.annotate", params, env, *a2).returncode == 0
    now = list(client.tasks.list(project=project.id, fields="all"))
    assert len(now) == 2 * len(old) - 1
    new = next(t for t in now if t.data["pair_key"] == key and t.id != old[key].id)
    assert new.data["content"] != old[key].data["content"] and new.data["ref"] != old[key].data["ref"]
    for t in (old[key], new):
        assert (srv.media_root / t.data["ref"].split("?d=")[1]).is_file()
    q = [json.loads(x) for x in (tmp_path / "ann" / "quarantine.jsonl").read_text().splitlines()]
    stale = next(x for x in q if x["annotation_id"] == drawn.id)
    assert "drawn on other images" in stale["reason"] and old[key].data["content"] in stale["reason"]
    assert key not in {
        json.loads(x)["pair_key"] for x in (tmp_path / "ann" / "decisions.jsonl").read_text().splitlines()
    }
    # A stage pointed at a server that is down fails with the setting named.
    r = _stage(
        "stages.annotate", params, {**env, "LABEL_STUDIO_URL": f"http://127.0.0.1:{_free_port()}"}, *a_args
    )
    assert r.returncode != 0 and "LABEL_STUDIO_URL" in r.stderr and "not reachable" in r.stderr
