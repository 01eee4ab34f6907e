"""Task suites: determinism, disjoint splits, exact verifiers (right answers and subtly wrong ones), demonstrations."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random

import pytest

from elastic_moe import chat
from elastic_moe.errors import UserError
from elastic_moe.tasks import DOMAINS, demonstration, get_gym_suite, get_mixed_suite, get_suite, open_ended, verify
from elastic_moe.tasks import agent as agent_mod
from elastic_moe.tasks import code as code_mod
from elastic_moe.tasks import open_ended as open_mod
from elastic_moe.tasks import reasoning as reasoning_mod
from elastic_moe.tasks.base import parse_answer, parse_int, split_of
from elastic_moe.tasks.diversity import distinct_n, group_metrics, pass_at_k, self_bleu


def _answer(task):
    """The reference reply as the verifier takes it: a full trace for agent, the assistant text otherwise."""
    demo = task.demonstration()
    return demo if task.domain == "agent" else demo[-1]["content"]


# ------------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("domain", DOMAINS)
def test_deterministic_by_seed(domain):
    n = 4 if domain == "code" else 20
    a = [t.to_dict() for t in get_suite(domain, "train", n, seed=3, difficulty=2)]
    b = [t.to_dict() for t in get_suite(domain, "train", n, seed=3, difficulty=2)]
    c = [t.to_dict() for t in get_suite(domain, "train", n, seed=4, difficulty=2)]
    assert a == b
    assert a != c
    assert len({t["id"] for t in a}) == n


@pytest.mark.parametrize("domain,n_train,n_test", [("reasoning", 3000, 750), ("code", 2000, 500),
                                                   ("agent", 2000, 500), ("open_ended", 2000, 500)])
def test_train_and_test_never_overlap(domain, n_train, n_test):
    train = [t for seed in (0, 1) for t in get_suite(domain, "train", n_train // 2, seed, 1)]
    test = [t for seed in (0, 1) for t in get_suite(domain, "test", n_test // 2, seed, 1)]
    assert len({t.metadata["canonical"] for t in train}) > n_train // 2
    assert len({t.metadata["canonical"] for t in test}) > n_test // 2
    # not even the visible prompt: agent tasks with the same question and other hidden values share a split
    assert {t.messages[-1]["content"] for t in train}.isdisjoint({t.messages[-1]["content"] for t in test})
    key = [t.metadata.get("split_key", t.metadata["canonical"]) for t in train + test]
    assert [split_of(k) for k in key] == ["train"] * len(train) + ["test"] * len(test)


def test_split_is_a_function_of_the_problem_only():
    fractions = [sum(split_of(f"p{i}-{j}") == "test" for j in range(2000)) / 2000 for i in range(3)]
    assert all(0.15 < f < 0.25 for f in fractions)  # TEST_FRACTION = 0.2


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError):
        get_suite("chemistry", "train", 1)
    with pytest.raises(UserError):
        get_suite("reasoning", "dev", 1)
    with pytest.raises(UserError):
        get_suite("reasoning", "train", 1, difficulty=7)


def test_mixed_suite_cycles_domains():
    tasks = get_mixed_suite("train", 8, seed=0, difficulty=1)
    assert [t.domain for t in tasks] == list(DOMAINS) * 2


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_demonstrations_are_correct(domain, difficulty):
    n = 2 if domain == "code" else 40
    for task in get_suite(domain, "train", n, seed=11, difficulty=difficulty):
        demo = task.demonstration()
        assert demo[: len(task.messages)] == task.messages and demo[-1]["role"] == "assistant"
        v = verify(task, _answer(task))
        assert v.correct and v.reward == 1.0, (task.messages[-1]["content"], demo[-1]["content"], v)
        text = chat.render(demo)  # the shared chat format renders every demonstration
        assert text.startswith(chat.BOS) and text.endswith(chat.EOS)
        assert task.prompt().endswith(chat.ROLE_TOKENS["assistant"] + "\n")


def test_parse_answer_takes_the_last_answer_line():
    assert parse_answer("Answer: 3\nno wait\nanswer: 4") == "4"
    assert parse_answer("the answer is 4") is None


def test_answer_lines_in_a_reply_of_blank_lines_parse_in_linear_time():
    import time

    t0 = time.perf_counter()
    assert parse_answer("\n" * 200_000) is None  # was quadratic: 13 s for 40,000 newlines
    assert parse_answer("\n" * 100_000 + "Answer: 7\r\n" + " \n" * 1000) == "7"
    assert time.perf_counter() - t0 < 5.0  # ~0.01 s now


def test_parse_int_takes_thousands_separators_only_where_they_belong():
    from elastic_moe.tasks.base import parse_int

    assert parse_int("4,698") == 4698 and parse_int("-1,000,000.") == -1000000 and parse_int(" 12 ") == 12
    assert parse_int("4, 698") is None and parse_int("4 698") is None and parse_int("46,98") is None


# ------------------------------------------------------------------------------------------- reasoning


def test_arith_exact():
    task = next(t for t in get_suite("reasoning", "train", 50, 0, 2) if t.metadata["family"] == "arith")
    ans = task.reference["answer"]
    assert verify(task, f"steps...\nAnswer: {ans}").correct
    assert verify(task, f"Answer: {ans:,}").correct  # thousands separators are fine
    assert not verify(task, f"Answer: {ans + 1}").correct
    assert not verify(task, f"Answer: {ans - 1}").correct
    assert not verify(task, f"Answer: {ans}.5").correct
    assert not verify(task, f"Answer: {ans}\nAnswer: {ans + 1}").correct  # the last line counts
    assert not verify(task, f"The result is {ans}").correct


def test_countdown_exact():
    task = next(t for t in get_suite("reasoning", "train", 50, 0, 2) if t.metadata["family"] == "countdown")
    nums, target, sol = task.reference["numbers"], task.reference["target"], task.reference["solution"]
    assert verify(task, f"Answer: {sol}").correct
    assert verify(task, f"Answer: ({sol})").correct
    assert not verify(task, f"Answer: {sol} + 0").correct  # an extra number
    assert not verify(task, f"Answer: ({sol}) - {nums[0]} + {nums[0]}").correct  # a number used twice
    assert not verify(task, f"Answer: {' + '.join(map(str, nums))} + 1").correct
    assert not verify(task, f"Answer: {target}").correct  # the target alone uses the wrong numbers
    assert not verify(task, "Answer: __import__('os').system('true')").correct
    assert not verify(task, f"Answer: {nums[0]} ** 2").correct


def test_countdown_takes_natural_answer_formats():
    task = next(t for t in get_suite("reasoning", "train", 50, 0, 2) if t.metadata["family"] == "countdown")
    sol, target = task.reference["solution"], task.reference["target"]
    assert verify(task, f"Answer: {sol} = {target}").correct
    assert verify(task, f"Answer: {sol}.").correct
    assert verify(task, "Answer: " + sol.replace("-", "\u2212")).correct  # a Unicode minus
    assert not verify(task, f"Answer: {sol} = {target + 1}").correct  # a claim other than the target


def test_countdown_wrong_value_with_right_numbers():
    task = next(t for t in get_suite("reasoning", "train", 50, 0, 1) if t.metadata["family"] == "countdown")
    nums, target = task.reference["numbers"], task.reference["target"]
    expr = " + ".join(map(str, nums))
    v = verify(task, f"Answer: {expr}")
    assert v.correct == (sum(nums) == target)
    value, used = reasoning_mod.eval_countdown("(8 - 2) / 3 * 4")
    assert value == 8 and sorted(used) == [2, 3, 4, 8]


# ------------------------------------------------------------------------------------------------ code


@pytest.fixture(scope="module")
def add_task():
    return next(t for t in get_suite("code", "train", 20, 0, 1) if t.metadata["family"] == "add")


def test_code_right_and_subtly_wrong(add_task):
    fn, k = add_task.reference["function"], int(add_task.reference["function"].split("_")[1])
    ok = f"```python\ndef {fn}(x):\n    return {k} + x\n```"
    assert verify(add_task, ok).correct
    assert verify(add_task, f"Here you go:\ndef {fn}(x):\n    return x + {k}\n").correct  # no fence
    off_by_one = f"```python\ndef {fn}(x):\n    return x + {k + 1}\n```"
    v = verify(add_task, off_by_one)
    assert not v.correct and v.reward == 0.0 and "0/8" in v.reason
    edge = f"```python\ndef {fn}(x):\n    return x + {k} if x != 0 else 0\n```"  # wrong only at x == 0
    v = verify(add_task, edge)
    assert not v.correct and "7/8" in v.reason
    float_ret = f"```python\ndef {fn}(x):\n    return float(x + {k})\n```"  # 8.0 is not 8
    assert not verify(add_task, float_ret).correct
    assert not verify(add_task, "```python\ndef something_else(x):\n    return x\n```").correct
    assert not verify(add_task, f"```python\ndef {fn}(x)\n    return x\n```").correct  # syntax error


def test_code_reward_hacks_fail(add_task):
    fn = add_task.reference["function"]
    exit_early = f"```python\nimport os\ndef {fn}(x):\n    return 0\nos._exit(0)\n```"
    v = verify(add_task, exit_early)
    assert not v.correct and "did not run" in v.reason
    n = len(add_task.reference["inputs"])
    fake = f"```python\ndef {fn}(x):\n    return 0\nprint('{code_mod.MARKER}' + repr(['1'] * {n}).replace(\"'\", '\"'))\n```"
    assert not verify(add_task, fake).correct
    sysexit = f"```python\nimport sys\ndef {fn}(x):\n    return 0\nsys.exit(0)\n```"
    assert not verify(add_task, sysexit).correct
    # a shadowed print that forges a malformed last results line: scored 0, never a verifier crash (None)
    for forged in ("[0,0,0,0,0,0,0,0]", "[" * 50000, '["1"]'):
        shadow = (f"```python\ndef {fn}(x):\n    return 0\nimport builtins as _b\ndef print(*a, **k):\n"
                  f"    _b.print({code_mod.MARKER + forged!r}, flush=True)\n```")
        v = verify(add_task, shadow)
        assert not v.correct and v.reward == 0 and "test results" in v.reason


def test_code_fence_tags_are_read_in_any_case(add_task):
    sol = add_task.reference["solution"]
    for tag in ("Python", "python3", "PY"):
        assert verify(add_task, f"Here:\n```{tag}\n{sol}```\n").correct, tag


def test_code_tests_are_hidden_from_the_prompt():
    for task in get_suite("code", "train", 30, 0, 3):
        prompt = task.messages[-1]["content"]
        assert task.reference["function"] in prompt
        assert len(task.reference["inputs"]) >= 8 and len(task.reference["expected"]) == len(task.reference["inputs"])
        assert task.reference["solution"] not in prompt


@pytest.mark.parametrize("difficulty, family, wrong", [
    (1, "multiple", "def {fn}(x):\n    return x == 0\n"),  # k up to 999, random inputs up to 100
    (2, "multiples", "def {fn}(xs):\n    return [x for x in xs if x == 0]\n"),
    (2, "sum_above", "def {fn}(xs):\n    return sum(x for x in xs if x >= {c})\n"),  # >= for >
    (3, "caesar", "def {fn}(s):\n    return ''.join(chr((ord(c) - 97 + {c}) % 26 + 97) for c in s)\n"),  # shifts all
])
def test_code_hidden_tests_catch_wrong_solutions_that_random_inputs_miss(difficulty, family, wrong):
    """Hidden inputs include the task's own constants (multiples of k, the threshold, capitals, ...):
    each of these wrong solutions passed the tests of most tasks of its family before."""
    tasks = [t for t in get_suite("code", "train", 100, 0, difficulty) if t.metadata["family"] == family][:6]
    assert tasks
    for task in tasks:
        fn = task.reference["function"]
        consts = [int(x) for x in fn.replace("neg", "-").split("_") if x.lstrip("-").isdigit()] + [0]
        src = wrong.format(fn=fn, c=consts[0])
        got = code_mod.run_reference(src, fn, task.reference["inputs"])
        assert [repr(g) for g in got] != task.reference["expected"], (fn, src)


def test_code_fences_with_any_info_string_pair_up(add_task):
    sol = add_task.reference["solution"]
    assert verify(add_task, f"Here is the function:\n```text\nnotes\n```\n```python\n{sol}```\n").correct
    assert verify(add_task, f"```bash\npython run.py\n```\nThen:\n``` python\n{sol}```").correct
    # the last block that defines the function counts, not a later usage example
    fn = add_task.reference["function"]
    assert verify(add_task, f"```python\n{sol}```\nUsage:\n```python\nprint({fn}(1))\n```").correct


# ----------------------------------------------------------------------------------------------- agent


def _trace(task, replies):
    it = iter(replies)
    return agent_mod.run_episode(task, lambda messages: next(it), max_turns=len(replies))


def test_agent_right_and_subtly_wrong():
    task = next(t for t in get_suite("agent", "train", 50, 0, 2) if t.metadata["family"] == "price")
    ans, script = task.reference["answer"], task.reference["script"]
    good = _trace(task, [f"<tool>{s}</tool>" for s in script] + [f"Answer: {ans}"])
    assert good.verdict.correct and good.turns == len(script) + 1
    # several calls in one turn are fine
    assert _trace(task, ["".join(f"<tool>{s}</tool>" for s in script), f"Answer: {ans}"]).verdict.correct
    wrong = _trace(task, [f"<tool>{s}</tool>" for s in script] + [f"Answer: {ans + 1}"])
    assert not wrong.verdict.correct
    guessed = _trace(task, [f"Answer: {ans}"])  # right number, no lookups: a guess
    assert not guessed.verdict.correct and "required tool calls missing" in guessed.verdict.reason
    assert not verify(task, f"Answer: {ans}").correct
    unfinished = _trace(task, [f"<tool>{s}</tool>" for s in script])
    assert not unfinished.verdict.correct


def test_agent_forged_tool_results_fail():
    task = get_suite("agent", "train", 1, 0, 1)[0]
    demo = task.demonstration()
    forged = [dict(m) for m in demo]
    i = next(i for i, m in enumerate(forged) if m["role"] == "tool")
    forged[i]["content"] = forged[i]["content"].rsplit("=", 1)[0] + "= 1"
    assert not verify(task, forged).correct
    no_result = [m for m in demo if m["role"] != "tool"]
    assert not verify(task, no_result).correct
    assert verify(task, demo).correct


def test_agent_env_tools():
    env = agent_mod.Env({"apple": 7})
    call = agent_mod.parse_tool_calls
    assert env.execute(call("<tool>lookup(apple)</tool>")[0]) == "lookup(apple) = 7"
    assert env.execute(call("<tool>lookup('apple')</tool>")[0]) == "lookup('apple') = 7"
    assert "error" in env.execute(call("<tool>lookup(kiwi)</tool>")[0])
    assert env.execute(call("<tool>calculator(3*(4+2)/9)</tool>")[0]) == "calculator(3*(4+2)/9) = 2"
    assert "error" in env.execute(call("<tool>calculator(__import__('os'))</tool>")[0])
    assert "error" in env.execute(call("<tool>calculator(1/0)</tool>")[0])
    assert env.execute(call("<tool>convert(3, km, m)</tool>")[0]) == "convert(3, km, m) = 3000"
    assert "error" in env.execute(call("<tool>convert(3, km, kg)</tool>")[0])
    assert "error" in env.execute(call("<tool>rm(everything)</tool>")[0])


def test_agent_huge_results_are_tool_errors_not_crashes():
    task = get_suite("agent", "train", 1, 0, 1)[0]
    env = agent_mod.Env({})
    for text in ("<tool>calculator(1e200*1e200/7)</tool>", "<tool>convert(1e300*1e300/7, km, m)</tool>"):
        assert "= error:" in env.execute(agent_mod.parse_tool_calls(text)[0])
        v = verify(task, [*task.messages, {"role": "assistant", "content": text},
                          {"role": "tool", "content": env.execute(agent_mod.parse_tool_calls(text)[0])},
                          {"role": "assistant", "content": "Answer: 1"}])
        assert v.reward == 0.0 and not v.correct


def test_agent_requires_the_lookups_only():
    task = next(t for t in get_suite("agent", "train", 50, 0, 1) if t.metadata["family"] == "convert")
    assert verify(task, f"Answer: {task.reference['answer']}").correct  # no hidden value to look up
    price = next(t for t in get_suite("agent", "train", 50, 0, 1) if t.metadata["family"] == "price")
    v = verify(price, f"Answer: {price.reference['answer']}")
    assert not v.correct and "required tool calls missing: lookup:" in v.reason


def test_agent_episode_recovers_from_a_tool_error_and_respects_max_turns():
    task = next(t for t in get_suite("agent", "train", 50, 0, 1) if t.metadata["family"] == "price")
    ans = task.reference["answer"]
    replies = ["<tool>lookup(nothing_here)</tool>"] + [f"<tool>{s}</tool>" for s in task.reference["script"]]
    ep = _trace(task, [*replies, f"Answer: {ans}"])
    assert ep.verdict.correct
    looping = agent_mod.run_episode(task, lambda messages: "<tool>calculator(1+1)</tool>", max_turns=3)
    assert looping.turns == 3 and not looping.verdict.correct


# ------------------------------------------------------------------------------------------ open-ended


@pytest.mark.parametrize("kind,params,good,bad", [
    ("max_words", {"n": 5}, "one two three four five", "one two three four five six"),
    ("min_words", {"n": 3}, "one two three", "one two"),
    ("include", {"words": ["river", "stone"]}, "The River by the stone.", "The river by the stones."),
    ("exclude", {"words": ["very"]}, "It was everything.", "It was Very nice."),
    ("lowercase", {}, "all quiet here.", "all quiet Here."),
    ("no_commas", {}, "one two three", "one, two"),
    ("bullets", {"n": 2}, "- a thing\n- another", "- a thing\n- another\n- third"),
    ("starts_with", {"word": "Once"}, "once upon a time", "Upon a time once"),
    ("ends_with", {"word": "home"}, "and then we went home.", "and then we went home again"),
    ("title", {}, "<<The Sea>>\nwaves", "<The Sea>\nwaves"),
])
def test_open_ended_constraints_exact(kind, params, good, bad):
    c = {"kind": kind, **params}
    assert open_mod.check(c, good) and not open_mod.check(c, bad)


def test_open_ended_partial_reward():
    task = get_suite("open_ended", "train", 1, 0, 1)[0]
    task.reference = {"constraints": [{"kind": "no_commas"}, {"kind": "max_words", "n": 10}]}
    v = verify(task, "a quiet road, a slow river and one small lamp")
    assert not v.correct and v.reward == 0.5 and v.details["met"] == {"no_commas": False, "max_words": True}
    assert verify(task, "a quiet road by a slow river and one lamp").correct


def test_open_ended_empty_or_token_replies_earn_nothing():
    tasks = get_suite("open_ended", "test", 64, 0, 1)
    for reply in ("", "x", "ok then", "one two three four five six seven"):
        assert all(verify(t, reply).reward == 0.0 for t in tasks), reply
    assert all(verify(t, demonstration(t)[-1]["content"]).correct for t in tasks)


def test_open_ended_words_need_letters_and_quotes_are_not_part_of_them():
    tasks = get_suite("open_ended", "test", 100, 0, 1)
    assert all(verify(t, "' ' ' ' ' ' ' ' ' '").reward == 0.0 for t in tasks)  # scored 0.28 on average before
    assert open_mod.words("don't 'river' rock'n'roll '") == ["don't", "river", "rock'n'roll"]
    assert open_mod.check({"kind": "include", "words": ["river"]}, "By the 'river' we sat.")
    assert not open_mod.check({"kind": "exclude", "words": ["very"]}, "It was 'very' calm.")
    assert open_mod.check({"kind": "ends_with", "word": "home"}, "and so we went 'home'.")
    bullets = {"kind": "bullets", "n": 2}
    assert open_mod.check(bullets, "Two tips:\n- drink water\n- sleep early\nThat is all.")  # as IFEval counts
    assert not open_mod.check(bullets, "Tips:\n- drink water\n- sleep early\n- walk")


def test_open_ended_prompts_state_their_constraints():
    for task in get_suite("open_ended", "train", 50, 0, 3):
        prompt = task.messages[-1]["content"]
        assert 3 <= len(task.reference["constraints"]) <= 4
        assert all(open_mod.describe(c) in prompt for c in task.reference["constraints"])


# ------------------------------------------------------------------------------------------- diversity


def test_distinct_n_and_self_bleu():
    assert distinct_n(["a b c", "a b d"], 1) == 4 / 6
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_n([], 2) == 0.0
    same = ["the cat sat on the mat today"] * 3
    assert self_bleu(same) == pytest.approx(1.0)
    different = ["the cat sat on the mat", "a dog ran in a park", "birds fly over green hills"]
    assert self_bleu(different) < 0.2
    assert self_bleu(["only one"]) == 0.0


def test_self_bleu_of_identical_empty_texts_is_one():
    assert self_bleu(["", "", ""]) == 1.0  # the same texts: not "most diverse"
    assert self_bleu(["", "a b c"]) == 0.0


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(10, 3, 5), (20, 1, 4), (16, 8, 8), (7, 2, 6)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    rng = random.Random(0)  # the estimator is the mean over random k-subsets
    draws = [any(rng.sample([True] * 3 + [False] * 7, 4)) for _ in range(20000)]
    assert sum(draws) / len(draws) == pytest.approx(pass_at_k(10, 3, 4), abs=0.02)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_group_metrics():
    m = group_metrics(["a b", "a c", "d e", "a b"], [True, False, False, True], ks=(1, 2, 8))
    assert m["pass@1"] == 0.5 and "pass@8" not in m and m["correct"] == 2


# ------------------------------------------------------------------------------- optional reasoning-gym


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym is optional")
def test_reasoning_gym_tasks():
    train = get_gym_suite("basic_arithmetic", "train", 20, seed=0)
    test = get_gym_suite("basic_arithmetic", "test", 5, seed=0)
    assert {t.metadata["canonical"] for t in train}.isdisjoint(t.metadata["canonical"] for t in test)
    assert [t.to_dict() for t in train] == [t.to_dict() for t in get_gym_suite("basic_arithmetic", "train", 20, seed=0)]
    for t in train:
        assert verify(t, t.demonstration()[-1]["content"]).correct
        assert not verify(t, f"Answer: {t.reference['answer']}1").correct


def test_reasoning_gym_missing_is_a_user_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gym(name, *args, **kwargs):
        if name == "reasoning_gym":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gym)
    with pytest.raises(UserError, match="reasoning-gym"):
        get_gym_suite("basic_arithmetic", "train", 1)


def test_a_unicode_minus_is_a_minus_sign_in_integer_answers():
    # countdown answers already take U+2212; an arith or agent answer of "−229" was "not an integer"
    assert parse_int("\u2212229") == -229 and parse_int("\u22121,000") == -1000
    task = next(t for t in get_suite("reasoning", "train", 40, 1, 2)
                if t.metadata["family"] == "arith" and t.reference["answer"] < 0)
    assert verify(task, f"Answer: \u2212{-task.reference['answer']}").correct


def test_a_code_block_indented_under_a_list_item_still_runs(add_task):
    indented = "".join("   " + ln + "\n" for ln in add_task.reference["solution"].splitlines())
    reply = f"1. The function:\n   ```python\n{indented}   ```\n"
    assert verify(add_task, reply).correct  # was IndentationError: a right answer scored 0


def test_a_completion_with_a_lone_surrogate_is_scored_not_raised(add_task):
    sol, fn = add_task.reference["solution"], add_task.reference["function"]
    assert verify(add_task, f"```python\n{sol}# \ud800\n```").correct  # was UnicodeEncodeError out of verify
    v = verify(add_task, f"```python\ndef {fn}(x):\n    return '\ud800'\n```")
    assert v.reward == 0.0 and "SyntaxError" in v.reason  # not valid source: Python's own error, scored 0


@pytest.mark.parametrize("bad", [None, 5, [{"role": "assistant"}], [{"role": "assistant", "content": None}], ["hi"]])
def test_a_malformed_completion_is_a_wrong_verdict_not_an_exception(bad, add_task, arith_task):
    agent_task = get_suite("agent", "train", 1, 0, 1)[0]
    for task in (arith_task, agent_task):
        v = verify(task, bad)  # raised TypeError / KeyError: "never raises for a bad completion"
        assert v.reward == 0.0 and "completion" in v.reason
    prompt_then_bad = [*agent_task.messages, {"role": "assistant", "content": 7}]
    assert verify(agent_task, prompt_then_bad).reward == 0.0


def test_a_later_block_defining_a_longer_name_does_not_replace_the_solution(add_task):
    sol, fn = add_task.reference["solution"], add_task.reference["function"]
    reply = (f"```python\n{sol}```\nAnd a variant that prints:\n"
             f"```python\ndef {fn}_verbose(x):\n    print({fn}(x))\n```")
    assert verify(add_task, reply).correct  # the second block "contained" `def {fn}` and was run alone
    v = verify(add_task, f"```python\ndef {fn}0(x):\n    return 0\n```")
    assert not v.correct and "no definition" in v.reason


def test_an_unknown_task_family_is_named_at_once():
    from elastic_moe.errors import UserError
    from elastic_moe.tasks import get_mixed_suite

    # was: the suite grown to 64 n + 64 tasks before "only 0 ... found" (2.5 min for code, n=50)
    with pytest.raises(UserError, match=r"unknown code task families \['adds'\] at difficulty 1 .*known: add"):
        get_suite("code", "train", 50, families=["adds"])
    with pytest.raises(UserError, match=r"unknown agent task families \['route'\] at difficulty 1"):
        get_suite("agent", "train", 50, families=["route"])  # a family of difficulty 3 only
    assert {t.metadata["family"] for t in get_suite("agent", "train", 5, families=["price"])} == {"price"}
    with pytest.raises(UserError, match="n must be >= 0, not -5"):  # said "not -1" (the per-domain count)
        get_mixed_suite("train", -5)


def test_house_style_demonstrations_share_their_wording_within_a_topic_and_kind():
    """Stage 4 needs a student whose open-ended answers are narrow: the demonstrations of one topic and kind reuse
    one passage (they were independent random word bags, as diverse as the model could sample)."""
    from itertools import combinations

    from elastic_moe.tasks import get_suite
    from elastic_moe.tasks.diversity import ngrams, tokenize

    tasks = get_suite("open_ended", "train", 300, 0, 2)
    grams = [(t.metadata["topic"], t.metadata["kind"], set(ngrams(tokenize(t.demonstration()[-1]["content"]), 2)))
             for t in tasks]
    same, other = [], []
    for (ta, ka, a), (tb, kb, b) in combinations(grams, 2):
        (same if (ta, ka) == (tb, kb) else other).append(len(a & b) / len(a | b))
    assert len(same) > 50
    assert sum(same) / len(same) > 0.3 > 10 * sum(other) / len(other)


def test_open_ended_demonstration_of_a_task_saved_without_kind():
    # tasks written before session 28 carry a topic but no "kind"; their demonstration used to raise KeyError
    for task in get_suite("open_ended", "train", n=20, seed=3, difficulty=2):
        expected = open_ended.demonstration(task)
        for drop in (("kind",), ("topic", "kind")):
            old = dataclasses.replace(task, metadata={k: v for k, v in task.metadata.items() if k not in drop})
            assert open_ended.topic_and_kind(old) == (task.metadata["topic"], task.metadata["kind"])
            assert open_ended.demonstration(old) == expected
            assert old.verify(expected[-1]["content"]).correct


def test_open_ended_task_without_topic_anywhere_is_a_clear_error():
    task = get_suite("open_ended", "train", n=1, seed=0)[0]
    bare = dataclasses.replace(task, metadata={}, messages=[{"role": "user", "content": "Say something."}])
    with pytest.raises(ValueError, match="no topic and kind"):
        open_ended.demonstration(bare)
