"""Diversity and sampling metrics over several samples of one prompt: distinct-n, self-BLEU and unbiased pass@k."""

from __future__ import annotations

import math
import re
from collections import Counter

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (Li et al., 2016); 0.0 when there are none."""
    grams = [g for t in texts for g in ngrams(tokenize(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU with clipped counts against several references, add-one smoothing for n > 1 (Lin & Och 2004)."""
    if not hypothesis:  # an empty text is the same as an empty reference, and shares nothing with any other
        return 1.0 if any(not r for r in references) else 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        best: Counter = Counter()
        for ref in references:
            best |= Counter(ngrams(ref, n))
        matched = sum(min(c, best[g]) for g, c in hyp.items())
        total = sum(hyp.values())
        if n == 1 and matched == 0:
            return 0.0
        log_p += math.log((matched + (n > 1)) / (total + (n > 1)))
    closest = min((len(r) for r in references), key=lambda r: (abs(r - len(hypothesis)), r))
    bp = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return bp * math.exp(log_p / max_n)


def self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean BLEU of each text against all the others (Zhu et al., 2018): 1.0 = all the same, lower = more diverse."""
    toks = [tokenize(t) for t in texts]
    if len(toks) < 2:
        return 0.0
    return sum(bleu(h, toks[:i] + toks[i + 1:], max_n) for i, h in enumerate(toks)) / len(toks)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):  # the product form avoids huge binomials
        prod *= 1.0 - k / i
    return 1.0 - prod


def group_metrics(texts: list[str], correct: list[bool], ks: tuple[int, ...] = (1, 4, 8)) -> dict:
    """Everything above for one prompt's samples."""
    n, c = len(texts), sum(bool(x) for x in correct)
    out = {"n": n, "correct": c, "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
           "self_bleu": self_bleu(texts)}
    out.update({f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n})
    return out
