"""Semantic duplicates inside the grouping pass, as NeMo Curator's semdedup: k-means over the
L2-normalised CLIP image embeddings of the signature shards, then, cluster by cluster, every
pair whose cosine similarity reaches the threshold is an edge.

The centroids are trained on the first ``kmeans_sample`` rows in shard order with a seeded
initialisation and a fixed number of Lloyd iterations, so the clusters (and the result) do not
depend on timing or on the number of workers. Only one cluster's embeddings are in memory at a
time (cluster membership is scattered to partition files like the other records).
"""

from __future__ import annotations

import numpy as np

from megatron_sail.curate.dedup.partitions import EDGE, SEMANTIC, Partitions


def _embeddings(grouper, name: str) -> np.ndarray:
    s = grouper._sig(name, embedding=True)
    if "embedding" not in s:
        raise ValueError(
            f"{name}: the signatures have no CLIP embeddings; rerun the signature pass with "
            "semantic_dedup enabled"
        )
    return s["embedding"].astype(np.float32)


def train_centroids(grouper) -> np.ndarray:
    """k-means centroids (unit vectors) from the first rows in shard order."""
    cfg = grouper.cfg
    rows, got = [], 0
    for name in grouper.shards:
        if got >= cfg.kmeans_sample:
            break
        e = _embeddings(grouper, name)[: cfg.kmeans_sample - got]
        rows.append(e)
        got += len(e)
    x = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    k = max(1, min(cfg.clusters, len(x)))
    rng = np.random.default_rng(cfg.seed)
    c = x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    for _ in range(cfg.kmeans_iters):
        assign = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                v = members.mean(axis=0)
                c[j] = v / max(float(np.linalg.norm(v)), 1e-12)
    return c


def semantic_pairs(grouper, edges) -> int:
    """Writes the semantic edges; returns their count."""
    cfg = grouper.cfg
    c = train_centroids(grouper)
    dim = c.shape[1]
    rec_t = np.dtype([("cluster", "<i8"), ("id", "<i8"), ("pixels", "<i8"), ("emb", "<f4", (dim,))])
    parts = Partitions(grouper.work, "semantic", len(c), rec_t, cfg.buffer_records)
    for k, name in enumerate(grouper.shards):
        e = _embeddings(grouper, name)
        if not len(e):
            continue
        s = grouper._sig(name)
        rec = np.empty(len(e), rec_t)
        rec["cluster"] = np.argmax(e @ c.T, axis=1)
        rec["id"] = np.arange(grouper.offsets[k], grouper.offsets[k] + len(e))
        rec["pixels"], rec["emb"] = s["pixels"], e
        parts.add(rec["cluster"], rec)
    parts.flush()
    total = 0
    for j in range(len(c)):
        rec = parts.load(j)
        rec = rec[np.argsort(rec["id"], kind="stable")]
        x = rec["emb"]
        for lo in range(0, len(x), 1024):  # blocks of rows against the later rows: bounded memory
            sim = x[lo : lo + 1024] @ x.T
            i, jj = np.nonzero(sim >= cfg.threshold)
            i = i + lo
            keep = jj > i
            i, jj = i[keep], jj[keep]
            out = np.zeros(len(i), EDGE)
            out["a"], out["b"], out["kind"], out["dist"] = rec["id"][i], rec["id"][jj], SEMANTIC, 0
            out["pa"], out["pb"] = rec["pixels"][i], rec["pixels"][jj]
            out.tofile(edges)
            total += len(out)
    return total
