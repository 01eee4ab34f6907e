"""Code tasks: write a small Python function from a specification, checked by hidden tests in the sandbox.

Answer format: the function in a ```python fenced block (the last block that defines the function counts, whatever
its info string; without a fence, the reply from its first `def`/`import`/`from`/`class` line on is taken as code). Verification runs the solution and a harness in ONE sandbox process: the harness calls the function
on the hidden inputs and prints the repr of each result; the expected results never enter the sandbox, so exiting
early or printing fake results cannot pass.
"""

from __future__ import annotations

import json
import random
import re
import string
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from elastic_moe.tasks.base import Task, Verdict

SYSTEM = "You are a Python programmer. Reply with the requested function in a ```python code block."
MARKER = "@@elastic-moe-results@@"
_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)  # any info string: ```text, ``` python, ```py3 ...


@dataclass
class Family:
    name: str
    difficulty: int
    # rng -> (function, its argument, spec, reference, edge inputs): edge inputs are hidden tests that depend on
    # the task's constants (multiples of k, the threshold t and its neighbours, ...), which random inputs miss
    make: Callable[[random.Random], tuple[str, str, str, str, list[list]]]
    inputs: Callable[[random.Random], list[list]]  # rng -> hidden test argument lists


def _ints(rng: random.Random, n: int = 8, lo: int = -50, hi: int = 100) -> list[list]:
    return [[0], [1], [-1]] + [[rng.randint(lo, hi)] for _ in range(n - 3)]


def _naturals(rng: random.Random) -> list[list]:
    return [[0], [1], [2]] + [[rng.randint(3, 40)] for _ in range(5)]


def _big_naturals(rng: random.Random) -> list[list]:
    return [[0], [1]] + [[rng.randint(2, 10**6)] for _ in range(6)]


def _lists(rng: random.Random, n: int = 8) -> list[list]:
    return [[[]], [[5]]] + [[[rng.randint(-20, 40) for _ in range(rng.randint(1, 8))]] for _ in range(n - 2)]


def _words(rng: random.Random, n: int = 8) -> list[list]:
    letters = "abcde" + string.ascii_lowercase
    return [[""], ["a"]] + [["".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))] for _ in range(n - 2)]


def _name(s: str) -> str:
    return s.replace("-", "neg")


FAMILIES: list[Family] = []


def family(name: str, difficulty: int, inputs: Callable[[random.Random], list[list]]):
    def register(fn):
        FAMILIES.append(Family(name, difficulty, fn, inputs))
        return fn

    return register


# --- difficulty 1: one expression


@family("add", 1, _ints)
def _add(r):
    k = r.randint(2, 999)
    return f"add_{k}", "x", f"returns x plus {k}", f"def add_{k}(x):\n    return x + {k}\n", []


@family("times", 1, _ints)
def _times(r):
    k = r.randint(2, 999)
    return f"times_{k}", "x", f"returns x multiplied by {k}", f"def times_{k}(x):\n    return x * {k}\n", []


@family("minus", 1, _ints)
def _minus(r):
    k = r.randint(2, 999)
    return f"minus_{k}", "x", f"returns x minus {k}", f"def minus_{k}(x):\n    return x - {k}\n", []


@family("affine", 1, _ints)
def _affine(r):
    a, b = r.randint(2, 30), r.randint(1, 99)
    fn = f"affine_{a}_{b}"
    return fn, "x", f"returns {a} times x plus {b}", f"def {fn}(x):\n    return {a} * x + {b}\n", []


@family("multiple", 1, _ints)
def _multiple(r):
    k = r.randint(2, 999)
    fn = f"is_multiple_of_{k}"
    edges = [[k], [-k], [3 * k], [k + 1], [2 * k - 1]]
    return (fn, "x", f"returns True if x is divisible by {k}, else False", f"def {fn}(x):\n    return x % {k} == 0\n",
            edges)


# --- difficulty 2: a loop or a comprehension


@family("sum_above", 2, _lists)
def _sum_above(r):
    t = r.randint(-20, 30)
    fn = _name(f"sum_above_{t}")
    spec = f"returns the sum of the numbers in the list xs that are greater than {t}"
    return fn, "xs", spec, f"def {fn}(xs):\n    return sum(x for x in xs if x > {t})\n", [[[t, t + 1, t - 1, t]]]


@family("count_char", 2, _words)
def _count_char(r):
    c, m = r.choice("abcde"), r.randint(1, 9)
    fn = f"count_{c}_times_{m}"
    spec = f"returns the number of times the letter '{c}' occurs in the string s, multiplied by {m}"
    return fn, "s", spec, f"def {fn}(s):\n    return s.count('{c}') * {m}\n", []


@family("multiples", 2, _lists)
def _multiples(r):
    k = r.randint(2, 99)
    fn = f"multiples_of_{k}"
    spec = f"returns the list of the numbers in xs that are divisible by {k}, in order"
    edges = [[[k, k + 1, 2 * k, -k, 7]], [[3 * k, 1, 5 * k - 1]]]
    return fn, "xs", spec, f"def {fn}(xs):\n    return [x for x in xs if x % {k} == 0]\n", edges


@family("clip", 2, _ints)
def _clip(r):
    lo = r.randint(-50, 20)
    hi = lo + r.randint(1, 60)
    fn = _name(f"clip_{lo}_{hi}")
    spec = f"returns x limited to the range from {lo} to {hi} inclusive"
    return fn, "x", spec, f"def {fn}(x):\n    return min(max(x, {lo}), {hi})\n", [[lo], [hi], [lo - 1], [hi + 1]]


@family("scale_list", 2, _lists)
def _scale_list(r):
    k = r.randint(2, 99)
    fn = f"scale_by_{k}"
    spec = f"returns a new list with every number in xs multiplied by {k}"
    return fn, "xs", spec, f"def {fn}(xs):\n    return [x * {k} for x in xs]\n", []


# --- difficulty 3: state carried across iterations


@family("recurrence", 3, _naturals)
def _recurrence(r):
    a, b = r.randint(0, 9), r.randint(1, 9)
    fn = f"seq_{a}_{b}"
    spec = (f"returns term n (counting from 0) of the sequence that starts {a}, {b} and in which every later term "
            "is the sum of the two before it")
    src = f"def {fn}(n):\n    x, y = {a}, {b}\n    for _ in range(n):\n        x, y = y, x + y\n    return x\n"
    return fn, "n", spec, src, []


@family("caesar", 3, _words)
def _caesar(r):
    k = r.randint(1, 25)
    fn = f"shift_{k}"
    spec = (f"returns s with every lowercase letter shifted {k} places forward in the alphabet, wrapping from z "
            "to a; other characters stay as they are")
    src = f"def {fn}(s):\n    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)\n"
    return fn, "s", spec, src, [["Hello, World 42!"], ["xyz ABC-z"]]


@family("running_max", 3, _lists)
def _running_max(r):
    k = r.randint(1, 20)
    fn = f"running_max_plus_{k}"
    spec = f"returns a list whose i-th element is the largest of xs[0], ..., xs[i], plus {k}"
    src = (f"def {fn}(xs):\n    out, m = [], None\n    for x in xs:\n        m = x if m is None or x > m else m\n"
           f"        out.append(m + {k})\n    return out\n")
    return fn, "xs", spec, src, []


@family("digit_sum", 3, _big_naturals)
def _digit_sum(r):
    b = r.randint(2, 16)
    fn = f"digit_sum_base_{b}"
    spec = f"returns the sum of the digits of the non-negative integer n written in base {b}"
    src = (f"def {fn}(n):\n    total = 0\n    while n > 0:\n        total += n % {b}\n        n //= {b}\n"
           "    return total\n")
    return fn, "n", spec, src, []


def make(rng: random.Random, difficulty: int) -> Task:
    fam = rng.choice([f for f in FAMILIES if f.difficulty == difficulty])
    fn, arg, spec, source, edges = fam.make(rng)
    test_rng = random.Random(f"code-tests/{fn}")
    inputs = edges + fam.inputs(test_rng)  # the last input stays the prompt's example
    expected = [repr(r) for r in run_reference(source, fn, inputs)]
    shown = inputs[-1]
    example = f"{fn}({', '.join(map(repr, shown))}) == {expected[-1]}"
    prompt = f"Write a Python function `{fn}({arg})` that {spec}.\nExample: {example}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    ref = {"function": fn, "inputs": inputs, "expected": expected, "solution": source}
    meta = {"family": fam.name, "canonical": f"code:{fn}", "timeout_s": 5.0}
    return Task("", "code", messages, ref, meta)


def run_reference(source: str, fn: str, inputs: list[list]) -> list:
    """Our own reference solutions are trusted code: they run in-process."""
    ns: dict = {}
    exec(source, ns)
    return [ns[fn](*args) for args in inputs]


def extract_code(completion: str, function: str | None = None) -> str:
    """The last fenced block (of those defining `function`, when any does); without a fence, everything from the
    first line that starts code."""
    blocks = [textwrap.dedent(b) for b in _FENCE_RE.findall(completion)]  # a fence indented under a list item
    defining = [b for b in blocks if function is not None and _defines(b, function)]
    if defining or blocks:
        return (defining or blocks)[-1]
    lines = completion.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(("def ", "import ", "from ", "class ", "@"))), 0)
    return "\n".join(lines[start:]) + "\n"


def _defines(code: str, function: str) -> bool:
    """Whether `code` has a `def function(` (not merely a def of a longer name that starts the same)."""
    return re.search(rf"\bdef\s+{re.escape(function)}\s*\(", code) is not None


def harness(code: str, fn: str, inputs: list[list]) -> str:
    return (
        f"{code}\n\n"
        "import json as _emoe_json\n"
        "_emoe_out = []\n"
        f"for _emoe_args in _emoe_json.loads({json.dumps(json.dumps(inputs))}):\n"
        "    try:\n"
        f"        _emoe_out.append(repr({fn}(*_emoe_args)))\n"
        "    except Exception as _emoe_e:\n"
        "        _emoe_out.append('<raised ' + type(_emoe_e).__name__ + '>')\n"
        f"print('\\n{MARKER}' + _emoe_json.dumps(_emoe_out), flush=True)\n"
    )


def verify(task: Task, completion: str) -> Verdict:
    from elastic_moe import sandbox

    ref = task.reference
    code = extract_code(completion, ref["function"])
    if not _defines(code, ref["function"]):
        return Verdict.wrong(f"no definition of {ref['function']}")
    limits = sandbox.Limits(timeout_s=float(task.metadata.get("timeout_s", 5.0)), memory_mb=256)
    try:
        result = sandbox.run_code(harness(code, ref["function"], ref["inputs"]), limits)
    except sandbox.SandboxError as e:
        return Verdict.infra_error(str(e))
    if result.status != "passed":
        return Verdict.wrong(f"sandbox {result.status}: {result.reason}", sandbox_status=result.status)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        return Verdict.wrong("the tests did not run to the end", sandbox_status=result.status)
    n = len(ref["expected"])
    try:  # the solution runs in the same process and can forge or break this line: anything malformed scores 0
        got = json.loads(lines[-1][len(MARKER):])
    except (ValueError, RecursionError):
        return Verdict.wrong("unreadable test results")
    if not (isinstance(got, list) and len(got) == n and all(isinstance(g, str) for g in got)):
        return Verdict.wrong("malformed test results")
    n_ok = sum(g == e for g, e in zip(got, ref["expected"]))
    if n_ok == n and len(got) == n:
        return Verdict.right(f"{n}/{n} hidden tests passed", passed_tests=n, tests=n)
    first = next((i for i, (g, e) in enumerate(zip(got, ref["expected"])) if g != e), None)
    why = f"; first failure: input {ref['inputs'][first]!r} gave {got[first][:60]}" if first is not None else ""
    return Verdict.wrong(f"{n_ok}/{n} hidden tests passed{why}", passed_tests=n_ok, tests=n)


def demonstration(task: Task) -> list[dict]:
    return [*task.messages, {"role": "assistant", "content": f"```python\n{task.reference['solution']}```"}]
