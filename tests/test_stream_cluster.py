"""The cluster path: a head and a second node started with `ray start` on this machine.

The stream joins through RAY_ADDRESS exactly as it would on a real cluster, and the test checks that
batches were produced on both nodes. (`ray stop` at the end stops every Ray process of this machine,
so this module runs after the local-Ray tests.)
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_shards

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = """
import json, sys
from pipelines.stream import DegradationStream, connect
import ray
connect()
paths = json.loads(sys.argv[1])
s = DegradationStream(paths, "iconface_mixed", seed=0, batch_size=8, max_in_flight=4)
keys = [k for b in s.epoch(0) for k in b["keys"]]
print(json.dumps({"nodes": len([n for n in ray.nodes() if n["Alive"]]), "samples": len(keys),
                  "unique": len(set(keys)), "per_node": s.stats["nodes"]}))
"""


def test_stream_runs_on_both_nodes_of_a_two_node_cluster(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    paths = make_shards(tmp_path / "shards", 256, refs=1, per_shard=64)
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    head = [
        ray_bin,
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=1",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    worker = [ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats"]
    try:
        for cmd in (head, worker):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr[-2000:]
        res = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(paths)],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert got["nodes"] == 2
    assert got["samples"] == got["unique"] == 256
    assert len(got["per_node"]) == 2 and min(got["per_node"].values()) > 0, got["per_node"]
