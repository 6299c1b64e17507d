"""The FFHQ-Ref protocol: identity graph, identity-disjoint splits and ordered references.

ReF-LDM built FFHQ-Ref by embedding every image, linking two images when their cosine DISTANCE is
below 0.4, and taking connected components as identities; splits are by identity; val/test references
lie at least 0.1 (cosine distance) from their target and are ordered by farthest-point sampling.

Farthest-point order, as implemented here: the selected set starts as {target}; each next reference is
the candidate whose smallest distance to the selected set is largest. The first reference is thus the
one least similar to the target, and every further one adds the most new appearance.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from pipelines.config import PairsConfig

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------------------------------


def unit(emb: np.ndarray) -> np.ndarray:
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)


def graph_components(
    emb: np.ndarray, link_distance: float, block: int = 2048, metric: str = "cosine"
) -> np.ndarray:
    """Connected components (N,) of the graph linking images at distance < `link_distance`: cosine
    distance (ArcFace/AdaFace-type encoders), or Euclidean (`metric="euclidean"`: dlib's descriptors).

    Blocked so that memory stays O(block · N) for FFHQ-sized sets. Component ids are the smallest
    member index, so the result does not depend on processing order.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}; valid: cosine, euclidean")
    e = unit(emb.astype(np.float32)) if metric == "cosine" else emb.astype(np.float32)
    sq = (e * e).sum(1)
    n = len(e)
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    for i in range(0, n, block):
        dot = e[i : i + block] @ e.T  # (b, N)
        if metric == "cosine":
            linked = dot > 1.0 - link_distance
        else:
            linked = sq[i : i + block, None] + sq[None, :] - 2 * dot < link_distance**2
        rows, cols = np.nonzero(linked)
        for r, c in zip(rows + i, cols):
            if c > r:
                ra, rb = find(r), find(int(c))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def label_agreement(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Pairwise precision / recall and the adjusted Rand index of a clustering against labels."""

    def c2(x):
        return x * (x - 1) / 2

    cont = Counter(zip(pred.tolist(), truth.tolist()))
    a = Counter(pred.tolist())
    b = Counter(truth.tolist())
    tp = sum(c2(v) for v in cont.values())
    pp = sum(c2(v) for v in a.values())
    tt = sum(c2(v) for v in b.values())
    total = c2(len(pred))
    expected = pp * tt / total if total else 0.0
    max_index = (pp + tt) / 2
    ari = (tp - expected) / (max_index - expected) if max_index != expected else 1.0
    return {
        "pair_precision": float(tp / pp) if pp else 1.0,
        "pair_recall": float(tp / tt) if tt else 1.0,
        "adjusted_rand_index": float(ari),
        "graph_identities": len(a),
        "label_identities": len(b),
        "identities_exactly_recovered": int(sum(1 for (p, t), v in cont.items() if v == a[p] == b[t])),
    }


# --------------------------------------------------------------------------------------------------
# Splits and references
# --------------------------------------------------------------------------------------------------


def assign_splits(identity_sizes: dict[str, int], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Identity → split, identity-disjoint, by image share (deterministic for a seed).

    Identities are shuffled (seeded, from sorted order) and each goes to the split furthest below its
    target share of images so far. Singletons go to train (they can never be targets with a reference).
    """
    ids = sorted(identity_sizes)
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    counts = dict.fromkeys(SPLITS, 0)
    total = 0
    out = {}
    for ident in order:
        n = identity_sizes[ident]
        if n < 2:
            out[ident] = "train"
        else:
            deficit = {s: fractions[s] * (total + n) - counts[s] for s in SPLITS}
            s = max(SPLITS, key=lambda k: (deficit[k], -SPLITS.index(k)))
            out[ident] = s
        counts[out[ident]] += n
        total += n
    return out


def farthest_point_order(target: int, candidates: list[int], e: np.ndarray) -> list[int]:
    """Order `candidates` by farthest-point sampling seeded with the target (unit embeddings `e`)."""
    if not candidates:
        return []
    cand = np.array(candidates)
    dmin = 1.0 - e[cand] @ e[target]  # distance to the selected set {target}
    chosen: list[int] = []
    alive = np.ones(len(cand), bool)
    for _ in range(len(cand)):
        # Ties broken by the lower index (candidates arrive sorted by image id).
        k = int(np.argmax(np.where(alive, dmin, -np.inf)))
        chosen.append(int(cand[k]))
        alive[k] = False
        dmin = np.minimum(dmin, 1.0 - e[cand] @ e[cand[k]])
    return chosen


def build_pairs(
    manifest: list[dict],
    emb: np.ndarray,
    cfg: PairsConfig,
    labelled: bool,
    mapping: list[dict] | None = None,
    grouping: np.ndarray | None = None,
) -> tuple[list[dict], list[dict], list[dict], dict]:
    """The pairs of a dataset.

    Returns (identities, pairs, unpaired, metrics): `identities` one row per image (identity, split,
    graph component); `pairs` one row per target with its ordered references and ref–target cosines;
    `unpaired` the targets that got no reference, with the reason.
    """
    ids = [r["image_id"] for r in manifest]
    index = {iid: i for i, iid in enumerate(ids)}
    e = unit(emb.astype(np.float64))
    if grouping is None:
        comp = graph_components(emb, cfg.link_distance)
    else:  # dlib's descriptors (embed.grouping: dlib_resnet), linked at its own Euclidean threshold
        comp = graph_components(grouping, cfg.dlib_link_distance, metric="euclidean")
    graph_label = np.array([f"g_{ids[c]}" for c in comp])
    labels = np.array([r["identity"] or "" for r in manifest])
    use_label = {"auto": labelled, "label": True, "graph": False}[cfg.identity_from]
    if use_label and not labelled:
        raise ValueError(
            "pairs.identity_from is 'label' but the source has no identity labels (use auto or graph)"
        )
    identity = labels if use_label else graph_label
    metrics: dict = {"images": len(ids), "identity_from": "label" if use_label else "graph"}
    if labelled:
        metrics["graph_vs_labels"] = label_agreement(comp, labels)

    released = mapping is not None and len(mapping) > 0
    if released:
        split_of = {r["image_id"]: r["split"] for r in manifest}
    else:
        sizes = Counter(identity.tolist())
        by_ident = assign_splits(dict(sizes), cfg.split_fractions, cfg.seed)
        split_of = {iid: by_ident[identity[i]] for i, iid in enumerate(ids)}

    identities = [
        {
            "image_id": iid,
            "identity": str(identity[i]),
            "split": split_of[iid],
            "graph_identity": str(graph_label[i]),
        }
        for i, iid in enumerate(ids)
    ]
    pairs, unpaired = [], []
    if released:
        targets = _released_pairs(mapping, index, e, cfg, metrics, comp)
    else:
        targets = _own_pairs(ids, identity, split_of, e, cfg, unpaired)
    for i, split, refs in targets:
        if not refs:
            unpaired.append(
                {"target": ids[i], "split": split, "reason": "released references not in the manifest"}
            )
            continue
        pairs.append(
            {
                "target": ids[i],
                "identity": str(identity[i]),
                "split": split,
                "refs": [ids[j] for j in refs],
                "ref_cosines": [round(float(e[i] @ e[j]), 6) for j in refs],
            }
        )
    pairs.sort(key=lambda p: (SPLITS.index(p["split"]), p["target"]))
    unpaired.sort(key=lambda p: p["target"])
    metrics.update(_pair_metrics(pairs, unpaired))
    leaks = _split_leaks(identities)
    if leaks:
        raise AssertionError(f"identity-disjoint splits violated for identities {leaks[:5]}")
    return identities, pairs, unpaired, metrics


def _own_pairs(ids, identity, split_of, e, cfg: PairsConfig, unpaired: list[dict]) -> list[tuple]:
    """(target index, split, reference indices) for every image whose identity has other images: the
    farthest-point order of its identity's other images, val/test references at least
    `min_eval_ref_distance` away; the targets left without a reference go to `unpaired`."""
    members = defaultdict(list)
    for i in range(len(ids)):
        members[identity[i]].append(i)
    targets = []
    for i, iid in enumerate(ids):
        split = split_of[iid]
        cands = [j for j in members[identity[i]] if j != i]
        if not cands:
            unpaired.append({"target": iid, "split": split, "reason": "single_image_identity"})
            continue
        if split in ("val", "test"):
            far = [j for j in cands if 1.0 - float(e[i] @ e[j]) >= cfg.min_eval_ref_distance]
            if not far:
                unpaired.append(
                    {
                        "target": iid,
                        "split": split,
                        "reason": f"no reference at distance >= {cfg.min_eval_ref_distance}",
                    }
                )
                continue
            cands = far
        targets.append((i, split, farthest_point_order(i, cands, e)[: cfg.max_refs]))
    return targets


def _pair_metrics(pairs: list[dict], unpaired: list[dict]) -> dict:
    """Targets, identities and references per split, unpaired reasons, the mean ref-target cosine."""
    per_split = {s: sum(1 for p in pairs if p["split"] == s) for s in SPLITS}
    return {
        "targets": per_split,
        "unpaired": dict(Counter(u["reason"] for u in unpaired)),
        "identities_per_split": {s: len({p["identity"] for p in pairs if p["split"] == s}) for s in SPLITS},
        "refs_per_target_mean": {
            s: round(float(np.mean([len(p["refs"]) for p in pairs if p["split"] == s])), 3)
            if per_split[s]
            else 0.0
            for s in SPLITS
        },
        "ref_cosine_mean": round(float(np.mean([c for p in pairs for c in p["ref_cosines"]])), 4)
        if pairs
        else math.nan,
    }


def _split_leaks(identities: list[dict]) -> list[str]:
    seen: dict[str, set] = defaultdict(set)
    for r in identities:
        seen[r["identity"]].add(r["split"])
    return sorted(k for k, v in seen.items() if len(v) > 1)


def _released_pairs(mapping, index, e, cfg, metrics, comp) -> list[tuple[int, str, list[int]]]:
    """Import FFHQ-Ref's released mapping as is (refs missing from the manifest are dropped and counted).

    With `check_released`, the mapping is compared with what the protocol rebuilds from our embeddings.
    """
    out, dropped, in_comp, linked, total = [], 0, 0, 0, 0
    for m in mapping:
        if m["gt"] not in index:
            dropped += 1 + len(m["refs"])
            continue
        i = index[m["gt"]]
        refs = []
        for r in m["refs"]:
            if r not in index:
                dropped += 1
                continue
            j = index[r]
            refs.append(j)
            total += 1
            in_comp += int(comp[i] == comp[j])
            linked += int(1.0 - float(e[i] @ e[j]) < cfg.link_distance)
        out.append((i, m["split"], refs))
    metrics["released"] = {"rows": len(mapping), "refs_dropped_not_in_manifest": dropped}
    if cfg.check_released and total:
        metrics["released"]["check"] = {
            "refs_in_same_graph_component": round(in_comp / total, 4),
            "refs_within_link_distance": round(linked / total, 4),
        }
    return out
