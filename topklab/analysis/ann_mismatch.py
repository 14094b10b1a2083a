"""Why key-built ANN indexes struggle on attention: queries and keys are distributed differently.

An IVF index clusters the keys and a search scans the lists whose centroids score highest for the query. When the
searcher looks like the indexed vectors (a key searching among keys), its true neighbours sit in its best-scoring
lists; an attention query is out of distribution, so its true Top-k keys are scattered over many lists
(RetrievalAttention reports ~30% of keys scanned for high recall). ``scan_to_recall`` measures, per searcher, the
share of keys an IVF index must scan, probing lists best-first, before recall@k reaches ``target``: for the real
queries and, as a control, for held-out keys (later positions' keys searching the same prompt keys).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from topklab.fidelity.traces import LayerTrace


def kmeans_centroids(keys: np.ndarray, nlist: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    from topklab.indexers._faiss import import_faiss

    faiss = import_faiss()
    km = faiss.Kmeans(keys.shape[1], nlist, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(keys, dtype=np.float32))
    return km.centroids


def scan_fractions(searchers: torch.Tensor, keys: torch.Tensor, centroids: torch.Tensor, k: int,
                   target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of keys scanned, lists probed) until recall@k >= target, per searcher ``[M, d]`` over ``keys [N, d]``.

    Keys belong to their best inner-product centroid (as in an IVF index with the inner-product metric); lists are
    probed in the order of the searcher's centroid scores.
    """
    assign = (keys @ centroids.T).argmax(-1)  # [N]
    sizes = torch.bincount(assign, minlength=centroids.shape[0]).float()
    order = (searchers @ centroids.T).argsort(-1, descending=True)  # [M, nlist]: probe order
    rank_of_list = order.argsort(-1)  # [M, nlist]: when each list is probed
    truth = (searchers @ keys.T).topk(k, dim=-1).indices  # [M, k]
    probe_step = rank_of_list.gather(-1, assign[truth])  # [M, k]: the step at which each true key is reached
    needed = int(np.ceil(target * k))
    steps = probe_step.sort(-1).values[:, needed - 1]  # lists probed (minus one) until `needed` true keys are in
    scanned = sizes[order].cumsum(-1).gather(-1, steps[:, None]).squeeze(-1)
    return scanned / keys.shape[0], steps + 1


def scan_to_recall(trace: LayerTrace, k: int = 64, nlist: int = 64, target: float = 0.9, seed: int = 0,
                   seq: int = 0) -> pd.DataFrame:
    """Per KV head: the scan share needed by each decode query and by each held-out key of the trace.

    The index is built on the prompt's keys; searchers are the decode positions' queries (every query head of the
    group) and those positions' own keys. One row per searcher.
    """
    prompt = trace.prompt_len
    if trace.length <= prompt:
        raise ValueError("the trace has no decode positions to search with")
    rows = []
    for kv_head in range(trace.k.shape[1]):
        keys = trace.k[seq, kv_head, :prompt].float()
        centroids = torch.from_numpy(kmeans_centroids(keys.numpy(), min(nlist, prompt), seed))
        heads = range(kv_head * trace.group_size, (kv_head + 1) * trace.group_size)
        searchers = {
            "query": torch.cat([trace.q[seq, h, prompt:].float() for h in heads]),
            "key": trace.k[seq, kv_head, prompt:].float(),
        }
        for kind, vectors in searchers.items():
            share, probes = scan_fractions(vectors, keys, centroids, k, target)
            cos = torch.nn.functional.cosine_similarity(vectors.mean(0), keys.mean(0), dim=0).item()
            rows.append(pd.DataFrame({
                "layer": trace.layer, "kv_head": kv_head, "searcher": kind, "scan_share": share.numpy(),
                "lists_probed": probes.numpy(), "k": k, "nlist": centroids.shape[0], "target_recall": target,
                "mean_cosine_to_keys": cos,
            }))
    return pd.concat(rows, ignore_index=True)
