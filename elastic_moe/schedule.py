"""Learning-rate schedule: linear warm-up, then cosine decay to `min_ratio * lr`. A pure function of the step, so a
resumed run needs no scheduler state beyond the step itself."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of a `total`-step schedule."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return lr * min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
