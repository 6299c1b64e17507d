"""Image sources: list what a source holds, with identity labels, splits and released mappings.

Kinds (params.yaml `source.kind`):

* ``synthetic`` — the embedded default: `root/<identity>/<image>.png` written by the `synthesize`
  stage, plus `root/states.jsonl` (render parameters, for exact conflict masks);
* ``folder_by_identity`` and ``celebref_hq`` — `root/<identity>/<images>` (CelebRef-HQ ships this
  layout with numeric identity folders);
* ``unlabelled_folder`` — `root/**/<images>` with no labels: identities come from the `pairs` graph;
* ``ffhq_ref`` — the released FFHQ-Ref layout: `reference_mapping/{train,val,test}_references.csv`
  (`gt_image`, `ref_image` as a Python list literal, `lq_image` for val/test),
  `id_based_ffhq_split/{split}_image.txt`, and `images_dir` with the FFHQ images the user resized.

Listing never opens images (that is `ingest`'s job); it reports structural problems — files outside
identity folders, unsupported extensions, CSV rows that name missing files or cannot be parsed — as
`problems`, each naming the file or row.
"""

from __future__ import annotations

import ast
import csv
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import SourceConfig

SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """The source as a whole is unusable (missing root, no images at all)."""


@dataclass(frozen=True)
class SourceItem:
    image_id: str
    path: str  # as reachable from the working directory
    relpath: str  # relative to the source root
    identity: str | None
    split: str | None


@dataclass
class SourceListing:
    kind: str
    root: str
    items: list[SourceItem]
    problems: list[dict] = field(default_factory=list)  # {"item", "reason", "detail"}
    mapping: list[dict] | None = None  # ffhq_ref: {"split", "gt", "refs", "lq", "row"}
    labelled: bool = True


def sanitize_id(text: str) -> str:
    """A stable image id: letters, digits, '_' and '-' only (webdataset keys cut at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "img"


def _unique_ids(entries: list[tuple[str, str]]) -> dict[str, str]:
    """Map relpath -> image id from (relpath, preferred id); a colliding id gets its extension appended."""
    counts: dict[str, int] = defaultdict(int)
    for _, want in entries:
        counts[want] += 1
    out, used = {}, set()
    for rel, want in entries:
        iid = want if counts[want] == 1 else sanitize_id(f"{want}_{Path(rel).suffix.lstrip('.')}")
        n = 2
        base = iid
        while iid in used:
            iid, n = f"{base}_{n}", n + 1
        used.add(iid)
        out[rel] = iid
    return out


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def list_source(cfg: SourceConfig) -> SourceListing:
    """List the images of the configured source (sorted, deterministic)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise SourceError(
            f"source.root {cfg.root!r} is not a folder (source.kind={cfg.kind}); set source.root"
        )
    if cfg.kind == "ffhq_ref":
        listing = _list_ffhq_ref(cfg, root)
    elif cfg.kind in ("synthetic", "folder_by_identity", "celebref_hq"):
        listing = _list_by_identity(cfg, root)
    else:
        listing = _list_unlabelled(cfg, root)
    if not listing.items:
        raise SourceError(
            f"source.root {cfg.root!r} holds no images with extensions {', '.join(cfg.extensions)} "
            f"(source.kind={cfg.kind}); {len(listing.problems)} other file(s) found"
        )
    return listing


def _is_image(p: Path, cfg: SourceConfig) -> bool:
    return p.suffix.lower() in cfg.extensions


def _sidecar(p: Path, root: Path) -> bool:
    return p.parent == root and p.name in {"states.jsonl", "README.md", "LICENSE"}


def _problem(item: str, reason: str, detail: str) -> dict:
    """One listed problem: the item (file, row or name), a reason code and what is wrong."""
    return {"item": item, "reason": reason, "detail": detail}


def _list_by_identity(cfg: SourceConfig, root: Path) -> SourceListing:
    problems, entries, idents = [], [], {}
    for p in _walk(root):
        rel = p.relative_to(root).as_posix()
        if p.name.startswith(".") or _sidecar(p, root):
            continue
        if not _is_image(p, cfg):
            problems.append(_problem(str(p), "unsupported_extension", f"extension {p.suffix!r}"))
            continue
        parts = Path(rel).parts
        if len(parts) < 2:
            problems.append(_problem(str(p), "outside_identity_folder", "expected root/<identity>/<image>"))
            continue
        ident = sanitize_id(parts[0])
        entries.append((rel, sanitize_id(f"{parts[0]}_{Path(*parts[1:]).with_suffix('').as_posix()}")))
        idents[rel] = ident
    ids = _unique_ids(entries)
    items = [SourceItem(ids[rel], str(root / rel), rel, idents[rel], None) for rel, _ in entries]
    return SourceListing(cfg.kind, str(root), items, problems, None, labelled=True)


def _list_unlabelled(cfg: SourceConfig, root: Path) -> SourceListing:
    problems, entries = [], []
    for p in _walk(root):
        rel = p.relative_to(root).as_posix()
        if p.name.startswith("."):
            continue
        if not _is_image(p, cfg):
            problems.append(_problem(str(p), "unsupported_extension", f"extension {p.suffix!r}"))
            continue
        entries.append((rel, sanitize_id(Path(rel).with_suffix("").as_posix())))
    ids = _unique_ids(entries)
    items = [SourceItem(ids[rel], str(root / rel), rel, None, None) for rel, _ in entries]
    return SourceListing(cfg.kind, str(root), items, problems, None, labelled=False)


def _list_ffhq_ref(cfg: SourceConfig, root: Path) -> SourceListing:
    """FFHQ-Ref as released: the images, the id-based split lists and the reference mappings; identities
    are the connected components of the gt-reference links. Every problem is a listed item."""
    img_dir = root / cfg.images_dir
    if not img_dir.is_dir():
        raise SourceError(
            f"ffhq_ref: images folder {img_dir} is missing (source.images_dir={cfg.images_dir!r})"
        )
    on_disk = {p.name: p for p in _walk(img_dir) if _is_image(p, cfg) and not p.name.startswith(".")}
    problems: list[dict] = []
    split_of = _ffhq_ref_splits(root, problems)
    mapping = _ffhq_ref_mapping(root, img_dir, on_disk, problems)
    find = _identity_components(mapping)
    items, seen = [], set()
    for name in sorted(split_of):
        if name not in on_disk:
            problems.append(
                _problem(name, "missing_file", f"listed in {split_of[name]}_image.txt, not in {img_dir}")
            )
            continue
        iid = _stem_id(name)
        if iid in seen:
            problems.append(_problem(name, "duplicate_name", f"image id {iid} already listed"))
            continue
        seen.add(iid)
        rel = on_disk[name].relative_to(root).as_posix()
        items.append(SourceItem(iid, str(on_disk[name]), rel, f"ffhqref_{find(iid)}", split_of[name]))
    for name in sorted(set(on_disk) - set(split_of)):
        problems.append(_problem(str(on_disk[name]), "not_in_split_lists", "not part of FFHQ-Ref"))
    return SourceListing("ffhq_ref", str(root), items, problems, mapping, labelled=True)


def _ffhq_ref_splits(root: Path, problems: list[dict]) -> dict[str, str]:
    """Image name -> split from id_based_ffhq_split/{split}_image.txt; missing lists and names in two
    splits are problems."""
    split_of: dict[str, str] = {}
    for split in SPLITS:
        lst = root / "id_based_ffhq_split" / f"{split}_image.txt"
        if not lst.is_file():
            problems.append(_problem(str(lst), "missing_split_list", f"no {split} split list"))
            continue
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if name in split_of and split_of[name] != split:
                problems.append(_problem(f"{lst}:{n}", "split_conflict", f"{name} also in {split_of[name]}"))
                continue
            split_of[name] = split
    return split_of


def _ffhq_ref_mapping(
    root: Path, img_dir: Path, on_disk: dict[str, Path], problems: list[dict]
) -> list[dict]:
    """The rows of reference_mapping/{split}_references.csv whose target exists (references missing on
    disk are dropped from their row); every unusable row or file is a problem."""
    mapping: list[dict] = []
    for split in SPLITS:
        csv_path = root / "reference_mapping" / f"{split}_references.csv"
        if not csv_path.is_file():
            problems.append(_problem(str(csv_path), "missing_mapping", f"no {split} mapping"))
            continue
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            need = {"gt_image", "ref_image"}
            if not need <= set(reader.fieldnames or []):
                raise SourceError(
                    f"{csv_path}: needs columns gt_image and ref_image, has {reader.fieldnames}"
                )
            for row_no, row in enumerate(reader, 2):  # row 1 is the header
                where = f"{csv_path}:{row_no}"
                gt = (row.get("gt_image") or "").strip()
                try:
                    refs = ast.literal_eval(row.get("ref_image") or "")
                    if not isinstance(refs, list | tuple) or not all(isinstance(r, str) for r in refs):
                        raise ValueError("not a list of file names")
                except (ValueError, SyntaxError) as exc:
                    problems.append(
                        _problem(where, "unparsable_ref_list", f"ref_image {row.get('ref_image')!r}: {exc}")
                    )
                    continue
                if gt not in on_disk:
                    problems.append(_problem(where, "missing_file", f"gt_image {gt!r} not in {img_dir}"))
                    continue
                kept = []
                for r in refs:
                    if r in on_disk:
                        kept.append(r)
                    else:
                        problems.append(_problem(where, "missing_file", f"ref_image {r!r} not in {img_dir}"))
                lq = (row.get("lq_image") or "").strip() or None
                mapping.append(
                    {
                        "split": split,
                        "gt": _stem_id(gt),
                        "refs": [_stem_id(r) for r in kept],
                        "lq": lq,
                        "row": where,
                    }
                )
    return mapping


def _identity_components(mapping: list[dict]):
    """find(image id) -> its identity: the smallest id of its connected component of gt-reference
    links (union-find)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for m in mapping:
        for r in m["refs"]:
            ra, rb = find(m["gt"]), find(r)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return find


def _stem_id(name: str) -> str:
    return sanitize_id(Path(name).stem)
