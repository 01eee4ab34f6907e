"""Synchronous vs asynchronous GRPO: wall-clock per trained sample, trainer idle fraction and final test reward.

The same job both ways: a tiny MoE (hidden 64, 2 layers, 4 experts top-2, vocabulary 64, random init), the toy
token-share reward of `elastic_moe.async_rl.toy`, the same seeds and the same trained samples (steps x groups x G).
Two things make RL slow in practice and are in the mix: a long-tail response length (each prompt's token budget is
min_tokens x Pareto(1.2), capped), and a slow verifier (a sleep per verification, I/O-like: a sandbox start-up or a
remote judge) served by a pool of reward workers. Synchronous: rollout every group of the step, score every sample,
train, repeat (`Controller.run_sync`). Asynchronous: `Controller.run` with staleness bound eta, partial rollouts
(new weights picked up every chunk) and the decoupled-PPO correction of GRPOTrainer (the trainer's recompute is the
proximal policy; pi_prox / pi_behaviour, truncated, weighs each token against the log-prob it was sampled with).
Local backend (threads), one torch thread per worker.

    .venv/bin/python benchmarks/async_rl.py [--steps 24] [--eta 2] [--delay 0.2] [--reward-workers 8] [--backend local|ray]

Writes docs/benchmarks/async_rl.{md,json,png}; prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import machine  # noqa: E402

from elastic_moe.async_rl.controller import Controller, RunConfig  # noqa: E402
from elastic_moe.async_rl.toy import TokenShareReward, ToyConfig, toy_model, toy_prompts  # noqa: E402
from elastic_moe.async_rl.workers import RolloutSettings  # noqa: E402
from elastic_moe.atomic import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402
from elastic_moe.generate import SamplingParams, generate  # noqa: E402
from elastic_moe.grpo_trainer import GRPOConfig  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
TOY = ToyConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, moe_num_experts=4, moe_k=2, prompt_len=8)


T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def test_reward(model, prompts, n: int, max_new: int) -> tuple[float, float]:
    """Mean and standard error of the reward of n samples per test prompt (T = 1, no delay)."""
    fn = TokenShareReward(TOY.vocab_size)
    rs = []
    for i, p in enumerate(prompts):
        for c in generate(model, [p], SamplingParams(max_new, seed=10_000 + i), eos_id=-1, n=n):
            rs.append(fn(0, c.tokens))
    return statistics.mean(rs), statistics.stdev(rs) / math.sqrt(len(rs))


def run_one(mode: str, a, seed: int) -> dict:
    torch.set_num_threads(1)
    cfg = RunConfig(steps=a.steps, groups_per_step=a.groups, eta=a.eta, backend=a.backend, rollout_workers=1,
                    reward_workers=a.reward_workers, lr=a.lr, seed=seed, long_tail_min_tokens=a.min_tokens,
                    long_tail_alpha=1.2, rollout_cpus=0.5, reward_cpus=0.1, trainer_cpus=0.5)
    rs = RolloutSettings(group_size=a.group_size, max_new_tokens=a.max_tokens, chunk_tokens=a.chunk)
    model = toy_model(TOY, seed)
    ctl = Controller(cfg, model, toy_prompts(TOY, 64, seed), TokenShareReward(TOY.vocab_size, a.delay), rs,
                     GRPOConfig(mask_truncated=False, tis_cap=2.0), eos_id=-1, log=say)
    s = ctl.run_sync() if mode == "sync" else ctl.run()
    model.load_state_dict(s.pop("params"))
    s["test_reward"], s["test_reward_se"] = test_reward(model.eval(), toy_prompts(TOY, 16, 1000 + seed), 8, 32)
    rows = s.pop("rows")
    s["curve"] = [(r["elapsed_s"], (i + 1) * a.groups * a.group_size) for i, r in enumerate(rows)]
    s["train_reward"] = [r.get("reward/mean") for r in rows]
    s["truncated_frac"] = statistics.mean(r.get("samples/truncated_frac", 0) for r in rows)
    s.pop("losses")
    say(f"{mode} seed {seed}: {s['wall_s']:.1f} s, {s['wall_per_sample_s'] * 1e3:.1f} ms/sample, trainer idle "
        f"{s['trainer_idle_frac']:.2f}, rollout idle {s['rollout_idle_frac']:.2f}, test reward {s['test_reward']:.3f}")
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--eta", type=int, default=2)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--reward-workers", type=int, default=8)
    ap.add_argument("--min-tokens", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--backend", default="local")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--md-only", action="store_true", help="rewrite the .md from the .json (same arguments)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # more threads than free cores is far slower on a shared machine
    if a.md_only:
        write_md(json.loads((DOCS / "async_rl.json").read_text()), a)
        return
    if a.backend == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    load0 = os.getloadavg()[0]
    seeds = [int(x) for x in a.seeds.split(",")]
    r0 = statistics.mean(test_reward(toy_model(TOY, sd), toy_prompts(TOY, 16, 1000 + sd), 8, 32)[0] for sd in seeds)
    say(f"initial test reward {r0:.3f}")
    runs = {"sync": [], "async": []}
    for sd in seeds:  # alternate, so that a change in the machine's load hits both modes alike
        for mode in runs:
            runs[mode].append(run_one(mode, a, sd))
    sync, asyn = runs["sync"], runs["async"]

    def tot(rs, k):
        return sum(r[k] for r in rs)

    def mean(rs, k):
        return statistics.mean(r[k] for r in rs)

    n = tot(sync, "samples")
    busy_r = sum(r["wall_s"] * (1 - r["rollout_idle_frac"]) for r in sync)
    busy_t = sum(r["wall_s"] * (1 - r["trainer_idle_frac"]) for r in sync)
    wall_s, wall_a = tot(sync, "wall_s"), tot(asyn, "wall_s")
    t_reward = wall_s - busy_r - busy_t
    deltas = [x["test_reward"] - y["test_reward"] for x, y in zip(asyn, sync)]
    se = statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else math.hypot(
        asyn[0]["test_reward_se"], sync[0]["test_reward_se"])
    res = {"speedup": wall_s / wall_a,
           "trainer_idle_sync": 1 - busy_t / wall_s,
           "trainer_idle_async": 1 - sum(r["wall_s"] * (1 - r["trainer_idle_frac"]) for r in asyn) / wall_a,
           "reward_delta": statistics.mean(deltas), "reward_delta_se": se, "reward_deltas": deltas,
           "ms_per_sample_sync": 1e3 * wall_s / n, "ms_per_sample_async": 1e3 * wall_a / tot(asyn, "samples"),
           "rollout_idle_sync": 1 - busy_r / wall_s,
           "rollout_idle_async": 1 - sum(r["wall_s"] * (1 - r["rollout_idle_frac"]) for r in asyn) / wall_a,
           "test_reward_init": r0, "test_reward_sync": mean(sync, "test_reward"),
           "test_reward_async": mean(asyn, "test_reward"),
           "staleness_hist_async": dict(sum((Counter(r["staleness_hist"]) for r in asyn), Counter())),
           "token_staleness_hist_async": dict(sum((Counter(r["token_staleness_hist"]) for r in asyn), Counter())),
           "sync_phase_s": {"rollout": busy_r, "reward": t_reward, "train": busy_t},
           "overlap_bound": wall_s / max(busy_r + busy_t, t_reward), "samples": n, "seeds": seeds,
           "wall_s_sync": [r["wall_s"] for r in sync], "wall_s_async": [r["wall_s"] for r in asyn],
           "eta": a.eta, "reward_delay_s": a.delay, "reward_workers": a.reward_workers, "backend": a.backend,
           "load_avg_1min_start": load0, "load_avg_1min_end": os.getloadavg()[0], "cpus": os.cpu_count(),
           "machine": machine()}
    if not a.no_write:
        write(res, sync, asyn, a)
    print(json.dumps(res))


def write(res: dict, sync: dict, asyn: dict, a) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(DOCS / "async_rl.json", res)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
        for s, name in ((sync[0], "synchronous"), (asyn[0], f"asynchronous (eta={a.eta})")):
            ax[0].plot(*zip(*[(0, 0), *s["curve"]]), marker="o", ms=3, label=name)
        ax[0].set_xlabel(f"wall-clock (s), seed {res['seeds'][0]}")
        ax[0].set_ylabel("trained samples")
        ax[0].legend(fontsize=8)
        ax[0].grid(alpha=0.3)
        h = res["token_staleness_hist_async"]
        ax[1].bar([int(k) for k in h], list(h.values()))
        ax[1].set_xlabel("staleness of a token at training (versions)")
        ax[1].set_title("asynchronous: tokens per staleness", fontsize=9)
        fig.tight_layout()
        atomic_savefig(fig, DOCS / "async_rl.png")
        plt.close(fig)
    except Exception as e:  # noqa: BLE001 - the table is written without the figure
        say(f"no figure: {e}")
    write_md(res, a)


def reproduce(a) -> str:
    """The command with every setting of this run (the report's figures depend on all of them)."""
    return (f"python benchmarks/async_rl.py --steps {a.steps} --groups {a.groups} --group-size {a.group_size} "
            f"--eta {a.eta} --delay {a.delay:g} --reward-workers {a.reward_workers} --min-tokens {a.min_tokens} "
            f"--max-tokens {a.max_tokens} --chunk {a.chunk} --lr {a.lr:g} --seeds {a.seeds} --backend {a.backend}")


def write_md(res: dict, a) -> None:
    p = res["sync_phase_s"]
    lines = [
        "# Asynchronous RL: synchronous vs asynchronous GRPO",
        "",
        f"Same job both ways: tiny MoE (hidden 64, 2 layers, 4 experts top-2), {res['samples']} trained samples in "
        f"all ({a.steps} steps x {a.groups} prompts x G={a.group_size} per seed), seeds {a.seeds} (the two modes "
        "alternate); long-tail token budget per prompt "
        f"({a.min_tokens} x Pareto(1.2), cap {a.max_tokens}); slow verifier: {a.delay * 1e3:.0f} ms sleep per sample on "
        f"{a.reward_workers} reward workers; one rollout worker, one trainer, {a.backend} backend, 1 torch thread each. "
        f"Asynchronous: eta = {a.eta}, partial rollouts every {a.chunk} tokens.",
        "",
        f"Machine: {res.get('machine') or machine()}. Reproduce: `{reproduce(a)}` (`--backend ray` runs the same "
        "job on local Ray).",
        "",
        "| | synchronous | asynchronous |",
        "|---|---|---|",
        f"| wall-clock per trained sample | {res['ms_per_sample_sync']:.1f} ms | {res['ms_per_sample_async']:.1f} ms |",
        f"| speedup | 1.00x | **{res['speedup']:.2f}x** |",
        f"| trainer idle fraction | {res['trainer_idle_sync']:.2f} | {res['trainer_idle_async']:.2f} |",
        f"| rollout idle fraction | {res['rollout_idle_sync']:.2f} | {res['rollout_idle_async']:.2f} |",
        f"| final test reward (init {res['test_reward_init']:.3f}) | {res['test_reward_sync']:.3f} | "
        f"{res['test_reward_async']:.3f} |",
        "",
        f"Reward delta (async - sync, mean over seeds) {res['reward_delta']:+.3f} +- {res['reward_delta_se']:.3f} (standard "
        f"error over the seeds; per seed {[round(d, 3) for d in res['reward_deltas']]}; each test reward is the mean of "
        f"{16 * 8} samples at T = 1 on held-out prompts). Sample staleness at training (async): "
        f"{res['staleness_hist_async']}; tokens: {res['token_staleness_hist_async']}. "
        + ("Within two standard errors of synchronous." if abs(res["reward_delta"]) <= 2 * res["reward_delta_se"] else
           "More than two standard errors from synchronous: staleness changes the optimisation trajectory "
           "measurably on this toy task (its sign depends on the learning rate and eta: docs/LOG.md, "
           "Asynchronous RL)."),
        *([""] + ["Both modes end near the toy reward's ceiling of 1.0: the comparison shows that staleness leaves no "
                  "lasting cost, not that it costs nothing on the way (with half the samples, 12 steps, the "
                  "asynchronous runs trailed by 0.09 +- 0.07: docs/LOG.md, Asynchronous RL)."]
          if min(res["test_reward_sync"], res["test_reward_async"]) > 0.95 else []),
        "",
        f"Where the synchronous time goes: rollout {p['rollout']:.1f} s, reward {p['reward']:.1f} s, train "
        f"{p['train']:.1f} s. Perfect overlap of the verifier with (rollout + train) bounds the speedup at "
        f"{res['overlap_bound']:.2f}x on this machine; rollout and training cannot overlap each other here: both are "
        f"CPU-bound on the same 2 cores (shared with other jobs: 1-minute load average {res['load_avg_1min_start']:.1f} "
        f"at the start, {res['load_avg_1min_end']:.1f} at the end) and, in the local backend, on one Python "
        "interpreter (the tiny model's forward is mostly Python overhead, which holds the GIL).",
        "",
        f"The trainer is idle most of the time in both modes because training is the cheap phase of this job "
        f"({p['train']:.1f} s of training against {p['rollout']:.1f} s of rollout): with one rollout worker feeding it, "
        f"its busy share cannot exceed train / rollout = {p['train'] / p['rollout']:.2f} however well the phases "
        "overlap, so its idle fraction falls only from about 1 - train / (rollout + reward + train) to about "
        "1 - train / rollout. What asynchrony removes here is the rollout worker's wait for the verifier and the "
        "trainer (rollout idle fraction above).",
        "",
        "![throughput](async_rl.png)",
    ]
    atomic_write_text(DOCS / "async_rl.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
