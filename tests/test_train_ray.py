"""`train.launcher: ray`: the training of `fit` on Ray Train, on a two-node local cluster.

`ray.cluster_utils.Cluster` starts a head and a second node (one CPU each) on this machine; the test
process is the driver. Two CPU workers (gloo) train the tiny model through the one entry point,
`pipelines.fit.fit`; callbacks shipped to the workers record what each rank saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
from conftest import make_shards
from lightning.pytorch.callbacks import Callback

from pipelines.config import ConfigError, DegradeConfig, RayTrainConfig, TrainConfig, build

STEPS, EVERY, PER_RANK = 6, 2, 4
# The workers cannot import this test file: its callbacks travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Probe(Callback):
    """Writes, per rank and attempt, the keys it trained on, its node, the backend and its final weights."""

    def __init__(self, out: Path):
        self.out = str(out)

    def on_train_start(self, trainer, pl_module):
        self.start, self.keys = int(trainer.global_step), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.extend(batch["keys"])
        self.write(trainer, pl_module)  # every step: a killed attempt leaves its record too

    def write(self, trainer, pl_module):
        import ray
        import torch.distributed as dist

        rec = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "start": self.start,
            "end": int(trainer.global_step),
            "keys": self.keys,
            "node": ray.get_runtime_context().get_node_id(),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "weights": weights_hash(pl_module.net),
        }
        Path(self.out, f"rank{rec['rank']}-from{self.start}.json").write_text(json.dumps(rec))


class KillOnce(Callback):
    """Kills rank `rank`'s process at `step`, on the first attempt only (a marker file remembers).

    It first waits until Ray Train has committed the checkpoints reported so far: the controller takes
    reports in when it polls the workers (every few seconds), and a worker that dies before that resumes
    from the checkpoint before (here: from the start)."""

    def __init__(self, marker: Path, step: int, rank: int = 1):
        self.marker, self.step, self.rank = str(marker), step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if not os.path.exists(self.marker):
                import ray.train

                ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, 120)
                Path(self.marker).touch()
                os._exit(1)


def weights_hash(net) -> str:
    h = hashlib.sha256()
    for name, p in sorted(net.named_parameters()):
        if p.requires_grad:
            h.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cfg(**kw) -> TrainConfig:
    base = dict(
        backbone="tiny",
        launcher="ray",
        ray=RayTrainConfig(workers=2, cpus_per_worker=1),
        batch_size=2 * PER_RANK,
        max_steps=STEPS,
        checkpoint_every=EVERY,
        log_every=1,
        memory_tokens=8,
        lora_rank=4,
        front_end=0,
        front=None,
        lr=1e-3,
        warmup_steps=0,
        val_steps=2,
        threads=1,
    )
    return TrainConfig(**{**base, **kw})


def _records(folder: Path) -> dict[tuple[int, int], dict]:
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    return {(r["rank"], r["start"]): r for r in recs}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import torch

    from models.id_encoder import IRBackbone, IRConfig
    from pipelines.embedding import Encoders

    tmp = tmp_path_factory.mktemp("ray_data")
    paths = make_shards(tmp / "shards", 64, refs=2, per_shard=32, emb_dim=512)
    torch.manual_seed(0)
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 16, 16, 32), 512)).eval()
    return paths, Encoders(enc, enc, "test", 0.0)


def _val(paths):
    from pipelines.batches import collate
    from pipelines.stream import degrade_chunk_local, plan_chunks

    raw = degrade_chunk_local(plan_chunks(paths, 4)[0], "face_classic", 0, 0)
    return collate(raw, (0.3, 0.3, 0.2, 0.2), 3, 0, 0)


def test_ray_launcher_config_errors_name_the_fix():
    section = {"launcher": "ray", "ray": {"workers": 3}, "batch_size": 8}
    with pytest.raises(ConfigError, match=r"batch_size 8 is not divisible by 3 ranks \(ray.workers\)"):
        build(TrainConfig, section, "train").validate("train")
    with pytest.raises(ConfigError, match="devices and num_nodes to 1"):
        build(TrainConfig, {"launcher": "ray", "devices": 2}, "train").validate("train")
    with pytest.raises(ConfigError, match="train.launcher"):
        build(TrainConfig, {"launcher": "slurm"}, "train")
    with pytest.raises(ConfigError, match=r"train.ray.max_failures must be at least -1 \(got -2\)"):
        build(TrainConfig, {"launcher": "ray", "batch_size": 8, "ray": {"max_failures": -2}}, "train")
    with pytest.raises(ConfigError, match=r"train.ray: unknown key\(s\) worker; valid keys: cpus_per_worker"):
        build(TrainConfig, {"ray": {"worker": 2}}, "train")


@pytest.mark.slow  # MLflow sets up its database when the logger is made (about 15 s here)
def test_a_relative_mlflow_uri_is_refused_before_any_start(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import MLFlowLogger

    from pipelines.fit import fit

    monkeypatch.chdir(tmp_path)
    logger = MLFlowLogger(experiment_name="x", tracking_uri="sqlite:///mlflow.db")
    with pytest.raises(ValueError, match=f"relative: .*pass sqlite:///{tmp_path}/mlflow.db"):
        fit(_cfg(), DegradeConfig(), ["unused.tar"], None, None, logger=logger)


@pytest.mark.slow
def test_workers_that_do_not_fit_the_cluster_fail_before_launching(cluster):
    from pipelines.fit import fit

    with pytest.raises(
        RuntimeError, match=r"train.ray.workers 4 x cpus_per_worker 1 = 4 CPUs, but the Ray cluster has 2"
    ):
        fit(_cfg(ray=RayTrainConfig(workers=4)), DegradeConfig(), ["unused.tar"], None, None)
    with pytest.raises(RuntimeError, match="train.ray.degrade tasks needs CPUs beyond the workers' 2"):
        fit(_cfg(ray=RayTrainConfig(degrade="tasks")), DegradeConfig(), ["unused.tar"], None, None)


@pytest.mark.slow
def test_two_workers_on_two_nodes_share_the_stream_and_recover_from_a_killed_worker(cluster, data, tmp_path):
    """One run (a Ray Train start-up costs about a minute here): rank 1 dies at step 3 of 6 on the first
    attempt; Ray Train restarts the group from the step-2 checkpoint and the run ends at step 6."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    from pipelines.fit import fit
    from pipelines.stream import epoch_order, plan_chunks

    paths, enc = data
    dcfg = DegradeConfig(preset="face_classic", batch_size=PER_RANK, max_in_flight=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="ray", run_name="train", tracking_uri=uri, log_model=False)
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=EVERY, save_last=True, save_top_k=0)
    probes = tmp_path / "probes"
    probes.mkdir()
    kill = KillOnce(tmp_path / "killed", step=EVERY + 1)
    reported = []
    r = fit(
        _cfg(),
        dcfg,
        paths,
        enc,
        _val(paths),
        callbacks=[Probe(probes), kill],
        logger=logger,
        checkpoint=ckpt,
        report_every=EVERY,
        report=lambda step, value: reported.append(step),
    )

    assert (tmp_path / "killed").exists()  # rank 1 did die at step 3
    recs = _records(probes)
    assert {(0, 0), (1, 0), (0, EVERY), (1, EVERY)} == set(recs), sorted(recs)  # two attempts, the 2nd from 2
    first, last = (recs[0, 0], recs[1, 0]), (recs[0, EVERY], recs[1, EVERY])
    for rec in (*first, *last):
        assert rec["world"] == 2 and rec["backend"] == "gloo"
    assert first[0]["node"] != first[1]["node"] and last[0]["node"] != last[1]["node"]  # one worker per node
    assert first[1]["end"] == EVERY + 1 and last[0]["end"] == last[1]["end"] == STEPS
    # Each rank's share: equal in size, disjoint, and resumed exactly where the checkpoint left it (the
    # keys of steps 1-2 from the first attempt, then steps 3-6 from the second: no batch repeated or lost).
    chunks = epoch_order(plan_chunks(paths, PER_RANK), dcfg.seed, 0, True)
    for rank in (0, 1):
        want = [k for c in chunks[rank::2][:STEPS] for k in c.keys]
        got = recs[rank, 0]["keys"][: EVERY * PER_RANK] + recs[rank, EVERY]["keys"]
        assert got == want and len(got) == STEPS * PER_RANK, rank
    assert not set(recs[0, 0]["keys"] + recs[0, EVERY]["keys"]) & set(
        recs[1, 0]["keys"] + recs[1, EVERY]["keys"]
    )
    assert last[0]["weights"] == last[1]["weights"]  # DDP kept the ranks identical
    # fit's result: the driver's module holds the workers' final weights, validated on the driver.
    assert weights_hash(r.module.net) == last[0]["weights"]
    assert r.metrics["steps"] == STEPS and r.timing["resumed_from_step"] == EVERY
    assert {"restored_psnr", "restored_id_sim", "final_loss", "ref_mix"} <= set(r.metrics)
    # report(step, score) is replayed on the driver; the step-2 point went down with the first attempt.
    assert reported == [2 * EVERY] and r.curve[0][0] == 2 * EVERY
    # The caller's ModelCheckpoint wrote last.ckpt as with the local launcher (no last-v1.ckpt beside it:
    # the restart restored its state); Ray Train's storage is gone once the driver has read it.
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    # Rank 0 logged every step to the caller's MLflow run, across the restart.
    client = MlflowClient(uri)
    steps = {m.step for m in client.get_metric_history(logger.run_id, "train/loss")}
    assert set(range(STEPS)) <= steps, sorted(steps)
    assert [x.info.run_id for x in client.search_runs([logger.experiment_id])] == [logger.run_id]
