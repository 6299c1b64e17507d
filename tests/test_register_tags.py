"""The registry's evaluation of a champion survives MLflow's tag limit: the register stage reads the
champion's metrics from the evaluation.json its run logged, and its tag is always whole JSON."""

import json

from pipelines.registry import TAG_LIMIT, evaluation_tag, flatten
from stages.register import champion_metrics


def big_evaluation() -> dict:
    rows = {f"{k} references - gate open": {"gt_id": 0.61234, "psnr": 24.5678} for k in range(60)}
    return {"sets": {"severe": rows, "moderate": dict(rows)}}


def test_the_tag_keeps_whole_entries_within_the_limit():
    flat = flatten(big_evaluation())
    assert len(json.dumps(flat, sort_keys=True)) > TAG_LIMIT  # the case the old slice cut mid-string
    tag = json.loads(evaluation_tag(flat))
    assert len(evaluation_tag(flat)) <= TAG_LIMIT and tag and all(flat[k] == v for k, v in tag.items())
    small = {"severe/1 reference/gt_id": 0.5}
    assert json.loads(evaluation_tag(small)) == small


def test_champion_metrics_come_from_the_logged_file_not_a_cut_tag(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("tags", artifact_location=(tmp_path / "artifacts").as_uri())
    evaluation = big_evaluation()
    flat = flatten(evaluation)
    client.create_registered_model("refface-tags")
    versions = []
    for logs_file in (True, False):
        with mlflow.start_run(experiment_id=exp) as run:
            if logs_file:
                mlflow.log_dict(evaluation, "evaluation.json")
        mv = client.create_model_version("refface-tags", run.info.artifact_uri, run_id=run.info.run_id)
        # what the stage wrote before: the flat JSON cut at the limit, mid-string
        client.set_model_version_tag("refface-tags", mv.version, "evaluation", json.dumps(flat)[:TAG_LIMIT])
        versions.append(client.get_model_version("refface-tags", mv.version))
    assert champion_metrics(client, versions[0]) == flat
    assert champion_metrics(client, versions[1]) is None  # no file and a cut tag: no evidence, no crash
