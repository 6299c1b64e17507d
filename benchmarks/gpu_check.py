"""The GPU acceptance check: proves the recipe's code path on one CUDA machine in about five minutes.

    python benchmarks/gpu_check.py                    # CUDA: klein's widths at 512², writes gpu_check.json
    python benchmarks/gpu_check.py --small            # the same code on the CPU with tiny shapes (tests)
    python benchmarks/gpu_check.py --skip bench       # without the benchmark rows

Unattended: one PASS/FAIL line per item as it ends, a final summary line, and a JSON report (`--json`,
rewritten after every item, so a run cut short keeps what it proved). An item that fails does not stop
the others unless they need its output. Items:

  weights  random weights written as the local folders a user gives: `train.weights` (a diffusers
           transformer folder in klein's widths at a reduced depth), `train.vae` (the FLUX.2 VAE's
           config), `train.prompt_cache`, and the identity encoder's checkpoint
  shards   a few 512² webdataset shards in the project's format (target, references, embeddings)
  config   params.yaml with configs/recipe_gpu.yaml merged over it through the stages' own reader, the
           three paths pointed at the folders above, validated as the `train` stage validates it
  fit      `pipelines.fit.fit` with the recipe (bf16-mixed, frozen bf16, gradient checkpointing inside
           compiled blocks, batch 1 × accumulate 4), the stream degrading inline (no Ray)
  resume   a second `fit` resumes from the first's last.ckpt (the state a killed run leaves): the step
           count and the reference-mix counters continue, the loss is finite
  restore  `Restorer` on a bundle of the trained weights (LoRA merged, bf16, compiled blocks) restores
           targets with 0 and with 3 references
  pyfunc   the served model's code (`pipelines.registry.RestorerModel`: load_context, predict) on
           base64 rows, without MLflow
  bench    `bench_gpu.py`'s rows at klein's full depth: the recipe's compiled training step, and
           restoring with the `Restorer`'s set-up (merged, bf16, compiled) with where one forward's
           device time goes; `bench_gpu.py` alone has the other rows

Nothing here imports Ray, MLflow, label-studio-sdk or Optuna (the GPU machine may lack them; the test
of `--small` runs with them blocked).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_gpu  # noqa: E402

ITEMS = ("weights", "shards", "config", "fit", "resume", "restore", "pyfunc", "bench")
NEEDS = {
    "shards": (),
    "config": ("weights",),
    "fit": ("weights", "shards", "config"),
    "resume": ("fit",),
    "restore": ("fit",),
    "pyfunc": ("restore",),
    "bench": (),
}


@dataclass(frozen=True)
class Check:
    scale: bench_gpu.Scale
    depth: tuple[int, int]  # (double, single) blocks of the written transformer
    encoder: dict  # IRConfig of the identity encoder
    samples: int  # targets in the shards
    fit_steps: int  # optimiser steps of the first fit (the resume goes one further)
    restore_steps: int
    device: str
    bench_args: tuple[str, ...]


FULL = Check(
    bench_gpu.FULL,
    (1, 2),
    dict(input_size=112),
    8,
    2,
    12,
    "cuda",
    ("--rows", "13", "--restore", "4", "--profile", "--warmup", "2", "--steps", "3", "--restore-runs", "2"),
)
SMALL = Check(
    bench_gpu.SMALL,
    (1, 1),
    bench_gpu.SMALL.encoder,
    4,
    1,
    2,
    "cpu",
    (
        "--small",
        "--rows",
        "1",
        "--restore",
        "3",
        "--no-compile",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--restore-steps",
        "2",
        "--restore-runs",
        "1",
    ),
)


class Failed(RuntimeError):
    pass


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


# ==================================================================================================
# The items
# ==================================================================================================


def write_weights(chk: Check, tmp: Path, state: dict) -> str:
    from models.id_encoder import IRBackbone, IRConfig, save_encoder

    paths = bench_gpu.write_inputs(chk.scale, tmp / "weights", chk.depth)
    torch.manual_seed(0)
    encoder = IRBackbone(IRConfig(**chk.encoder)).eval()
    enc_path = tmp / "weights" / "encoder.safetensors"
    save_encoder(encoder, enc_path, "small_ir")
    state.update(paths=paths, encoder_path=enc_path)
    size = sum(f.stat().st_size for f in (tmp / "weights").rglob("*") if f.is_file())
    return f"{size / 2**20:.0f} MiB in {', '.join(sorted(paths))} and the encoder"


def write_shards(chk: Check, tmp: Path, state: dict) -> str:
    """Targets with 3 references each at the check's resolution (smooth random faces: the values do
    not matter here, the shapes and the format do)."""
    from PIL import Image

    from pipelines.shards import npy_bytes, write_split

    res, dim = chk.scale.resolution, ir_dim(chk)
    rng = np.random.default_rng(0)

    def image() -> bytes:
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((res, res), Image.BICUBIC).save(buf, format="PNG")
        return buf.getvalue()

    def samples():
        for i in range(chk.samples):
            key = f"t{i:04d}"
            s = {"__key__": key, "gt.png": image()}
            for k in range(3):
                s[f"ref{k}.png"] = image()
            s["meta.json"] = json.dumps({"ref_count": 3, "target": key}).encode()
            s["gt_emb.npy"] = npy_bytes(rng.normal(size=dim).astype(np.float32))
            s["ref_emb.npy"] = npy_bytes(rng.normal(size=(3, dim)).astype(np.float32))
            yield s

    entries = write_split(tmp / "shards", "train", samples(), max(1, chk.samples // 2))
    state["shards"] = [str(tmp / "shards" / e["name"]) for e in entries]
    return f"{chk.samples} targets × 3 references at {res}² in {len(entries)} shards"


def ir_dim(chk: Check) -> int:
    from models.id_encoder import IRConfig

    return IRConfig(**chk.encoder).embedding_dim


def recipe_config(chk: Check, state: dict) -> str:
    from pipelines.config import DegradeConfig, TrainConfig, build, read_params

    raw = read_params(ROOT / "params.yaml", ROOT / "configs" / "recipe_gpu.yaml")
    train = {**raw["train"], **state["paths"]}
    train.update(max_steps=chk.fit_steps, log_every=1, threads=os.cpu_count() or 1)
    if chk.device == "cpu":  # --small: the same recipe on the CPU, tiny shapes
        train.update(accelerator="cpu", memory_tokens=chk.scale.memory_tokens)
    cfg = build(TrainConfig, train, "train")
    expect(cfg.backbone == "klein_base_4b" and cfg.precision == "bf16-mixed", "the overlay is not the recipe")
    expect(cfg.gradient_checkpointing and cfg.compile, "the recipe compiles checkpointed blocks")
    state["cfg"] = cfg
    state["dcfg"] = replace(build(DegradeConfig, raw["degrade"], "degrade"), batch_size=cfg.batch_size)
    return (
        f"{cfg.backbone} from {Path(cfg.weights).name}/, {cfg.prediction}, lr {cfg.lr:g}, batch "
        f"{cfg.batch_size} × accumulate {cfg.accumulate}, {cfg.precision}, frozen {cfg.frozen_dtype}, "
        f"checkpointing + compile"
    )


def encoders(state: dict):
    from pipelines.embedding import Encoders, load_identity_encoder

    enc, name, _ = load_identity_encoder("small_ir", str(state["encoder_path"]))
    return Encoders(enc, enc, name, 0.0)


def run_fit(chk: Check, tmp: Path, state: dict) -> str:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipelines.fit import fit

    cfg = state["cfg"]
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    reset_peak(chk)
    t = time.perf_counter()
    res = fit(cfg, state["dcfg"], state["shards"], encoders(state), None, checkpoint=ckpt, inline=True)
    took = time.perf_counter() - t
    m = res.metrics
    expect(m["steps"] == chk.fit_steps, f"fit ran {m['steps']} steps, not {chk.fit_steps}")
    expect(math.isfinite(m["final_loss"]), f"loss {m['final_loss']}")
    expect((tmp / "ckpt" / "last.ckpt").is_file(), "no last.ckpt")
    state["module"] = res.module
    return (
        f"{m['steps']} steps × {cfg.accumulate} micro-batches in {took:.1f} s (compile included), loss "
        f"{m['final_loss']:.4f}, peak {peak(chk)}, data wait {res.timing['data_wait_fraction']:.1%}"
    )


def run_resume(chk: Check, tmp: Path, state: dict) -> str:
    from pipelines.fit import fit

    cfg = state["cfg"]
    before = dict(state["module"].mix)
    steps = chk.fit_steps + 1
    t = time.perf_counter()
    res = fit(
        cfg, state["dcfg"], state["shards"], encoders(state), None, steps=steps,
        resume=str(tmp / "ckpt" / "last.ckpt"), inline=True,
    )  # fmt: skip
    took = time.perf_counter() - t
    m = res.metrics
    expect(m["steps"] == steps, f"resumed run ended at step {m['steps']}, not {steps}")
    want = steps * cfg.accumulate * cfg.batch_size
    expect(
        m["ref_draws"] == want, f"reference draws {m['ref_draws']} after resume, not {want} (counters lost)"
    )
    expect(math.isfinite(m["final_loss"]), f"loss {m['final_loss']}")
    state["module"] = res.module
    return f"resumed at step {chk.fit_steps} → {steps} in {took:.1f} s; draws {sum(before.values())} → {want}"


def run_restore(chk: Check, tmp: Path, state: dict) -> str:
    from models.lora import save_trainable
    from pipelines.restorer import Restorer, write_bundle

    cfg = state["cfg"]
    save_trainable(state["module"].net, tmp / "trained")
    bundle = write_bundle(
        tmp / "bundle", cfg, tmp / "trained", "small_ir", state["encoder_path"], chk.scale.resolution,
        steps=chk.restore_steps, guidance=4.0,
    )  # fmt: skip
    state["bundle"] = bundle
    t = time.perf_counter()
    restorer = Restorer(bundle, device=chk.device, compile=True)
    load_s = time.perf_counter() - t
    expect(
        restorer.speed["compiled"] and restorer.speed["lora_merged"] > 0, f"not accelerated: {restorer.speed}"
    )
    rng = np.random.default_rng(1)
    res = chk.scale.resolution
    img = lambda: rng.integers(0, 256, (res, res, 3), dtype=np.uint8)  # noqa: E731
    times = {}
    for n_refs in (0, 3):
        lq, refs = img(), [img() for _ in range(n_refs)]
        restorer.restore(lq, refs)  # the compile for this reference count
        sync(chk)
        t = time.perf_counter()
        out = restorer.restore(lq, refs)
        sync(chk)
        times[n_refs] = time.perf_counter() - t
        expect(out.shape == (res, res, 3) and out.dtype == np.uint8, f"{n_refs} refs: output {out.shape}")
        expect(int(out.max()) > int(out.min()), f"{n_refs} refs: a flat image")
    return (
        f"load + merge + compile {load_s:.1f} s; per image {times[0]:.3f} s with 0 and {times[3]:.3f} s with 3 "
        f"references ({chk.restore_steps} steps, guidance 4)"
    )


def run_pyfunc(chk: Check, tmp: Path, state: dict) -> str:
    import pandas as pd
    from PIL import Image

    from pipelines.registry import RestorerModel

    model = RestorerModel()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(state["bundle"])}))
    rng = np.random.default_rng(2)
    res = chk.scale.resolution

    def b64() -> str:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    rows = pd.DataFrame(
        {"lq": [b64(), b64()], "ref1": [b64(), None], "ref2": [b64(), None], "ref3": [b64(), None]}
    )
    t = time.perf_counter()
    out = model.predict(None, rows)
    took = time.perf_counter() - t
    expect(list(out.columns) == ["restored"] and len(out) == 2, f"predict returned {out.shape}")
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["restored"][0]))))
    expect(img.shape == (res, res, 3), f"restored image {img.shape}")
    return f"2 rows (3 and 0 references) in {took:.2f} s, compile included"


def run_bench(chk: Check, tmp: Path, state: dict) -> str:
    """bench_gpu.py in its own process: its rows compile afresh and a crash there cannot take the items
    above with it."""
    import subprocess

    js = tmp / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), *chk.bench_args, "--json", str(js)]
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    out = json.loads(js.read_text()) if js.is_file() else {"train": [], "restore": []}
    state["bench"] = out
    expect(proc.returncode == 0, f"bench_gpu.py exited with {proc.returncode} after {len(out['train'])} rows")
    expect(out["train"] or out["restore"], "no rows")
    for r in out["train"]:
        expect(math.isfinite(r["loss"]), f"{r['label']}: loss {r['loss']}")
    for r in out["restore"]:
        expect(
            r["max_abs_diff"] < 0.25, f"{r['label']}: differs from the first set-up by {r['max_abs_diff']}"
        )
    parts = [
        f"{r['label']}: {r['step_s']:.3f} s, {bench_gpu.fmt(r['peak_gib'], '.1f')} GiB" for r in out["train"]
    ]
    parts += [f"{r['label']}: {r['restore_s']:.3f} s/image" for r in out["restore"]]
    return "; ".join(parts)


RUN = {
    "weights": write_weights,
    "shards": write_shards,
    "config": lambda chk, tmp, state: recipe_config(chk, state),
    "fit": run_fit,
    "resume": run_resume,
    "restore": run_restore,
    "pyfunc": run_pyfunc,
    "bench": run_bench,
}


# ==================================================================================================
# Driver
# ==================================================================================================


def sync(chk: Check) -> None:
    if chk.device == "cuda":
        torch.cuda.synchronize()


def reset_peak(chk: Check) -> None:
    if chk.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(chk: Check) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if chk.device == "cuda" else "— (CPU)"


OPTIONAL = ("ray", "mlflow", "optuna", "label_studio_sdk")  # absent on the GPU machine


def block_optional() -> None:
    """Make importing Ray, MLflow, Optuna or label-studio-sdk fail in this process, as on a machine that
    lacks them (a module set to None in sys.modules raises ImportError on import): the check then
    proves that the GPU path needs none of them, here too."""
    loaded = [m for m in OPTIONAL if m in sys.modules and sys.modules[m] is not None]
    if loaded:
        raise SystemExit(f"gpu_check: {', '.join(loaded)} already imported before the check started")
    for m in OPTIONAL:
        sys.modules[m] = None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes on the CPU (the test suite's mode)")
    p.add_argument("--skip", default="", help="comma-separated items to leave out (e.g. bench)")
    p.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = p.parse_args(argv)
    chk = SMALL if args.small else FULL
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --small on the CPU")
    if args.small:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    block_optional()
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(ITEMS)
    if unknown:
        raise SystemExit(f"gpu_check: unknown item(s) {sorted(unknown)}; valid: {', '.join(ITEMS)}")
    report: dict = {
        "device": torch.cuda.get_device_name() if chk.device == "cuda" else "cpu (--small)",
        "torch": torch.__version__,
        "items": {},
    }
    print(f"gpu_check on {report['device']}, torch {torch.__version__}", flush=True)
    state: dict = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for item in ITEMS:
            if item in skip:
                report["items"][item] = {"status": "SKIP"}
                continue
            missing = [n for n in NEEDS.get(item, ()) if report["items"].get(n, {}).get("status") != "PASS"]
            t = time.perf_counter()
            if missing:
                status, detail = "FAIL", f"not run: needs {', '.join(missing)}"
            else:
                try:
                    status, detail = "PASS", RUN[item](chk, Path(tmp), state)
                except Exception as exc:  # one item's failure is reported and the others go on
                    status = "FAIL"
                    detail = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
            took = time.perf_counter() - t
            report["items"][item] = {"status": status, "seconds": round(took, 1), "detail": detail}
            print(f"{status} {item} ({took:.1f} s): {detail}", flush=True)
            if "bench" in state:
                report["bench"] = state.pop("bench")
            args.json.write_text(json.dumps(report, indent=2))
    total = time.perf_counter() - t_all
    failed = [k for k, v in report["items"].items() if v["status"] == "FAIL"]
    passed = [k for k, v in report["items"].items() if v["status"] == "PASS"]
    report["seconds"] = round(total, 1)
    report["passed"] = not failed
    args.json.write_text(json.dumps(report, indent=2))
    print(
        f"gpu_check: {'PASS' if not failed else 'FAIL'}: {len(passed)} passed, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + f", {total:.0f} s on {report['device']}; report {args.json}",
        flush=True,
    )
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
