"""CPU pins (pipelines.cpu_pins): set with setdefault semantics, off with REFFACE_CPU_PINS=0, refused when a
library is already loaded, applied by `import stages` (every `python -m stages.<name>`), and binding: a
pinned process runs ATen, MKL, oneDNN, numpy, OpenBLAS and OpenCV on their AVX2 paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from pipelines.cpu_pins import NUMPY_AVX512, OPENCV_AVX512, PINS, SWITCH, cpu_flags, pin_cpu_numerics

FLAGS = cpu_flags() or set()
needs_avx2 = pytest.mark.skipif(
    "avx2" not in FLAGS, reason="the CPU has no AVX2 (or its flags are unreadable)"
)


def _vendor() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^vendor_id\s*:\s*(\S+)", f.read(), re.M)
        return m.group(1) if m else None
    except OSError:
        return None


def _clean_env(**extra) -> dict:
    """The environment less every pin (a process that starts unpinned), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in PINS and k != SWITCH}
    env.update(extra)
    return env


def _python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pin_sets_every_switch_and_keeps_explicit_values():
    env = {"MKL_CBWR": "COMPATIBLE", "PATH": "/bin"}
    done = pin_cpu_numerics(env, loaded={}, flags={"avx2", "avx512f"})
    assert env == {**PINS, "MKL_CBWR": "COMPATIBLE", "PATH": "/bin"}  # the user's value wins
    assert done == {k: v for k, v in PINS.items() if k != "MKL_CBWR"}
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert set(env["NPY_DISABLE_CPU_FEATURES"].split()) == set(NUMPY_AVX512)
    assert pin_cpu_numerics(env, loaded={}, flags={"avx2", "avx512f"}) == {}  # idempotent


def test_opencv_switch_only_where_the_cpu_has_avx512():
    env: dict = {}
    pin_cpu_numerics(env, loaded={}, flags={"avx2"})
    assert "OPENCV_CPU_DISABLE" not in env  # OpenCV would warn of a feature the CPU lacks
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["OPENCV_IPP"] == "avx2"


@pytest.mark.parametrize("off", ["0", " 0 "])
def test_refface_cpu_pins_0_turns_them_off(off):
    env = {SWITCH: off}
    assert pin_cpu_numerics(env, loaded={"torch": object()}, flags={"avx2", "avx512f"}) == {}
    assert env == {SWITCH: off}


def test_refused_when_the_library_is_already_loaded():
    env: dict = {}
    with pytest.raises(RuntimeError, match=r"torch is already imported, so ATEN_CPU_CAPABILITY=avx2"):
        pin_cpu_numerics(env, loaded={"torch": object(), "numpy": object()}, flags={"avx512f"})
    assert env == {}  # nothing set
    # Already in the environment (a parent's pin or the user's value): the library loaded with it.
    env = {k: PINS[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    pin_cpu_numerics(env, loaded={"torch": object()}, flags={"avx512f"})
    assert env == PINS
    # strict=False: warns, and pins what can still take effect.
    env = {}
    with pytest.warns(RuntimeWarning, match="numpy is already imported"):
        done = pin_cpu_numerics(env, loaded={"numpy": object()}, flags={"avx512f"}, strict=False)
    assert "NPY_DISABLE_CPU_FEATURES" not in env and "OPENBLAS_CORETYPE" not in env
    assert done["ATEN_CPU_CAPABILITY"] == "avx2" and done["OPENCV_CPU_DISABLE"] == "AVX512-SKX"


def test_refused_in_a_process_that_imported_torch_first():
    p = _python(
        "import torch\nfrom pipelines.cpu_pins import pin_cpu_numerics\npin_cpu_numerics()", _clean_env()
    )
    assert p.returncode != 0
    assert "RuntimeError: CPU pins: torch is already imported" in p.stderr


def test_the_lists_match_the_installed_numpy_and_opencv():
    """A numpy or OpenCV upgrade that adds an AVX-512 dispatch target must add it to the pins."""
    import cv2
    from numpy._core._multiarray_umath import __cpu_dispatch__

    assert {t for t in __cpu_dispatch__ if t.startswith("AVX512")} == set(NUMPY_AVX512)
    line = re.search(r"Dispatched code generation:\s*(.*)", cv2.getBuildInformation()).group(1)
    assert {t.replace("_", "-", 1) for t in line.split() if t.startswith("AVX512")} <= set(OPENCV_AVX512)


@needs_avx2
def test_the_tests_run_pinned():
    if os.environ.get(SWITCH, "1").strip() == "0":
        pytest.skip(f"{SWITCH}=0")
    import torch

    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"


@needs_avx2
def test_a_pinned_process_runs_every_library_on_avx2():
    code = (
        "from pipelines.cpu_pins import pin_cpu_numerics, pins_in_effect\n"
        "pin_cpu_numerics()\n"
        "import json; print(json.dumps(pins_in_effect()))"
    )
    p = _python(code, _clean_env())
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["torch"]["cpu_capability"] == "AVX2"
    assert "avx512" not in (r["torch"]["onednn_conv_impl"] or "") and "AVX2" in (
        r["torch"]["onednn_isa"] or "AVX2"
    )
    assert r["numpy"]["avx512_targets_active"] == [] and r["numpy"]["avx2_active"]
    if r["numpy"]["openblas_core"] is not None:
        assert r["numpy"]["openblas_core"].lower() == "haswell"
    assert not r["opencv"]["avx512_skx"]
    if _vendor() == "GenuineIntel":  # MKL honours MKL_CBWR=AVX2 on Intel CPUs only
        assert r["torch"]["mkl_cnr"] == "AVX2" and r["problems"] == []
    unpinned = _python(code, _clean_env(**{SWITCH: "0"}))
    assert unpinned.returncode == 0, unpinned.stderr[-2000:]
    u = json.loads(unpinned.stdout.strip().splitlines()[-1])
    assert not u["enabled"] and all(v is None for v in u["env"].values())
    if "avx512f" in FLAGS:  # the pins change what runs: the unpinned process takes AVX-512
        assert u["torch"]["cpu_capability"] == "AVX512"
        assert u["numpy"]["avx512_targets_active"]


@needs_avx2
def test_importing_stages_pins_the_process():
    code = (
        "import stages, os, json, torch\n"
        "from pipelines.cpu_pins import PINS\n"
        "print(json.dumps([{k: os.environ.get(k) for k in PINS}, torch.backends.cpu.get_cpu_capability()]))"
    )
    p = _python(code, _clean_env())
    assert p.returncode == 0, p.stderr[-2000:]
    env, cap = json.loads(p.stdout)
    assert cap == "AVX2"
    assert {k: v for k, v in env.items() if v is not None} == {
        k: v for k, v in PINS.items() if k != "OPENCV_CPU_DISABLE" or "avx512f" in FLAGS
    }


@needs_avx2
def test_python_m_stages_runs_pinned():
    """`python -m stages.<name>` (dvc.yaml's commands) imports the package first: the stage's process is
    pinned before it imports anything. `-i` keeps the process open after the module to ask it."""
    ask = "import os, torch; print('PINNED', os.environ.get('ATEN_CPU_CAPABILITY'), torch.backends.cpu.get_cpu_capability())\n"
    p = subprocess.run(
        [sys.executable, "-i", "-m", "stages._common"],
        input=ask,
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PINNED avx2 AVX2" in p.stdout
    off = subprocess.run(
        [sys.executable, "-i", "-m", "stages._common"],
        input=ask,
        cwd=REPO,
        env=_clean_env(**{SWITCH: "0"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "PINNED None" in off.stdout
