"""dvc.yaml's `deps` cannot go stale: each stage lists exactly the project modules its
`stages/<name>.py` imports, transitively (lazy imports inside functions included), and exactly the
params sections it reads through `load_params`.

On a mismatch the failure names the stage and the files or sections to add or remove.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "pipelines", "models", "annotation")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    f = ROOT.joinpath(*parts).with_suffix(".py")
    if f.is_file():
        return f
    pkg = ROOT.joinpath(*parts) / "__init__.py"
    return pkg if pkg.is_file() else None


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file (top level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if _module_file(m) is not None}


def import_closure(entry: Path) -> set[str]:
    """Repository-relative paths of every project file `entry` needs, itself included. An
    `__init__.py` counts only when it holds code."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_module_file(m) for m in _imports(f))
    return {f.relative_to(ROOT).as_posix() for f in seen if f.name != "__init__.py" or f.read_text().strip()}


def params_read(entry_files: set[str]) -> set[str]:
    """Sections named in `load_params(path, "a", "b", ...)` calls of the stage's own files."""
    out: set[str] = set()
    for rel in entry_files:
        if not rel.startswith("stages/"):
            continue
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params":
                out.update(a.value for a in node.args[1:] if isinstance(a, ast.Constant))
                out.add("overlay")  # load_params merges the file params.yaml's `overlay` names
    return out


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_exactly_its_import_closure():
    problems = []
    for name, stage in _stages().items():
        entry = ROOT / "stages" / f"{name}.py"
        assert entry.is_file(), f"stage {name}: no stages/{name}.py"
        want = import_closure(entry)
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
        missing, extra = sorted(want - listed), sorted(listed - want)
        if missing or extra:
            problems.append(f"stage {name}: add {missing or 'nothing'}; remove {extra or 'nothing'}")
    assert not problems, "dvc.yaml deps disagree with the import closure:\n" + "\n".join(problems)


def test_every_stage_lists_exactly_the_params_sections_it_reads():
    problems = []
    for name, stage in _stages().items():
        read = params_read(import_closure(ROOT / "stages" / f"{name}.py"))
        listed = {str(p).split(".")[0] for p in stage.get("params", [])}
        if read != listed:
            problems.append(
                f"stage {name}: reads {sorted(read)}, dvc.yaml lists {sorted(listed)} "
                f"(add {sorted(read - listed) or 'nothing'}, remove {sorted(listed - read) or 'nothing'})"
            )
    assert not problems, "dvc.yaml params disagree with the sections the stages read:\n" + "\n".join(problems)


def test_every_stage_depends_on_the_overlays():
    """params.yaml's `overlay` names a file under configs/: every stage that reads params lists the key and
    the folder, so switching to or editing an overlay reruns what it changes."""
    for name, stage in _stages().items():
        assert "configs" in stage.get("deps", []), f"stage {name}: add configs to deps"


def test_the_closure_follows_lazy_imports(tmp_path):
    """A module imported inside a function counts (tune imports pipelines.fit inside run_trials)."""
    closure = import_closure(ROOT / "stages" / "tune.py")
    assert "pipelines/fit.py" in closure and "models/iconface.py" in closure


def sync_dvc_yaml() -> list[str]:
    """Rewrite each stage's `.py` deps in dvc.yaml to its import closure (sorted, script first), keeping
    every other line and comment; returns the stages that changed. `python tests/test_dvc_deps.py`."""
    lines = (ROOT / "dvc.yaml").read_text().splitlines()
    out, stage, changed, i = [], None, [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("    ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if stage and line.strip() == "deps:" and (ROOT / "stages" / f"{stage}.py").is_file():
            out.append(line)
            i += 1
            old, rest = [], []
            while i < len(lines) and lines[i].startswith("      - "):
                item = lines[i].strip()[2:]
                (old if item.endswith(".py") else rest).append(item)
                i += 1
            entry = f"stages/{stage}.py"
            new = [entry, *sorted(import_closure(ROOT / entry) - {entry})]
            if new != old:
                changed.append(stage)
            out += [f"      - {d}" for d in new + rest]
            continue
        out.append(line)
        i += 1
    (ROOT / "dvc.yaml").write_text("\n".join(out) + "\n")
    return changed


if __name__ == "__main__":
    print("updated:", ", ".join(sync_dvc_yaml()) or "nothing")
