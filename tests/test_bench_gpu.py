"""benchmarks/bench_gpu.py cannot rot: its --small mode runs the real code path on a tiny config (CPU)."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_bench_gpu_small_runs_every_part(tmp_path):
    import bench_gpu

    out = bench_gpu.main(
        [
            "--small",
            "--rows",
            "1,5",
            "--restore",
            "1,2,3",
            "--no-compile",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--restore-steps",
            "2",
            "--restore-runs",
            "1",
            "--json",
            str(tmp_path / "gpu.json"),
            "--plot",
            str(tmp_path / "gpu.png"),
        ]
    )
    assert json.loads((tmp_path / "gpu.json").read_text())["scale"] == "tiny"
    assert (tmp_path / "gpu.png").stat().st_size > 1000
    recipe, fp32 = out["train"]
    assert recipe["label"].startswith("eager: full") and "float32" in fp32["label"]
    # frozen weights stored in bf16 in the recipe row, float32 in the other: the recipe holds less
    assert 0.4 < recipe["weights_mib"] / fp32["weights_mib"] < 0.9
    for r in out["train"]:
        assert r["step_s"] > 0 and r["floor_step_s"] > 0 and r["loss"] == r["loss"]
    assert [r["label"] for r in out["restore"]] == [
        "float32 weights under autocast",
        "weights cast to bf16 once",
        "LoRA merged, bf16 weights",
    ]
    assert out["scale"] == "tiny" and out["train"][0]["weights_mib"] > 0
    assert all(r["max_abs_diff"] < 0.25 for r in out["restore"])  # bf16 tolerance in [-1, 1]
    assert out["forward_tflop_3_refs"] > 0 and out["floor_forward_s"] > 0
