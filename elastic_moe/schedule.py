"""Pure functions of the step, so a resumed run needs no scheduler or sampler state beyond the step itself: the
learning rate (linear warm-up, then cosine decay to `min_ratio * lr`) and which examples a step visits."""

from __future__ import annotations

import math
import random


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of a `total`-step schedule."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return lr * min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_slice(step: int, per_step: int, n: int, salt: str) -> list[int]:
    """Indices (into n examples) of step `step`: consecutive slices of a shuffle of the examples drawn anew for
    every epoch from `salt` and the epoch number."""
    out, perms = [], {}
    for j in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(j, n)
        if epoch not in perms:
            perm = list(range(n))
            random.Random(f"{salt}/{epoch}").shuffle(perm)
            perms[epoch] = perm
        out.append(perms[epoch][pos])
    return out
