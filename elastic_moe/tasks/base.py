"""What every task suite shares: the Task and Verdict types, answer parsing, and the hash split.

Answer format (every domain but code): the final answer on a last line `Answer: <value>`.
Train/test split: decided by a hash of the task's canonical text (`split_of`), never by the generator's seed, so
the two splits cannot share a problem whatever seeds or sizes are asked for.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from elastic_moe import chat
from elastic_moe.errors import UserError

DOMAINS = ("reasoning", "code", "agent", "open_ended")
SPLITS = ("train", "test")
DIFFICULTIES = (1, 2, 3)
TEST_FRACTION = 0.2  # share of the problem space that belongs to the test split

# spaces and tabs only around the parts: \s would backtrack across blank lines (quadratic in a reply of newlines)
_ANSWER_RE = re.compile(r"^[ \t]*answer[ \t]*:[ \t]*(.*?)[ \t\r]*$", re.IGNORECASE | re.MULTILINE)


@dataclass
class Verdict:
    """The verifier's judgement. reward None means the verifier itself failed (infrastructure), not a wrong answer."""

    reward: float | None
    correct: bool
    reason: str
    status: str = "ok"  # "ok", or for infrastructure failures "error" / "timeout"
    error: str | None = None
    details: dict = field(default_factory=dict)

    @classmethod
    def right(cls, reason: str = "correct", **details) -> Verdict:
        return cls(1.0, True, reason, details=details)

    @classmethod
    def wrong(cls, reason: str, reward: float = 0.0, **details) -> Verdict:
        return cls(reward, False, reason, details=details)

    @classmethod
    def infra_error(cls, error: str, status: str = "error") -> Verdict:
        return cls(None, False, f"infrastructure failure: {error}", status=status, error=error)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Task:
    id: str
    domain: str
    messages: list[dict]  # the prompt, in the shared chat format (elastic_moe.chat)
    reference: Any  # what the verifier checks against (the answer, hidden tests, constraints, ...)
    metadata: dict = field(default_factory=dict)  # family, difficulty, split, seed, canonical text, ...

    def prompt(self) -> str:
        """The prompt rendered with the shared chat template, ready for generation."""
        return chat.render(self.messages, add_generation_prompt=True)

    def verify(self, completion: str | list[dict]) -> Verdict:
        from elastic_moe.tasks import verify

        return verify(self, completion)

    def demonstration(self) -> list[dict]:
        """The full conversation of a correct solution (prompt + assistant turns, + tool turns for agent), for SFT."""
        from elastic_moe.tasks import demonstration

        return demonstration(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(**d)


def parse_answer(text: str) -> str | None:
    """The value of the last `Answer: ...` line, or None."""
    found = _ANSWER_RE.findall(text)
    return found[-1] if found else None


def parse_int(s: str | None) -> int | None:
    """An integer, plain or with commas between groups of three digits (4,698); a final period is allowed, and so is
    the Unicode minus sign (−7)."""
    if s is None:
        return None
    s = s.strip().rstrip(".").strip().replace("\u2212", "-")
    if re.fullmatch(r"[+-]?\d+", s) or re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+", s):
        return int(s.replace(",", ""))
    return None


def eval_arithmetic(expr: str, integers_only: bool = False) -> tuple[Fraction, list[int | float]]:
    """Exact value of an expression of numbers, + - * / and parentheses, and the numbers it uses, in order.
    integers_only: integer literals only, no unary signs (a Countdown answer). ValueError for anything else."""
    if len(expr) > 200:
        raise ValueError("expression too long")
    used: list[int | float] = []
    literals = (int,) if integers_only else (int, float)

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in literals:
            used.append(node.value)
            return Fraction(str(node.value))
        if not integers_only and isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div):
                if b == 0:
                    raise ValueError("division by zero")
                return a / b
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise ValueError(f"only numbers, + - * / and parentheses, not {ast.dump(node)[:60]}")

    return ev(ast.parse(expr, mode="eval")), used


def split_of(canonical: str) -> str:
    """"test" for a fixed TEST_FRACTION of canonical problems, else "train"; a pure function of the problem."""
    h = int.from_bytes(hashlib.sha256(b"elastic-moe/split/" + canonical.encode()).digest()[:8], "big")
    return "test" if h / 2**64 < TEST_FRACTION else "train"


def task_id(domain: str, canonical: str) -> str:
    return f"{domain}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def check_args(domain: str, split: str, n: int, difficulty: int) -> None:
    if domain not in DOMAINS:
        raise UserError(f"unknown task domain {domain!r} (known: {', '.join(DOMAINS)})")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (known: train, test)")
    if difficulty not in DIFFICULTIES:
        raise UserError(f"difficulty must be one of {DIFFICULTIES}, not {difficulty!r}")
    if n < 0:
        raise UserError(f"n must be >= 0, not {n}")


def sample_split(
    make: Callable[[random.Random], Task], domain: str, split: str, n: int, seed: int, difficulty: int
) -> list[Task]:
    """Draw tasks from `make` until n distinct ones of `split` are found (rejection on the hash split)."""
    rng = random.Random(f"{domain}/{split}/{difficulty}/{seed}")
    seen: set[str] = set()
    out: list[Task] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise UserError(
                f"{domain} difficulty {difficulty}: only {len(out)} distinct {split} tasks found, {n} asked for"
            )
        task = make(rng)
        canonical = task.metadata["canonical"]
        # split_key: what the model sees, when the canonical problem also holds hidden values (agent tables), so
        # that one prompt never lands in both splits
        if canonical in seen or split_of(task.metadata.get("split_key", canonical)) != split:
            continue
        seen.add(canonical)
        task.id = task_id(domain, canonical)
        task.metadata.update(split=split, difficulty=difficulty, seed=seed)
        out.append(task)
    return out
