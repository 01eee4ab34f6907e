"""Reasoning tasks with a checked final answer: multi-step arithmetic and Countdown.

arith:     "Compute ((3 + 4) * 5) - 2."                         -> last line `Answer: 33`
countdown: "Use 3, 5, 1 each exactly once with + - * / to make 12" -> last line `Answer: (5 - 1) * 3`

Both are evaluated exactly (integers, Fractions for division); Countdown answers are parsed with `ast` and only
numbers and + - * / are accepted.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from elastic_moe.tasks.base import Task, Verdict, eval_arithmetic, parse_answer, parse_int

SYSTEM = "You are a careful problem solver. Think step by step, then give the final answer on a last line 'Answer: ...'."
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@dataclass
class Node:
    op: str | None  # None for a leaf
    value: int | Fraction
    left: Node | None = None
    right: Node | None = None

    def text(self, top: bool = True) -> str:
        if self.op is None:
            return str(self.value)
        s = f"{self.left.text(False)} {self.op} {self.right.text(False)}"
        return s if top else f"({s})"

    def steps(self) -> list[str]:
        """Evaluation steps, innermost first: 'a op b = c'."""
        if self.op is None:
            return []
        return [*self.left.steps(), *self.right.steps(), f"{_fmt(self.left.value)} {self.op} {_fmt(self.right.value)} = {_fmt(self.value)}"]  # noqa: E501


def _fmt(v: int | Fraction) -> str:
    return str(v.numerator) if isinstance(v, Fraction) and v.denominator == 1 else str(v)


def _combine(op: str, a: Node, b: Node) -> Node:
    return Node(op, OPS[op](Fraction(a.value), Fraction(b.value)), a, b)


def _random_tree(rng: random.Random, leaves: list[int], ops: str) -> Node:
    nodes = [Node(None, v) for v in leaves]
    while len(nodes) > 1:
        i, j = rng.sample(range(len(nodes)), 2)
        a, b = nodes[i], nodes[j]
        op = rng.choice(ops)
        if op == "/" and (b.value == 0 or Fraction(a.value) % Fraction(b.value) != 0):
            op = rng.choice([o for o in ops if o != "/"])
        nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [_combine(op, a, b)]
    return nodes[0]


# ------------------------------------------------------------------------------------------------ arithmetic

ARITH_LEVELS = {1: (3, 20, "+-"), 2: (4, 30, "+-*"), 3: (6, 40, "+-*")}  # operands, max value, operators


def make_arith(rng: random.Random, difficulty: int) -> Task:
    k, hi, ops = ARITH_LEVELS[difficulty]
    leaves = [rng.randint(1, hi) for _ in range(k)]
    root = _random_tree(rng, leaves, ops)
    expr = root.text()
    answer = int(root.value)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Compute {expr}."},
    ]
    meta = {"family": "arith", "canonical": f"arith:{expr}", "expression": expr}
    return Task("", "reasoning", messages, {"answer": answer, "steps": root.steps()}, meta)


# ------------------------------------------------------------------------------------------------- countdown

COUNTDOWN_LEVELS = {1: (3, 10), 2: (4, 25), 3: (5, 50)}  # numbers, max value


def make_countdown(rng: random.Random, difficulty: int) -> Task:
    k, hi = COUNTDOWN_LEVELS[difficulty]
    while True:
        numbers = [rng.randint(1, hi) for _ in range(k)]
        root = _random_tree(rng, numbers, "+-*/")
        if root.value.denominator == 1 and 1 <= root.value <= 1000:
            break
    target = int(root.value)
    shown = sorted(numbers)
    prompt = (
        f"Using the numbers {', '.join(map(str, shown))}, each exactly once, and the operations + - * / "
        f"(parentheses allowed), write an expression that equals {target}. "
        "Give the expression on a last line 'Answer: <expression>'."
    )
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    meta = {"family": "countdown", "canonical": f"countdown:{','.join(map(str, shown))}->{target}"}
    ref = {"numbers": shown, "target": target, "solution": root.text(), "steps": root.steps()}
    return Task("", "reasoning", messages, ref, meta)


def eval_countdown(expr: str, target: int | None = None) -> tuple[Fraction, list[int]]:
    """Exact value and the numbers used; ValueError for anything but integers, + - * / and parentheses.
    A final period and a final `= target` (only that target) are allowed; so are the signs × ÷ −."""
    expr = expr.strip().rstrip(".").replace("×", "*").replace("÷", "/").replace("−", "-")
    if "=" in expr:
        expr, _, rhs = expr.partition("=")
        if target is None or parse_int(rhs) != target:
            raise ValueError(f"the expression is followed by '={rhs[:20]}'")
    return eval_arithmetic(expr, integers_only=True)


# --------------------------------------------------------------------------- optional: reasoning-gym generators


def make_gym(rng: random.Random, name: str) -> Task:
    """One task from a reasoning-gym dataset (optional dependency, imported only here); scored by its own scorer."""
    import reasoning_gym

    entry = reasoning_gym.create_dataset(name, size=1, seed=rng.randrange(2**31))[0]
    prompt = entry["question"] + "\nGive the final answer on a last line 'Answer: ...'."
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    meta = {"family": "gym", "gym_dataset": name, "canonical": f"gym:{name}:{entry['question']}"}
    return Task("", "reasoning", messages, {"entry": entry, "answer": entry["answer"]}, meta)


def _verify_gym(task: Task, raw: str) -> Verdict:
    import reasoning_gym

    entry = task.reference["entry"]
    score = float(reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])(raw, entry) or 0.0)
    if score >= 1.0:
        return Verdict.right()
    return Verdict.wrong(f"reasoning-gym score {score:g}", reward=score)


# ---------------------------------------------------------------------------------------------- public API

FAMILIES = {"arith": make_arith, "countdown": make_countdown}


def make(rng: random.Random, difficulty: int) -> Task:
    family = rng.choice(sorted(FAMILIES))
    return FAMILIES[family](rng, difficulty)


def verify(task: Task, completion: str) -> Verdict:
    raw = parse_answer(completion)
    if raw is None:
        return Verdict.wrong("no 'Answer:' line")
    ref = task.reference
    if task.metadata["family"] == "gym":
        return _verify_gym(task, raw)
    if task.metadata["family"] == "arith":
        got = parse_int(raw)
        if got is None:
            return Verdict.wrong(f"answer {raw[:40]!r} is not an integer")
        if got != ref["answer"]:
            return Verdict.wrong(f"answer {got} != {ref['answer']}", expected=ref["answer"], got=got)
        return Verdict.right()
    try:
        value, used = eval_countdown(raw, ref["target"])
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as e:
        return Verdict.wrong(f"unparsable expression: {e}")
    if Counter(used) != Counter(ref["numbers"]):
        return Verdict.wrong(f"numbers used {sorted(used)} != {ref['numbers']}")
    if value != ref["target"]:
        return Verdict.wrong(f"expression equals {value}, not {ref['target']}")
    return Verdict.right()


def demonstration(task: Task) -> list[dict]:
    ref = task.reference
    if task.metadata["family"] == "gym":
        body = f"Answer: {ref['answer']}"
    elif task.metadata["family"] == "arith":
        body = "\n".join(ref["steps"]) + f"\nAnswer: {ref['answer']}"
    else:
        body = "\n".join(ref["steps"]) + f"\nAnswer: {ref['solution']}"
    return [*task.messages, {"role": "assistant", "content": body}]
