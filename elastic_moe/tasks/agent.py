"""Agent tasks: multi-turn tool use against a simulated environment, verified by the answer and the tool trace.

Protocol (documented in docs/tasks.md):
  assistant: any text with one or more tool calls `<tool>name(arguments)</tool>`
  tool:      one message per call, `name(arguments) = result` (or `... = error: ...`)
  ...
  assistant: a turn without tool calls ends the episode; its last line is `Answer: <number>`.

Tools: calculator(expression) with + - * / and parentheses (exact); lookup(key) from the task's hidden table;
convert(value, from_unit, to_unit) for length (mm cm m km), mass (g kg) and time (s min h).
The verifier replays the trace against a fresh environment, so tool results cannot be forged, and requires every
lookup the question needs (the values are not in the prompt, so a right number without them is a guess); other
tool calls are the model's choice. Train and test are split by the question (base.sample_split's split_key), so
a test prompt is never seen in training, even with other hidden values.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from elastic_moe.tasks.base import Task, Verdict, eval_arithmetic, parse_answer, parse_int

SYSTEM = (
    "You can use tools by writing <tool>name(arguments)</tool>. Tools: calculator(expression) evaluates + - * / "
    "and parentheses; lookup(key) returns the value stored under a key; convert(value, from_unit, to_unit) converts "
    "length (mm, cm, m, km), mass (g, kg) and time (s, min, h). Each result comes back in a tool message. "
    "When you know the result, reply without tool calls and end with a last line 'Answer: <number>'."
)
MAX_TURNS = 8
MAX_CALLS_PER_TURN = 4
_CALL_RE = re.compile(r"<tool>\s*([A-Za-z_]\w*)\s*\((.*?)\)\s*</tool>", re.DOTALL)
UNITS = {
    "mm": ("length", 1), "cm": ("length", 10), "m": ("length", 1000), "km": ("length", 1_000_000),
    "g": ("mass", 1), "kg": ("mass", 1000),
    "s": ("time", 1), "min": ("time", 60), "h": ("time", 3600),
}
ITEMS = ["apple", "pear", "banana", "lemon", "melon", "bread", "cheese", "coffee", "tea", "rice", "pasta", "honey",
         "butter", "eggs", "milk", "soap", "candle", "pencil", "notebook", "stamp", "battery", "towel", "cup", "plate"]
ROUTES = ["north_trail", "river_path", "hill_road", "lake_loop", "forest_track", "coast_walk", "city_ring", "old_canal"]


@dataclass
class ToolCall:
    name: str
    args: str  # the raw text between the parentheses

    def text(self) -> str:
        return f"{self.name}({self.args})"


def parse_tool_calls(text: str) -> list[ToolCall]:
    return [ToolCall(m.group(1), m.group(2).strip()) for m in _CALL_RE.finditer(text)]


def _num(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else str(round(float(v), 6))


def calculate(expr: str) -> Fraction:
    return eval_arithmetic(expr)[0]


def _plain(arg: str) -> str:
    return arg.strip().strip("'\"").strip()


@dataclass
class Env:
    """The simulated environment of one task: a key-value table plus the stateless tools."""

    table: dict[str, int]
    calls: list[str] = field(default_factory=list)  # successful calls, canonical form

    def execute(self, call: ToolCall) -> str:
        try:
            result = self._run(call)
        except (ValueError, SyntaxError, KeyError, TypeError, ArithmeticError, RecursionError) as e:  # overflow too
            return f"{call.text()} = error: {e}"
        return f"{call.text()} = {result}"

    def _run(self, call: ToolCall) -> str:
        if call.name == "calculator":
            value = _num(calculate(call.args))
            self.calls.append(f"calculator={value}")
            return value
        if call.name == "lookup":
            key = _plain(call.args)
            if key not in self.table:
                raise KeyError(f"unknown key {key!r}")
            self.calls.append(f"lookup:{key}")
            return str(self.table[key])
        if call.name == "convert":
            parts = [_plain(p) for p in call.args.split(",")]
            if len(parts) != 3:
                raise ValueError("convert takes value, from_unit, to_unit")
            value, src, dst = calculate(parts[0]), parts[1], parts[2]
            if src not in UNITS or dst not in UNITS or UNITS[src][0] != UNITS[dst][0]:
                raise ValueError(f"cannot convert {src} to {dst}")
            out = _num(value * UNITS[src][1] / UNITS[dst][1])
            self.calls.append(f"convert:{src}->{dst}")
            return out
        raise ValueError(f"unknown tool {call.name!r}")


# -------------------------------------------------------------------------------------------------- families


def _table(rng: random.Random, keys: list[str], hi: int = 50) -> dict[str, int]:
    return {k: rng.randint(1, hi) for k in keys}


def _price(rng: random.Random, n_items: int, budget: bool) -> tuple[str, dict, list[str], list[str], int]:
    items = rng.sample(ITEMS, n_items)
    qty = [rng.randint(1, 9) for _ in items]
    table = _table(rng, items + [k for k in rng.sample(ITEMS, 4) if k not in items])  # plus distractors
    total = sum(q * table[i] for q, i in zip(qty, items))
    parts = [f"{q} {i}" for q, i in zip(qty, items)]
    what = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    expr = " + ".join(f"{q}*{table[i]}" for q, i in zip(qty, items))
    script = [f"lookup({i})" for i in items]
    if budget:
        money = total + rng.randint(0, 100)
        question = f"Prices are stored under the item names. I pay for {what} with {money}. How much change do I get?"
        expr, answer = f"{money} - ({expr})", money - total
    else:
        question = f"Prices are stored under the item names. How much do {what} cost in total?"
        answer = total
    script.append(f"calculator({expr})")
    return question, table, [f"lookup:{i}" for i in items], script, answer


def _convert(rng: random.Random, add: bool) -> tuple[str, dict, list[str], list[str], int]:
    kind = rng.choice(["length", "mass", "time"])
    big, small = {"length": ("km", "m"), "mass": ("kg", "g"), "time": ("h", "min")}[kind]
    if kind == "length" and rng.random() < 0.5:
        big, small = "m", "cm"
    v = rng.randint(2, 99)
    factor = UNITS[big][1] // UNITS[small][1]
    script = [f"convert({v}, {big}, {small})"]
    if not add:
        return f"Convert {v} {big} to {small}.", {}, [], script, v * factor
    w = rng.randint(1, 999)
    script.append(f"calculator({v * factor} + {w})")
    question = f"What is {v} {big} plus {w} {small}, in {small}?"
    return question, {}, [], script, v * factor + w


def _route(rng: random.Random) -> tuple[str, dict, list[str], list[str], int]:
    route = rng.choice(ROUTES)
    table = _table(rng, [route] + [k for k in rng.sample(ROUTES, 4) if k != route], hi=30)
    trips = rng.randint(2, 9)
    question = (f"Route lengths in km are stored under the route names. How many metres do I walk if I do "
                f"{route} {trips} times?")
    km = table[route]
    script = [f"lookup({route})", f"convert({km}, km, m)", f"calculator({km * 1000}*{trips})"]
    return question, table, [f"lookup:{route}"], script, km * 1000 * trips


LEVELS: dict[int, list[tuple[str, Callable]]] = {
    1: [("price", lambda r: _price(r, 1, False)), ("convert", lambda r: _convert(r, False))],
    2: [("price", lambda r: _price(r, 2, False)), ("convert_add", lambda r: _convert(r, True))],
    3: [("change", lambda r: _price(r, 3, True)), ("route", _route)],
}


def make(rng: random.Random, difficulty: int) -> Task:
    name, fn = rng.choice(LEVELS[difficulty])
    question, table, required, script, answer = fn(rng)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    needed = {k: table[k] for k in sorted(table) if f"lookup:{k}" in required}
    canonical = f"agent:{name}:{question}:{sorted(needed.items())}"
    ref = {"answer": answer, "table": table, "required": required, "script": script}
    meta = {"family": name, "canonical": canonical, "split_key": f"agent:{name}:{question}"}
    return Task("", "agent", messages, ref, meta)


# ---------------------------------------------------------------------------------------- episodes and verdicts


@dataclass
class Episode:
    messages: list[dict]
    verdict: Verdict
    turns: int


def run_episode(task: Task, generate: Callable[[list[dict]], str], max_turns: int = MAX_TURNS) -> Episode:
    """Drive the multi-turn loop: generate, execute tool calls, append tool messages, until an answer or max_turns."""
    messages = [dict(m) for m in task.messages]
    env = Env(dict(task.reference["table"]))
    turns = 0
    for turns in range(1, max_turns + 1):  # noqa: B007 - turns is reported
        text = generate(messages)
        messages.append({"role": "assistant", "content": text})
        calls = parse_tool_calls(text)[:MAX_CALLS_PER_TURN]
        if not calls:
            break
        messages.extend({"role": "tool", "content": env.execute(c)} for c in calls)
    return Episode(messages, verify_trace(task, messages), turns)


def verify_trace(task: Task, messages: list[dict]) -> Verdict:
    n = len(task.messages)
    if [(m["role"], m["content"]) for m in messages[:n]] != [(m["role"], m["content"]) for m in task.messages]:
        return Verdict.wrong("the trace does not start with the task's prompt")
    env = Env(dict(task.reference["table"]))
    i, turns = n, 0
    while i < len(messages):
        m = messages[i]
        if m["role"] != "assistant":
            return Verdict.wrong(f"unexpected {m['role']} message at position {i}")
        turns += 1
        calls = parse_tool_calls(m["content"])[:MAX_CALLS_PER_TURN]
        i += 1
        for c in calls:
            expected = env.execute(c)
            if i >= len(messages):
                return Verdict.wrong("the episode ended on a tool call, without an answer", turns=turns)
            if messages[i]["role"] != "tool" or messages[i]["content"] != expected:
                return Verdict.wrong(f"the tool result for {c.text()} does not match the environment")
            i += 1
    if turns == 0:
        return Verdict.wrong("no assistant turn")
    if turns > MAX_TURNS:
        return Verdict.wrong(f"{turns} turns > {MAX_TURNS}")
    last = messages[-1]["content"]
    if messages[-1]["role"] != "assistant" or parse_tool_calls(last):
        return Verdict.wrong("the last turn still calls tools (max turns reached?)", turns=turns)
    raw = parse_answer(last)
    got = parse_int(raw)
    if got is None:
        why = "no 'Answer:' line" if raw is None else f"answer {raw[:40]!r} is not an integer"
        return Verdict.wrong(why, turns=turns)
    want = task.reference["answer"]
    if got != want:
        return Verdict.wrong(f"answer {got} != {want}", turns=turns)
    missing = [r for r in task.reference["required"] if r not in env.calls]
    if missing:
        return Verdict.wrong(f"right answer but required tool calls missing: {', '.join(missing)}", turns=turns)
    return Verdict.right(turns=turns, tool_calls=len(env.calls))


def verify(task: Task, completion: str | list[dict]) -> Verdict:
    """A list is a full trace; a string is a single final assistant turn (no tool results)."""
    if isinstance(completion, str):
        completion = [*task.messages, {"role": "assistant", "content": completion}]
    return verify_trace(task, completion)


def demonstration(task: Task) -> list[dict]:
    """One tool call per turn, in the order of the reference script, then the answer."""
    turns = [f"<tool>{call}</tool>" for call in task.reference["script"]] + [f"Answer: {task.reference['answer']}"]
    replies = iter(turns)
    return run_episode(task, lambda messages: next(replies), max_turns=len(turns)).messages
