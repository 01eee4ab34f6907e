"""Verifiable task suites for post-training: reasoning, code, agent and open-ended.

    from elastic_moe.tasks import get_suite, verify
    tasks = get_suite("code", "train", n=100, seed=0, difficulty=1)
    verdict = verify(tasks[0], completion_text)          # Verdict(reward, correct, reason, ...)
    sft_messages = tasks[0].demonstration()              # prompt + a correct assistant reply

Every suite is deterministic in (domain, split, n, seed, difficulty); train and test are split by a hash of the
canonical problem (base.split_of), so they never overlap. Formats are described in docs/tasks.md.
"""

from __future__ import annotations

from elastic_moe.errors import UserError
from elastic_moe.tasks import agent, code, open_ended, reasoning
from elastic_moe.tasks.base import DIFFICULTIES, DOMAINS, SPLITS, Task, Verdict, check_args, sample_split, split_of

__all__ = ["DIFFICULTIES", "DOMAINS", "SPLITS", "Task", "Verdict", "demonstration", "get_gym_suite", "get_mixed_suite",
           "get_suite", "split_of", "verify"]

MODULES = {"reasoning": reasoning, "code": code, "agent": agent, "open_ended": open_ended}


def get_suite(domain: str, split: str = "train", n: int = 100, seed: int = 0, difficulty: int = 1,
              families: list[str] | None = None) -> list[Task]:
    """n distinct tasks of one domain, split and difficulty; the same arguments always give the same tasks.
    With `families`, only tasks of those families (e.g. ["arith"]), drawn from a larger suite until n are found."""
    check_args(domain, split, n, difficulty)
    mod = MODULES[domain]
    if not families:
        return sample_split(lambda rng: mod.make(rng, difficulty), domain, split, n, seed, difficulty)
    known = family_names(domain, difficulty)
    unknown = [f for f in families if f not in known]
    if unknown:  # else the search below grows the suite for minutes before it gives up
        raise UserError(f"unknown {domain} task families {unknown} at difficulty {difficulty} "
                        f"(known: {', '.join(known)})")
    size = n
    while True:
        tasks = [t for t in get_suite(domain, split, size, seed, difficulty) if t.metadata.get("family") in families]
        if len(tasks) >= n or size > 64 * n + 64:
            break
        size *= 2
    if len(tasks) < n:
        raise UserError(f"only {len(tasks)} {domain} tasks of families {families} found, {n} asked for")
    return tasks[:n]


def family_names(domain: str, difficulty: int) -> list[str]:
    """The task families `get_suite(domain, difficulty=difficulty)` draws from."""
    if domain == "reasoning":
        return sorted(reasoning.FAMILIES)
    if domain == "code":
        return [f.name for f in code.FAMILIES if f.difficulty == difficulty]
    if domain == "agent":
        return [name for name, _ in agent.LEVELS[difficulty]]
    return ["constraints"]


def get_gym_suite(name: str, split: str = "train", n: int = 100, seed: int = 0) -> list[Task]:
    """Reasoning tasks from the reasoning-gym dataset `name` (optional: `pip install reasoning-gym`), split by the
    same hash as ours; they verify with reasoning-gym's own scorer."""
    try:
        import reasoning_gym  # noqa: F401
    except ImportError as e:
        raise UserError("reasoning-gym is not installed (optional: pip install reasoning-gym)") from e
    check_args("reasoning", split, n, 1)
    return sample_split(lambda rng: reasoning.make_gym(rng, name), "reasoning", split, n, seed, 1)


def get_mixed_suite(split: str = "train", n: int = 100, seed: int = 0, difficulty: int = 1) -> list[Task]:
    """n tasks cycling through the four domains."""
    check_args(DOMAINS[0], split, n, difficulty)
    per = -(-n // len(DOMAINS))
    suites = [get_suite(d, split, per, seed, difficulty) for d in DOMAINS]
    return [suites[i % len(DOMAINS)][i // len(DOMAINS)] for i in range(n)]


def verify(task: Task, completion: str | list[dict]) -> Verdict:
    """Score one completion (for agent tasks also a full message trace). Never raises for a bad completion."""
    if task.domain not in MODULES:
        return Verdict.infra_error(f"unknown domain {task.domain!r}")
    problem = _malformed(completion)
    if problem:
        return Verdict.wrong(f"malformed completion: {problem}")
    mod = MODULES[task.domain]
    if task.domain != "agent" and not isinstance(completion, str):
        completion = completion[-1]["content"] if completion else ""
    return mod.verify(task, completion)


def _malformed(completion) -> str | None:
    """Why `completion` is neither a string nor a list of chat messages with string roles and contents, or None."""
    if isinstance(completion, str):
        return None
    if not isinstance(completion, (list, tuple)):
        return f"a {type(completion).__name__}, not a string or a list of messages"
    for i, m in enumerate(completion):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"message {i} is not a dict with a string 'role' and 'content'"
    return None


def demonstration(task: Task) -> list[dict]:
    return MODULES[task.domain].demonstration(task)
