"""The same numerical paths on any x86-64 CPU with AVX2: pin every library's CPU dispatch to AVX2.

torch, MKL, oneDNN, numpy, OpenBLAS and OpenCV each pick their kernels by the CPU they run on, once, when
the library loads. An AVX-512 machine therefore computes the same training step with other kernels (other
vector widths, other summation orders) than an AVX2 machine, and the bytes differ from the first stage that
trains (`train_id_encoder`) on. `pin_cpu_numerics()` sets the environment switches that make each library
take its AVX2 path on every CPU that has AVX2:

    ATEN_CPU_CAPABILITY=avx2        torch's ATen kernels (softmax, GELU, SDPA, ...): capability AVX2
    MKL_CBWR=AVX2                   MKL (torch's BLAS, VML: matmul, linear, exp, tanh): the AVX2 code branch
                                    of MKL's Conditional Numerical Reproducibility (needs a fixed thread
                                    count: the stages set torch's threads from params.yaml)
    ONEDNN_MAX_CPU_ISA=AVX2         oneDNN (torch's convolutions, forward and backward): AVX2 kernels
    NPY_DISABLE_CPU_FEATURES=...    numpy's AVX-512 dispatch targets off (np.exp, np.log on float64, ...)
    OPENBLAS_CORETYPE=Haswell       numpy's (and scipy's) OpenBLAS: the Haswell (AVX2) kernels, not SkylakeX
    OPENCV_CPU_DISABLE=AVX512-SKX   OpenCV's AVX-512 dispatch target off (only set on a CPU with AVX-512:
                                    on others OpenCV prints a warning for a feature it does not have)
    OPENCV_IPP=avx2                 OpenCV's Intel IPP: at most its AVX2 (l9) code

A switch acts only when it is in the environment BEFORE its library loads, so call this before numpy,
torch or cv2 is imported: `stages/__init__.py` does it for every stage (`python -m stages.<name>`
imports the package first), `tests/conftest.py` for the tests. Child processes (Ray workers, Lightning
and DDP ranks, subprocesses) inherit the environment. When a library is already loaded and its switch is
not yet set, the call raises RuntimeError naming the library (the pin would be silently ineffective).

Setdefault semantics: a variable already in the environment wins (a user's explicit value, or a parent
process's pin). `REFFACE_CPU_PINS=0` turns the pins off (nothing is set). `pins_in_effect()` reports
what the libraries of this process actually run (ATen's capability, MKL's CNR branch and ISA, oneDNN's
ISA and convolution kernel, numpy's AVX-512 targets, OpenBLAS's core, OpenCV's features and IPP).

Each switch was checked on an Intel Xeon with AVX-512 (tests/test_cpu_pins.py): with it the library
reports its AVX2 path (ATen AVX2, MKL "CNR:AVX2", oneDNN "jit:avx2", no numpy AVX-512 target, OpenBLAS
Haswell, OpenCV "AVX512-SKX?"), and torch, numpy and MKL results change bytes against a run without it.
OpenCV's switch binds but no OpenCV call of the pipeline changes bytes with it (the degradations' digests
are the same pinned and unpinned). benchmarks/bench_cpu_pins.py: the weights of all four training paths
differ pinned vs unpinned and repeat byte for byte within each; pinned training takes ~1.1x the time.

Known limits (what these switches do not pin):
  - MKL_CBWR=AVX2 is honoured on Intel CPUs only. MKL's documentation: "Settings other than AUTO or
    COMPATIBLE are available only for Intel processors"; elsewhere MKL silently uses AUTO (its own ISA
    dispatch). MKL_CBWR=COMPATIBLE (SSE2) is its one branch for Intel and AMD alike: set it in the
    environment for outputs that must match across vendors (measured: ~1.3x the unpinned training time,
    1.75x for IConFace's `train`). `pins_in_effect()["torch"]["mkl_cnr"]` shows the branch MKL runs.
  - oneDNN sizes some blockings by the CPU's cache sizes; nothing pins that.
  - Thread counts: reductions split by thread, so results are the same for the same thread count only.
  - A Ray cluster joined by RAY_ADDRESS: its workers have the cluster's environment, not the driver's;
    start the cluster with these variables set (a local Ray inherits them).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping, MutableMapping

SWITCH = "REFFACE_CPU_PINS"  # "0" turns the pins off

# numpy's AVX-512 dispatch targets (numpy 2.2's __cpu_dispatch__ on x86-64). Naming a target the build
# does not dispatch makes numpy warn at import, so this lists the build's targets exactly; a test checks
# it against the installed numpy (a numpy upgrade that adds a target fails it).
NUMPY_AVX512 = (
    "AVX512F",
    "AVX512CD",
    "AVX512_KNL",
    "AVX512_KNM",
    "AVX512_SKX",
    "AVX512_CLX",
    "AVX512_CNL",
    "AVX512_ICL",
)
# OpenCV's AVX-512 dispatch target (the wheel's "Dispatched code generation: ... AVX2 AVX512_SKX"; its
# switch name is written with a hyphen). Disabling AVX512F alone leaves AVX512-SKX on.
OPENCV_AVX512 = ("AVX512-SKX",)

PINS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": " ".join(NUMPY_AVX512),
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENCV_CPU_DISABLE": ",".join(OPENCV_AVX512),
    "OPENCV_IPP": "avx2",
}
# The module whose load reads each switch (scipy's OpenBLAS loads after numpy, so numpy stands for both).
READ_BY = {
    "ATEN_CPU_CAPABILITY": "torch",
    "MKL_CBWR": "torch",
    "ONEDNN_MAX_CPU_ISA": "torch",
    "NPY_DISABLE_CPU_FEATURES": "numpy",
    "OPENBLAS_CORETYPE": "numpy",
    "OPENCV_CPU_DISABLE": "cv2",
    "OPENCV_IPP": "cv2",
}


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(SWITCH, "1").strip() != "0"


def cpu_flags() -> set[str] | None:
    """The kernel's CPU flags (Linux /proc/cpuinfo), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def wanted_pins(flags: set[str] | None = None) -> dict[str, str]:
    """The switches for this machine: PINS, less OpenCV's AVX-512 switch on a CPU known to lack AVX-512
    (there is nothing to disable, and OpenCV would print a warning at every import)."""
    flags = cpu_flags() if flags is None else flags
    pins = dict(PINS)
    if flags is not None and "avx512f" not in flags:
        pins.pop("OPENCV_CPU_DISABLE")
    return pins


def pin_cpu_numerics(
    environ: MutableMapping[str, str] = os.environ,
    *,
    loaded: Mapping[str, object] | None = None,
    strict: bool = True,
    flags: set[str] | None = None,
) -> dict[str, str]:
    """Set the AVX2 pins in `environ` where not set already; returns the ones it set.

    Off with REFFACE_CPU_PINS=0. `loaded` (default: sys.modules when `environ` is os.environ) names the
    modules already imported: a pin whose library is loaded and whose variable is not yet set could not
    take effect, so the call raises RuntimeError naming the library (nothing is set); with strict=False it
    warns and sets the others.
    """
    if not enabled(environ):
        return {}
    if loaded is None:
        loaded = sys.modules if environ is os.environ else {}
    pins = wanted_pins(flags)
    late: dict[str, list[str]] = {}
    for var, value in pins.items():
        module = READ_BY[var]
        if var not in environ and module in loaded:
            late.setdefault(module, []).append(f"{var}={value}")
    if late:
        where = "; ".join(
            f"{m} is already imported, so {', '.join(v)} cannot take effect" for m, v in late.items()
        )
        msg = (
            f"CPU pins: {where}. Pin before importing it (import stages or call "
            f"pipelines.cpu_pins.pin_cpu_numerics() first), or set {SWITCH}=0 to run unpinned."
        )
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    done = {}
    for var, value in pins.items():
        if var not in environ and READ_BY[var] not in late:
            environ[var] = value
            done[var] = value
    return done


def _stdout_of(fn) -> str:
    """What `fn()` writes to file descriptor 1 (C libraries' verbose output)."""
    import tempfile

    sys.stdout.flush()
    with tempfile.TemporaryFile() as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors="replace")


def _torch_report(probe: bool) -> dict:
    import torch

    out: dict = {
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
    }
    if not probe:
        return out

    def run():
        with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
            torch.ones(8, 8) @ torch.ones(8, 8)
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            torch.nn.functional.conv2d(torch.ones(2, 16, 16, 16), torch.ones(16, 16, 3, 3))

    text = _stdout_of(run)
    m = re.search(r"CNR:(\S+)", text)
    out["mkl_cnr"] = m.group(1) if m else None
    m = re.search(r"MKL_VERBOSE oneMKL.*? architecture (.*?)(?:, Lnx|, Win|$)", text, re.M)
    out["mkl_isa"] = m.group(1).strip() if m else None
    m = re.search(r"onednn_verbose,.*?isa:(.*)", text)
    out["onednn_isa"] = m.group(1).strip() if m else None
    m = re.search(r"onednn_verbose,.*?,exec,cpu,convolution,([^,]+),", text)
    out["onednn_conv_impl"] = m.group(1) if m else None
    return out


def _numpy_report() -> dict:
    import numpy as np

    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    avx512 = [t for t in __cpu_dispatch__ if t.startswith("AVX512")]
    out = {
        "version": np.__version__,
        "avx512_dispatch_targets": avx512,
        "avx512_targets_active": [t for t in avx512 if __cpu_features__.get(t)],
        "avx2_active": bool(__cpu_features__.get("AVX2")),
        "openblas_core": None,
    }
    try:
        from threadpoolctl import threadpool_info

        cores = [i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"]
        out["openblas_core"] = cores[0] if cores else None
    except Exception:  # threadpoolctl absent: say nothing rather than guess
        pass
    return out


def _opencv_report() -> dict:
    import cv2

    return {
        "version": cv2.__version__,
        # '?' marks a dispatch target that is off (disabled or absent).
        "cpu_features": cv2.getCPUFeaturesLine(),
        "avx512_skx": bool(cv2.checkHardwareSupport(256)),  # CV_CPU_AVX512_SKX
        "ipp": cv2.ipp.getIppVersion() if cv2.ipp.useIPP() else "off",
    }


def pins_in_effect(probe: bool = True) -> dict:
    """What this process's libraries run: the pins' environment and each library's own report.

    Imports torch, numpy and cv2 (they load with the environment as it is). `probe` runs a tiny matmul
    and convolution with MKL's and oneDNN's verbose output on to read MKL's CNR branch and ISA and
    oneDNN's ISA and kernel. `problems` lists every pinned library that does not run its AVX2 path.
    """
    flags = cpu_flags()
    env = {var: os.environ.get(var) for var in PINS}
    report = {
        "enabled": enabled(),
        "cpu_avx2": None if flags is None else "avx2" in flags,
        "cpu_avx512": None if flags is None else "avx512f" in flags,
        "env": env,
        "torch": _torch_report(probe),
        "numpy": _numpy_report(),
        "opencv": _opencv_report(),
    }
    problems = []
    t, n, c = report["torch"], report["numpy"], report["opencv"]
    if env["ATEN_CPU_CAPABILITY"] and t["cpu_capability"] != env["ATEN_CPU_CAPABILITY"].upper():
        problems.append(f"ATen runs {t['cpu_capability']}, not {env['ATEN_CPU_CAPABILITY'].upper()}")
    branch = (env["MKL_CBWR"] or "").upper().removeprefix("BRANCH=").split(",")[0].strip()  # "AVX2[,STRICT]"
    if branch and probe and (t.get("mkl_cnr") or "").split(",")[0] != branch:
        problems.append(
            f"MKL runs CNR branch {t.get('mkl_cnr')}, not {env['MKL_CBWR']} (MKL honours branches other "
            "than AUTO and COMPATIBLE on Intel CPUs only)"
        )
    if env["ONEDNN_MAX_CPU_ISA"] and probe and "avx512" in (t.get("onednn_conv_impl") or ""):
        problems.append(f"oneDNN runs {t.get('onednn_conv_impl')} despite ONEDNN_MAX_CPU_ISA")
    if env["NPY_DISABLE_CPU_FEATURES"] and n["avx512_targets_active"]:
        problems.append(f"numpy still dispatches {n['avx512_targets_active']}")
    if env["OPENBLAS_CORETYPE"] and n["openblas_core"] and n["openblas_core"] != env["OPENBLAS_CORETYPE"]:
        problems.append(f"OpenBLAS runs {n['openblas_core']}, not {env['OPENBLAS_CORETYPE']}")
    if env["OPENCV_CPU_DISABLE"] and c["avx512_skx"]:
        problems.append("OpenCV still dispatches AVX512-SKX")
    report["problems"] = problems
    return report


if __name__ == "__main__":  # python -m pipelines.cpu_pins: pin, then print what is in effect
    import json

    pin_cpu_numerics()
    print(json.dumps(pins_in_effect(), indent=2))
