"""Do the CPU pins bind, and what do they cost? Each training path of the pipeline, pinned and not.

    python benchmarks/bench_cpu_pins.py [--paths id_encoder,train_front,train,refsel] [--runs 2]
                                        [--set MKL_CBWR=COMPATIBLE]

For each path a short fixed-seed training on tiny data made in-process runs in a fresh subprocess (the
pins act only when set before numpy, torch and cv2 load), `--runs` times with the pins
(REFFACE_CPU_PINS=1) and as often without (REFFACE_CPU_PINS=0), interleaved. The child imports the
`stages` package first, as every DVC stage does, so it is pinned exactly as a stage is. The table gives the
sha256 of the trained weights (first 12 hex digits), whether pinned runs agree with each other, unpinned
runs with each other and pinned with unpinned, and the training seconds (best of the runs; data, imports
and Ray's start-up excluded) with their ratio: the pins' cost.

On an AVX-512 machine pinned != unpinned shows that the pins bind: the unpinned run takes the AVX-512
kernels. On an AVX2-only machine the two agree (the pins change nothing there), and the pinned digests
should equal those of an AVX-512 machine's pinned runs: compare the printed digests across machines.

Paths: id_encoder (pipelines.id_training.train_encoder, the train_id_encoder stage), train_front
(stages.train_front.train_front with its Ray degradation stream), train (pipelines.fit.fit: the IConFace
Lightning module, inline degradations), refsel (pipelines.refsel.train, the RefSel U-Net).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("id_encoder", "train_front", "train", "refsel")
THREADS = 2


# ---- the child: one training, pinned or not (REFFACE_CPU_PINS) ------------------------------------------


def weights_digest(state: dict) -> str:
    """sha256 over the state dict: every tensor's name, dtype, shape and raw bytes, in name order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _faces(n_id: int, per_id: int, size: int, pool: str = "encoder", seed: int = 5):
    import numpy as np

    from pipelines.synthetic import face_spec, render

    imgs = [render(face_spec(seed, pool, i, j), 128, size) for i in range(n_id) for j in range(per_id)]
    return np.stack(imgs), np.repeat(np.arange(n_id), per_id)


def _shards(root: Path, n: int, size: int, refs: int = 3, emb_dim: int = 512) -> list[str]:
    """Train shards of synthetic faces: target, `refs` references and their masks, embeddings."""
    import numpy as np

    from pipelines.images import png_bytes
    from pipelines.shards import FORMAT_VERSION, INDEX_NAME, npy_bytes, write_split
    from pipelines.synthetic import conflict_mask, face_spec, render

    specs = [face_spec(7, "album", i, j) for i in range(8) for j in range(4)]
    pngs = [png_bytes(render(s, 128, size)) for s in specs]

    def samples():
        for i in range(n):
            t = i % len(specs)
            s = {"__key__": f"s{i:05d}", "gt.png": pngs[t]}
            for k in range(refs):
                r = (t // 4) * 4 + (t + k + 1) % 4  # another image of the same identity
                s[f"ref{k}.png"] = pngs[r]
                s[f"refmask{k}.png"] = png_bytes(conflict_mask(specs[t], specs[r], size))
            s["meta.json"] = json.dumps({"ref_count": refs, "target": s["__key__"]}).encode()
            s["gt_emb.npy"] = npy_bytes(np.full(emb_dim, t // 4, np.float32))
            s["ref_emb.npy"] = npy_bytes(np.ones((refs, emb_dim), np.float32))
            yield s

    entries = write_split(root, "train", samples(), 32)
    index = {"format_version": FORMAT_VERSION, "splits": {"train": {"samples": n, "shards": entries}}}
    (root / INDEX_NAME).write_text(json.dumps(index))
    return [str(root / e["name"]) for e in entries]


def run_id_encoder(tmp: Path):
    from pipelines.config import EncoderArch, TrainIdEncoderConfig
    from pipelines.id_training import FaceSet, train_encoder

    images, labels = _faces(8, 8, 64)  # the stage's 64 px input and primary architecture
    cfg = TrainIdEncoderConfig(epochs=2, batch_size=16, threads=THREADS)
    t0 = time.perf_counter()
    model, _ = train_encoder(FaceSet(images, labels), EncoderArch(seed=1), cfg, progress=False)
    return model.state_dict(), time.perf_counter() - t0, {}


def run_train_front(tmp: Path):
    import ray

    from pipelines.config import DegradeConfig, TrainFrontConfig
    from pipelines.stream import connect
    from stages.train_front import train_front

    _shards(tmp / "shards", 64, 64)
    cfg = TrainFrontConfig(steps=20, batch_size=8, warmup_steps=4, threads=THREADS, log_every=5)
    dcfg = DegradeConfig(batch_size=8, max_in_flight=2, num_cpus=2)
    connect(dcfg.num_cpus)  # Ray's start-up (the same pinned or not) outside the timing
    t0 = time.perf_counter()
    net, _ = train_front(cfg, dcfg, str(tmp / "shards"))
    seconds = time.perf_counter() - t0

    @ray.remote
    def worker_pins():  # the Ray workers that degraded the batches: did they inherit the pins?
        import torch

        return {"ray_worker_aten": torch.backends.cpu.get_cpu_capability()}

    extra = ray.get(worker_pins.remote())
    ray.shutdown()
    return net.state_dict(), seconds, extra


def run_train(tmp: Path):
    import torch
    import yaml

    from models.id_encoder import IRBackbone, IRConfig
    from models.pathways import FrontEnd, save_front
    from pipelines.config import DegradeConfig, TrainConfig, build
    from pipelines.embedding import Encoders
    from pipelines.fit import fit

    paths = _shards(tmp / "shards", 32, 32)
    torch.manual_seed(0)
    save_front(FrontEnd(8), tmp / "front.safetensors")
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 16, 16, 32), 512)).eval()
    params = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
    tp = {k: v for k, v in params.get("train", {}).items()}
    tp.update(
        {
            "max_steps": 20,
            "batch_size": 4,
            "memory_tokens": 8,
            "pixel_patch": 8,
            "front_end": 8,
            "front": str(tmp / "front.safetensors"),
            "threads": THREADS,
            "compile": False,
        }
    )
    tp = {k: v for k, v in tp.items() if k in TrainConfig.__dataclass_fields__}
    cfg = build(TrainConfig, tp, "train")
    dcfg = build(DegradeConfig, {**params.get("degrade", {}), "batch_size": 4, "max_in_flight": 2}, "degrade")
    t0 = time.perf_counter()
    result = fit(cfg, dcfg, paths, Encoders(enc, enc, "bench", 0.0), None, inline=True)
    return result.module.net.state_dict(), time.perf_counter() - t0, {}


def run_refsel(tmp: Path):
    import numpy as np
    import torch

    from pipelines.config import RefselConfig
    from pipelines.degradations import degrade
    from pipelines.refsel import to_tensor, train
    from pipelines.synthetic import conflict_mask, face_spec, render

    specs = [face_spec(9, "album", i, j) for i in range(8) for j in range(4)]
    imgs = [render(s, 128, 32) for s in specs]
    lq, ref, masks = [], [], []
    for t in range(len(specs)):
        r = (t // 4) * 4 + (t + 1) % 4
        lq.append(degrade(imgs[t], "realesrgan", 0, f"k{t}", 0).image)
        ref.append(imgs[r])
        masks.append(conflict_mask(specs[t], specs[r], 32))
    cfg = RefselConfig(epochs=8, batch_size=8, threads=THREADS)
    torch.set_num_threads(THREADS)  # as the refsel stage does
    t0 = time.perf_counter()
    model, _ = train(to_tensor(lq), to_tensor(ref), torch.from_numpy(np.stack(masks)), cfg, progress=False)
    return model.state_dict(), time.perf_counter() - t0, {}


def child(path: str, result: str) -> None:
    # First, as in every stage: importing the package pins (unless REFFACE_CPU_PINS=0).
    import stages  # noqa: F401

    # isort: split
    import torch

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as d:
        state, seconds, extra = globals()[f"run_{path}"](Path(d))
    from pipelines.cpu_pins import pins_in_effect

    info = pins_in_effect(probe=False)
    Path(result).write_text(
        json.dumps(
            {
                "digest": weights_digest(state),
                "seconds": seconds,
                "aten": info["torch"]["cpu_capability"],
                "numpy_avx512": info["numpy"]["avx512_targets_active"],
                "opencv_avx512_skx": info["opencv"]["avx512_skx"],
                **extra,
            }
        )
    )


# ---- the driver -------------------------------------------------------------------------------------


def run_child(path: str, pinned: bool, overrides: dict[str, str]) -> dict:
    from pipelines.cpu_pins import PINS, SWITCH

    env = {k: v for k, v in os.environ.items() if k not in PINS}  # a clean start: no inherited pins
    env.update({SWITCH: "1" if pinned else "0", "REFFACE_PROGRESS": "0", "PYTHONHASHSEED": "0"})
    if pinned:
        env.update(overrides)  # explicit values win over the pins (setdefault)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p = subprocess.run(
            [sys.executable, __file__, "--child", path, "--result", f.name],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            raise SystemExit(f"{path} ({'pinned' if pinned else 'unpinned'}) failed:\n{p.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--runs", type=int, default=2, help="runs per setting (default 2)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="a pin's value for the pinned runs (e.g. MKL_CBWR=COMPATIBLE, MKL's cross-vendor branch)",
    )
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.result)
        return
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown path(s) {sorted(unknown)}; valid: {', '.join(PATHS)}")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    t_all = time.perf_counter()
    rows, notes = [], []
    for path in paths:
        runs = {True: [], False: []}
        for _ in range(args.runs):
            for pinned in (True, False):  # interleaved: a load change hits both settings alike
                runs[pinned].append(run_child(path, pinned, overrides))
        pin, unp = runs[True], runs[False]
        same = lambda rs: len({r["digest"] for r in rs}) == 1  # noqa: E731
        sp = min(r["seconds"] for r in pin)  # best of the runs: robust to other load on the machine
        su = min(r["seconds"] for r in unp)
        rows.append(
            (
                path,
                pin[0]["digest"][:12],
                unp[0]["digest"][:12],
                same(pin),
                same(unp),
                pin[0]["digest"] == unp[0]["digest"],
                sp,
                su,
                sp / su,
                f"{pin[0]['aten']}/{unp[0]['aten']}",
            )
        )
        for label, rs in (("pinned", pin), ("unpinned", unp)):
            extra = {k: v for k, v in rs[0].items() if k.startswith("ray_")}
            if extra:
                notes.append(f"{path} {label}: {extra}")
        if pin[0]["numpy_avx512"] or pin[0]["opencv_avx512_skx"]:
            notes.append(f"{path} pinned: numpy AVX-512 {pin[0]['numpy_avx512']}, OpenCV AVX512-SKX on")
    head = (
        f"{'path':12s} {'sha256 pinned':13s} {'sha256 unpin':13s} {'P==P':5s} {'U==U':5s} {'P==U':5s} "
        f"{'s pinned':>8s} {'s unpin':>8s} {'ratio':>6s}  ATen P/U"
    )
    print(
        f"CPU pins: {args.runs} runs per setting, {THREADS} torch threads, {os.cpu_count()} CPUs; seconds of "
        "training (best of the runs), ratio = pinned / unpinned"
        + (f"; pinned runs with {overrides}" if overrides else "")
    )
    print(head)
    print("-" * len(head))
    yn = lambda b: "yes" if b else "NO"  # noqa: E731
    for r in rows:
        print(
            f"{r[0]:12s} {r[1]:13s} {r[2]:13s} {yn(r[3]):5s} {yn(r[4]):5s} {yn(r[5]):5s} "
            f"{r[6]:8.2f} {r[7]:8.2f} {r[8]:6.2f}  {r[9]}"
        )
    for n in notes:
        print("  " + n)
    stable = all(r[3] and r[4] for r in rows)
    bind = [r[0] for r in rows if not r[5]]
    cost = sum(r[6] for r in rows) / max(sum(r[7] for r in rows), 1e-9)
    print(
        f"summary: runs {'repeat' if stable else 'DO NOT repeat'} byte for byte within each setting; the pins "
        f"change the weights of {len(bind)}/{len(rows)} paths ({', '.join(bind) or 'none'}); pinned training "
        f"takes {cost:.2f}x the unpinned time; {time.perf_counter() - t_all:.0f} s in all"
    )


if __name__ == "__main__":
    main()
