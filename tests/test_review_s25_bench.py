"""Review of the benchmark scripts: both sides of a comparison do the same work, reports name their real command."""

import sys
from argparse import Namespace
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_opd_ours_cycles_through_every_prompt_as_trl_does():
    import opd_throughput

    prompts = [[i] * (i + 1) for i in range(12)]  # prompts of different lengths
    seen = [p for step in range(6) for p in opd_throughput.step_prompts(prompts, 4, step)]
    assert seen[:12] == prompts and seen[12:] == prompts  # every prompt, in turn, not the first 4 again and again
    assert opd_throughput.step_prompts(prompts, 4, 1) == prompts[4:8]


def test_grpo_reasoning_reproduce_names_every_setting():
    import grpo_reasoning

    args = Namespace(steps=150, eval_every=10, lr=1e-4, reward="answer", test_size=200, final_test_size=500)
    cmd = grpo_reasoning.reproduce(args).split()
    for flag, value in (("--steps", "150"), ("--eval-every", "10"), ("--lr", "0.0001"), ("--reward", "answer"),
                        ("--test-size", "200"), ("--final-test-size", "500")):
        assert cmd[cmd.index(flag) + 1] == value


def test_async_rl_reproduce_names_the_run_settings():
    import async_rl

    a = Namespace(steps=12, groups=4, group_size=4, eta=1, delay=0.1, reward_workers=4, min_tokens=6, max_tokens=64,
                  chunk=8, lr=3e-3, seeds="0,1", backend="ray")
    cmd = async_rl.reproduce(a).split()
    for flag, value in (("--steps", "12"), ("--eta", "1"), ("--delay", "0.1"), ("--reward-workers", "4"),
                        ("--seeds", "0,1"), ("--backend", "ray")):
        assert cmd[cmd.index(flag) + 1] == value
