"""Pareto frontiers of the sub-model family: quality (loss or accuracy) against each cost column."""

from __future__ import annotations

import math
from collections.abc import Iterable

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


def nondominated_rank(points: list[tuple[float, ...]]) -> list[int]:
    """Front number of every point (0 = not dominated), minimising every coordinate."""
    rank, left, r = [0] * len(points), set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(_dominates(points[j], points[i]) for j in left if j != i)}
        for i in front:
            rank[i] = r
        left -= front
        r += 1
    return rank


def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


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
