"""Pareto frontiers of the sub-model family: quality (loss or accuracy) against each cost column."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from elastic_moe.measure import speed_cols


def quality(row: dict, objective: str = "loss") -> tuple:
    """Sort key, lower is better: the loss, or minus the accuracy with the loss breaking ties."""
    if objective == "accuracy":
        return (-row["accuracy"], row["loss"])
    return (row["loss"],)


def pareto_front(rows: list[dict], col: str, objective: str = "loss") -> list[int]:
    """Indices of rows not dominated in (rows[i][col], quality): nothing else is at most as costly and at least as
    good, and better in one of the two. Rows of equal cost and quality are all kept."""
    ok = [i for i, r in enumerate(rows) if finite(r.get(col)) and finite(r.get("loss"))
          and (objective != "accuracy" or finite(r.get("accuracy")))]
    ok.sort(key=lambda i: (rows[i][col], quality(rows[i], objective)))
    front, best = [], None
    for i in ok:
        q = quality(rows[i], objective)
        if best is None or q < best[1] or (q, rows[i][col]) == (best[1], best[0]):
            front.append(i)
            best = (rows[i][col], q)
    return front


def nondominated_rank(points: list[tuple[float, ...]], chunk: int = 1024) -> list[int]:
    """Front number of every point (0 = not dominated), minimising every coordinate. Peels fronts as NSGA-II's fast
    non-dominated sort does (each point's count of dominators; a front's points then release the ones they dominate),
    with the comparisons as tensor ops in row chunks: O(n^2) work in O(chunk x n) memory (10^4 points: 3 s, was minutes)."""
    n = len(points)
    if n == 0:
        return []
    p = torch.tensor(points, dtype=torch.float64)

    def dominates(rows: torch.Tensor) -> torch.Tensor:  # (len(rows), n): rows[i] dominates point j
        a, b = p[rows][:, None, :], p[None]
        return (a <= b).all(-1) & (a < b).any(-1)

    dominators = torch.zeros(n, dtype=torch.long)
    for s in range(0, n, chunk):
        dominators += dominates(torch.arange(s, min(s + chunk, n))).sum(0)
    rank = torch.full((n,), -1, dtype=torch.long)
    front, r = (dominators == 0).nonzero().flatten(), 0
    while front.numel():
        rank[front] = r
        for s in range(0, front.numel(), chunk):
            dominators -= dominates(front[s:s + chunk]).sum(0)
        front, r = ((dominators == 0) & (rank < 0)).nonzero().flatten(), r + 1
    return rank.tolist()


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def cost_cols(batch_sizes: Iterable[int]) -> list[str]:
    cols = ["total_params", "active_params"]
    for b in batch_sizes:
        cols += list(speed_cols(b))
    return cols


def mark_frontiers(rows: list[dict], batch_sizes: Iterable[int], objective: str) -> None:
    for col in cost_cols(batch_sizes):
        front = set(pareto_front(rows, col, objective))
        for i, r in enumerate(rows):
            r[f"front_{col}"] = i in front
