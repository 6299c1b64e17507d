"""Drive a Label Studio project through label-studio-sdk: connect, project, tasks, predictions, pull.

Tasks carry a stable key (`pair_key` = "<target>__<reference>") and the digest of the pixels they show
(`content`, pipelines.refsel.pair_content) in their data: pushing is idempotent — a task whose key and
content exist is never imported again, new pairs are appended, and a pair whose images were rendered
again gets a new task (its images under new file names) while the old task and its annotations stay. Predictions are attached
once per (task, model_version). The pull returns every annotation with its provenance; the caller's
store keeps all versions (see `annotation.store`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from annotation.labeling import INSTRUCTIONS, LABEL_CONFIG, mask_to_result

URL_ENV, TOKEN_ENV = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"
STORAGE_DIR = "refface"  # the local-files storage folder under the server's media root


class LabelStudioError(RuntimeError):
    pass


@dataclass(frozen=True)
class PairTask:
    """One target–reference pair to annotate; images are paths under the media root."""

    pair_key: str
    target: str
    reference: str
    ref_index: int
    gt_path: str
    ref_path: str
    content: str  # pipelines.refsel.pair_content of the two images


def task_key(pair_key: str, content: str | None) -> str:
    """How a task is known in the project: its pair key, and the content it shows where it records one."""
    return f"{pair_key}@{content}" if content else pair_key


def connect(url: str | None = None, token: str | None = None):
    """An SDK client checked against the server: a clear error if it is down or the token is wrong."""
    from label_studio_sdk import LabelStudio

    url = url or os.environ.get(URL_ENV)
    token = token or os.environ.get(TOKEN_ENV) or os.environ.get("LABEL_STUDIO_USER_TOKEN")
    if not url:
        raise LabelStudioError(f"set {URL_ENV} (e.g. http://127.0.0.1:8080) to reach the Label Studio server")
    if not token:
        raise LabelStudioError(f"set {TOKEN_ENV} to the Label Studio API token (never put it in params.yaml)")
    import httpx

    try:
        r = httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError as exc:
        raise LabelStudioError(f"Label Studio at {url} ({URL_ENV}) is not reachable: {exc}") from exc
    if r.status_code != 200:
        raise LabelStudioError(f"Label Studio at {url} ({URL_ENV}) is not healthy: HTTP {r.status_code}")
    r = httpx.get(f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {token}"}, timeout=10)
    if r.status_code in (401, 403):
        raise LabelStudioError(
            f"Label Studio at {url} rejected the API token in {TOKEN_ENV} (HTTP {r.status_code})"
        )
    r.raise_for_status()
    return LabelStudio(base_url=url, api_key=token)


def ensure_project(client, title: str, media_root: str | Path):
    """The project named `title` (created with our config and a local-files storage if missing)."""
    for p in client.projects.list():
        if p.title == title:
            return p
    project = client.projects.create(title=title, label_config=LABEL_CONFIG, description=INSTRUCTIONS)
    storage = Path(media_root).resolve() / STORAGE_DIR
    storage.mkdir(parents=True, exist_ok=True)
    client.import_storage.local.create(
        project=project.id, path=str(storage), title="refface pairs", use_blob_urls=True
    )
    return project


def local_url(relpath: str) -> str:
    return f"/data/local-files/?d={relpath}"


def existing_tasks(client, project_id: int) -> dict[str, int]:
    """{task_key(pair_key, content): task id} of the project's tasks."""
    out = {}
    for t in client.tasks.list(project=project_id, fields="all"):
        key = (t.data or {}).get("pair_key")
        if key:
            out[task_key(key, (t.data or {}).get("content"))] = t.id
    return out


def push_tasks(client, project_id: int, pairs: list[PairTask], media_root: str | Path) -> dict[str, int]:
    """Import the pairs (with their content) not yet in the project; returns {pair_key: task id} of the
    tasks that show `pairs`' current images."""
    root = Path(media_root).resolve()
    have = existing_tasks(client, project_id)
    empty = [p.pair_key for p in pairs if not p.content]
    if empty:
        raise LabelStudioError(f"task {empty[0]}: no content digest (pipelines.refsel.pair_content) given")
    new = [p for p in pairs if task_key(p.pair_key, p.content) not in have]
    for p in new:
        for path in (p.gt_path, p.ref_path):
            if not (root / path).is_file():
                raise LabelStudioError(f"task {p.pair_key}: image {root / path} is missing")
    if new:
        client.projects.import_tasks(
            id=project_id,
            request=[
                {
                    "gt": local_url(p.gt_path),
                    "ref": local_url(p.ref_path),
                    "pair_key": p.pair_key,
                    "target": p.target,
                    "reference": p.reference,
                    "ref_index": p.ref_index,
                    "content": p.content,
                    "instructions": INSTRUCTIONS,
                }
                for p in new
            ],
            return_task_ids=True,
        )
        have = existing_tasks(client, project_id)
    missing = [p.pair_key for p in pairs if task_key(p.pair_key, p.content) not in have]
    if missing:
        raise LabelStudioError(f"Label Studio did not create tasks for {missing[:3]}")
    return {p.pair_key: have[task_key(p.pair_key, p.content)] for p in pairs}


def push_predictions(
    client,
    task_ids: dict[str, int],
    masks: dict[str, np.ndarray],
    model_version: str,
    scores: dict[str, float],
) -> int:
    """Attach each mask as a brush pre-annotation once per (task, model_version); returns how many."""
    n = 0
    for key, mask in sorted(masks.items()):
        tid = task_ids[key]
        if any(p.model_version == model_version for p in client.predictions.list(task=tid)):
            continue
        client.predictions.create(
            task=tid,
            result=mask_to_result(mask, key, salt=model_version),
            model_version=model_version,
            score=float(scores.get(key, 0.0)),
        )
        n += 1
    return n


def users_by_id(client) -> dict[int, str]:
    return {u.id: (u.email or u.username or str(u.id)) for u in client.users.list()}


def pull(client, project_id: int) -> list[dict]:
    """Every annotation of the project with provenance: one dict per annotation (cancelled ones too)."""
    users = users_by_id(client)
    records = []
    for task in client.projects.exports.as_json(project_id):
        key = task.get("data", {}).get("pair_key")
        content = task.get("data", {}).get("content")
        for a in task.get("annotations", []):
            who = a.get("completed_by")
            if isinstance(who, dict):
                who = who.get("email") or who.get("id")
            elif isinstance(who, int):
                who = users.get(who, str(who))
            records.append(
                {
                    "task_id": task["id"],
                    "pair_key": key,
                    "content": content,
                    "annotation_id": a["id"],
                    "annotator": str(who),
                    "created_at": a.get("created_at"),
                    "updated_at": a.get("updated_at"),
                    "was_cancelled": bool(a.get("was_cancelled")),
                    "result": a.get("result", []),
                }
            )
    return records
