"""Asynchronous RL: staleness rule, partial rollouts, eta = 0 == synchronous (bit-exact), fault injection, resume."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from helpers import policy_checkpoint

from elastic_moe.async_rl.buffer import Group, GroupSample, StalenessBuffer
from elastic_moe.async_rl.controller import Controller, RunConfig, Stats
from elastic_moe.async_rl.toy import TokenShareReward, ToyConfig, toy_model, toy_prompts
from elastic_moe.async_rl.weights import WeightStore, snapshot
from elastic_moe.async_rl.workers import RolloutJob, RolloutSettings, RolloutWorker, TrainerWorker
from elastic_moe.errors import UserError
from elastic_moe.grpo_trainer import GRPOConfig

TOY = ToyConfig(hidden_size=32, vocab_size=48, prompt_len=6)

pytestmark = pytest.mark.usefixtures("one_thread")  # the workers set one thread too; restored after each test


def controller(out=None, delay=0.0, grpo=None, **kw) -> Controller:
    run = dict(steps=3, groups_per_step=2, eta=1, lr=1e-3, rollout_workers=2, reward_workers=2)
    run.update(kw)
    return Controller(RunConfig(**run), toy_model(TOY), toy_prompts(TOY, 12, 0), TokenShareReward(TOY.vocab_size, delay),
                      RolloutSettings(group_size=4, max_new_tokens=12, chunk_tokens=4),
                      grpo or GRPOConfig(mask_truncated=False), eos_id=2, out_dir=out)


@pytest.mark.parametrize("override, words", [
    ("run.backend=foo", "run.backend = 'foo'"),
    ("run.eta=-1", "eta >= 0"),
    ("rollout.group_size=1", "rollout.group_size must be >= 2"),
    ("rollout.max_new_tokens=0", "max_new_tokens >= 1"),
    ("toy.num_prompts=0", "num_prompts must be >= 1"),
    ("task.train_size=0", "train_size and difficulty"),
    ("rollout.max_new_tokens=300", "rollout.max_new_tokens = 300: with the longest prompt (8 tokens) it exceeds"),
    ("run.temperature=0.5", "unknown config key(s) run.temperature"),  # one temperature: rollout.temperature
])
def test_command_refuses_impossible_values_in_one_line(tmp_path, capsys, override, words):
    from elastic_moe.cli import main

    assert main(["async-rl", "--out", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elastic-moe async-rl: error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_command_refuses_the_reward_pool_under_ray_before_starting_anything(tmp_path, capsys):
    from elastic_moe.cli import main

    sets = ["init=" + str(tmp_path / "policy"), "run.backend=ray", "task.reward_pool_workers=2"]
    assert main(["async-rl", "--out", str(tmp_path / "run"), *[a for x in sets for a in ("--set", x)]]) == 2
    err = capsys.readouterr().err.strip()
    assert "task.reward_pool_workers > 0 needs run.backend" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_command_keeps_its_settings_notes_changes_and_refuses_another_model(tmp_path, capsys):
    from elastic_moe.cli import main
    from elastic_moe.tomlconfig import read_toml

    out = tmp_path / "run"
    assert main(["async-rl", "--out", str(out), "--set", "run.steps=1"]) == 0
    assert read_toml(out / "config.toml")["run"]["steps"] == 1
    report = (out / "report.md").read_text()
    assert "- steps: 1, 4 groups x" in report and "by staleness: 0: 16 (100%)" in report
    assert (out / "curve.png").is_file()
    capsys.readouterr()
    # the saved config.toml reproduces the run: given back with one change, the re-run resumes and names the change
    assert main(["async-rl", str(out / "config.toml"), "--out", str(out), "--set", "run.steps=2"]) == 0
    assert "note: settings changed since the last session: run.steps 1 -> 2" in capsys.readouterr().out
    saved = (out / "config.json").read_bytes()
    assert main(["async-rl", "--out", str(out), "--set", "run.steps=3", "--set", "toy.hidden_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run of another model (hidden_size 64 -> 32" in err and "\n" not in err
    assert (out / "config.json").read_bytes() == saved


def test_a_run_saved_with_the_old_trainer_temperature_resumes_when_it_equals_the_sampling_one(tmp_path, capsys):
    from elastic_moe.cli import main

    out = tmp_path / "run"
    assert main(["async-rl", "--out", str(out), "--set", "run.steps=1", "--set", "run.tensorboard=false"]) == 0
    toml = (out / "config.toml").read_text()
    (out / "config.toml").write_text(toml.replace("[run]\n", "[run]\ntemperature = 1.0\n", 1))
    assert main(["async-rl", "--out", str(out), "--max-steps", "2"]) == 0  # the same command's run, resumed
    assert "resuming from" in capsys.readouterr().out
    (out / "config.toml").write_text(toml.replace("[run]\n", "[run]\ntemperature = 0.5\n", 1))
    assert main(["async-rl", "--out", str(out), "--max-steps", "3"]) == 2
    assert "run.temperature is gone" in capsys.readouterr().err


def test_staleness_buffer_bound_and_eta0_is_synchronous():
    for eta in (0, 1, 2):
        N, steps = 2, 6
        buf = StalenessBuffer(N, eta, steps * N)
        version = 0
        started: dict[int, int] = {}
        while not buf.done:
            while buf.admissible(version):
                gid = buf.admit(version)
                started[gid] = version
            assert len(started) - len(buf.trained) <= (eta + 1) * N
            # deliver the newest admitted group first (a long tail on the oldest)
            pending = [g for g in started if g not in buf.ready and g not in buf.trained]
            if pending:
                g = max(pending)
                buf.put(Group(g, 0, [], start_version=started[g]))
            batch = buf.select(version)
            if batch is not None:
                assert all(version - started[g.gid] <= eta for g in batch)
                if eta == 0:
                    assert [g.gid for g in batch] == list(range(version * N, (version + 1) * N))
                version += 1
        assert sorted(buf.trained) == list(range(steps * N))


def test_partial_rollout_continues_under_new_weights():
    model = toy_model(TOY)

    class BumpingStore(WeightStore):  # publishes version 1 as soon as the worker first polls mid-rollout
        calls = 0

        def version(self):
            self.calls += 1
            if self.calls == 3:
                with torch.no_grad():
                    st = {k: v + 0.01 if v.is_floating_point() else v for k, v in snapshot(model).items()}
                self.publish(st, 1)
            return super().version()

    store = BumpingStore()
    store.publish(snapshot(model), 0)
    w = RolloutWorker(model, store, RolloutSettings(group_size=3, max_new_tokens=12, chunk_tokens=4), eos_id=-1)
    g = w.rollout(RolloutJob(0, 0, [5, 6, 7, 8], 12, seed=0))
    for s in g.samples:
        assert len(s.tokens) == len(s.logprobs) == len(s.versions) == 12
        assert s.versions[:4] == [0] * 4 and s.versions[-1] == 1
        assert s.min_version == 0
        for r in s.routes.values():
            assert r.shape[0] == len(s.prompt) + len(s.tokens)


def test_eta0_is_bit_identical_to_the_synchronous_loop():
    sync = controller(eta=0).run_sync()
    asyn = controller(eta=0).run()
    assert sync["trained_gids"] == asyn["trained_gids"]
    assert sync["losses"] == asyn["losses"]
    assert all(torch.equal(sync["params"][k], asyn["params"][k]) for k in sync["params"])
    assert asyn["staleness_hist"] == {"0": 3 * 2 * 4}


def test_async_respects_eta_and_reports_metrics(tmp_path):
    s = controller(out=tmp_path, eta=1, delay=0.01).run()
    assert s["trained_gids"] == list(range(6))
    assert max(int(k) for k in s["staleness_hist"]) <= 1
    row = s["rows"][-1]
    for k in ("samples_per_s", "trainer_idle_frac", "rollout_idle_frac", "staleness_hist", "reward_latency_s",
              "queue/pending_rewards", "queue/ready_groups"):
        assert k in row
    assert (tmp_path / "metrics.jsonl").is_file()


def test_a_kl_penalty_is_towards_the_initial_policy():
    rows = controller(grpo=GRPOConfig(mask_truncated=False, kl_coef=0.1, kl_kind="k2")).run()["rows"]
    kl = [r["loss/kl_ref"] for r in rows if "loss/kl_ref" in r]
    assert len(kl) == len(rows) == 3 and kl[0] == pytest.approx(0, abs=1e-9) and kl[-1] > 0  # drifts from step 2


def test_killed_workers_are_restarted_and_every_sample_is_trained_once():
    ctl = controller(eta=1, steps=4, delay=0.02)
    ctl.faults = [("rollout", 1), ("reward", 3)]
    s = ctl.run()
    assert s["trained_gids"] == list(range(8))  # none lost, none twice
    assert s["restarts"] == {"rollout": 1, "reward": 1}
    assert s["duplicates"] == 0
    assert sum(s["staleness_hist"].values()) == 8 * 4


@pytest.mark.parametrize("minibatches", [1, 2])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, minibatches):
    def grpo():  # minibatches > 1 shuffles the batch: the order must not come from the global RNG, never saved
        return GRPOConfig(mask_truncated=False, minibatches=minibatches)

    full = controller(eta=0, steps=4, grpo=grpo()).run()
    controller(out=tmp_path, eta=0, steps=2, grpo=grpo()).run()
    torch.manual_seed(123)  # a resumed process starts from another global RNG state
    resumed = controller(out=tmp_path, eta=0, steps=4, grpo=grpo()).run()
    assert resumed["start_step"] == 2
    assert resumed["trained_gids"] == list(range(4, 8))
    assert resumed["losses"] == full["losses"][2:]
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])


@pytest.mark.parametrize("mode", ["run", "run_sync"])
def test_a_signal_checkpoints_where_the_run_is_and_the_rerun_resumes(tmp_path, mode):
    """SIGINT/SIGTERM (a runloop.StopSignal's flag) after step 2 of 4, with no periodic checkpoints: the run saves
    step 2 and returns; run again, it ends where an uninterrupted run ends."""
    import types

    full = getattr(controller(eta=0, steps=4), mode)()
    ctl = controller(out=tmp_path, eta=0, steps=4)
    ctl.stop = types.SimpleNamespace(signum=None)
    lines = []

    def log(msg):
        lines.append(msg)
        if msg.startswith("step 2/4"):
            ctl.stop.signum = 2

    ctl.log = log
    s = getattr(ctl, mode)()
    assert s["stopped_by"] == 2 and s["interrupted"] and s["step"] == 2 and s["trained_gids"] == list(range(4))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
    assert any(x.startswith("stopped at step 2; checkpoint") for x in lines)
    resumed = getattr(controller(out=tmp_path, eta=0, steps=4), mode)()
    assert resumed["start_step"] == 2 and resumed["trained_gids"] == list(range(4, 8))
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])


def test_command_on_sigint_checkpoints_exits_130_and_resumes(tmp_path, capsys):
    import os
    import signal
    import threading
    import time

    from elastic_moe.cli import main
    from elastic_moe.metrics import read_metrics

    out = tmp_path / "run"

    def interrupt_after_two_steps():
        end = time.monotonic() + 60
        while len(read_metrics(out)) < 2 and time.monotonic() < end:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    # a process started in the background by a non-interactive shell inherits SIGINT ignored, and StopSignal
    # rightly leaves an ignored signal ignored: this test wants Python's default handling, wherever pytest runs
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_after_two_steps, daemon=True).start()
        code = main(["async-rl", "--out", str(out), "--set", "run.steps=200", "--set", "run.tensorboard=false"])
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130
    captured = capsys.readouterr()
    assert "received SIGINT: saving a checkpoint" in captured.err + captured.out
    assert "interrupted by SIGINT" in captured.err and "run the same command again to resume" in captured.err
    (ck,) = (out / "checkpoints").iterdir()
    step = int(ck.name.split("_")[1])
    assert step >= 2 and len(read_metrics(out)) == step  # the checkpoint and the metrics agree
    assert main(["async-rl", "--out", str(out), "--max-steps", str(step + 1)]) == 0
    assert f"resuming from {ck}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.ci_sample  # CI runs -m "not gpu and (not slow or ci_sample)"
def test_ray_ci_sample_kill_rollout_and_reward_actors(ray_cluster):
    ctl = controller(eta=1, steps=3, delay=0.05, backend="ray", rollout_workers=1, reward_workers=1, rollout_cpus=0.5,
                     reward_cpus=0.25, trainer_cpus=0.5)
    ctl.faults = [("rollout", 1), ("reward", 2)]
    s = ctl.run()
    assert s["trained_gids"] == list(range(6))
    assert s["restarts"] == {"rollout": 1, "reward": 1}
    assert s["duplicates"] == 0
    assert max(int(k) for k in s["staleness_hist"]) <= 1
    # workers asking for more CPUs than the cluster has would never be scheduled: refused instead of waiting forever
    from elastic_moe.errors import UserError

    with pytest.raises(UserError, match="ask for 3 CPUs .* the Ray cluster has 2"):
        controller(backend="ray", rollout_workers=2, reward_workers=2, rollout_cpus=0.5, reward_cpus=0.5,
                   trainer_cpus=1).run()


def test_agent_worker_runs_multi_turn_episodes_with_versioned_weights():
    from elastic_moe.async_rl.local import LocalHandle
    from elastic_moe.async_rl.workers import AgentWorker
    from elastic_moe.config import ModelConfig
    from elastic_moe.model import ElasticMoE
    from elastic_moe.tasks import get_suite
    from elastic_moe.tokenizer import Tokenizer

    tasks = get_suite("agent", "train", 2, seed=0)
    tok = Tokenizer.train([m["content"] for t in tasks for m in t.demonstration()], vocab_size=300)
    torch.manual_seed(0)
    model = ElasticMoE(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4, moe_k=2,
                                   moe_intermediate_size=32, moe_layer_start_index=0, max_position_embeddings=2048))
    store = WeightStore()
    store.publish(snapshot(model), 3)
    h = LocalHandle("agent0", AgentWorker, model, store, tok, tasks, 8, 2)
    ep = h.submit("episode", 0, 0).result()
    h.stop()
    assert ep["versions"] and set(ep["versions"]) == {3}
    assert ep["messages"][-1]["role"] in ("assistant", "tool") and 1 <= ep["turns"] <= 2
    assert ep["reward"] is not None


def test_command_trains_on_a_task_suite_with_the_reward_pool_and_resumes(tmp_path):
    import argparse
    import json

    from helpers import tiny_config

    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.commands import async_rl as cmd
    from elastic_moe.model import ElasticMoE
    from elastic_moe.tasks import get_mixed_suite
    from elastic_moe.tokenizer import Tokenizer

    texts = [t.demonstration()[-1]["content"] + t.prompt() for t in get_mixed_suite("train", 40, seed=9)]
    Tokenizer.train(texts, vocab_size=400).save(tmp_path / "tok")
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config(vocab_size=400, max_position_embeddings=1024))
    init = save_checkpoint(tmp_path / "init", model, meta={"step": 0}, tokenizer_dir=tmp_path / "tok")
    sets = [f"init={init}", "task.train_size=8", "task.reward_pool_workers=1", "run.groups_per_step=2",
            "run.reward_workers=2", "rollout.max_new_tokens=6", "rollout.chunk_tokens=3", "rollout.group_size=2"]
    out = tmp_path / "run"
    def args(sets, **kw):
        return argparse.Namespace(config=None, out=str(out), set=sets, init=None, max_steps=None, **kw)

    assert cmd.run(args([*sets, "run.steps=1"])) == 0
    assert cmd.run(args([*sets, "run.steps=2"])) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the whole run's steps and groups, this session's start
    assert summary["start_step"] == 1 and summary["session_steps"] == 1 and summary["steps"] == 2
    assert summary["trained_gids"] == [0, 1, 2, 3]
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if line]) == 2
    # a finished run run again with --out alone (its config.toml, not the toy defaults) trains nothing, keeps its summary
    before = (out / "summary.json").read_bytes()
    assert cmd.run(argparse.Namespace(config=None, out=str(out), set=[], init=None, max_steps=None)) == 0
    assert (out / "summary.json").read_bytes() == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
@pytest.mark.parametrize("mode", ["run", "run_sync"])
def test_a_nan_or_infinite_reward_drops_its_group_only(mode, bad):
    """Non-finite rewards count as infrastructure failures (None): NaN once stalled the async loop (its 'not
    scored yet' mark), and one infinite reward made the whole step's loss non-finite."""
    share = TokenShareReward(TOY.vocab_size)

    def reward(task_index, tokens):
        return bad if task_index % 3 == 0 and tokens[0] % 2 == 0 else share(task_index, tokens)

    ctl = controller(eta=0, steps=3)
    ctl.reward_fn = reward
    s = getattr(ctl, mode)()
    assert s["steps"] == 3
    assert sum(r.get("groups/dropped_infra", 0) for r in s["rows"]) > 0
    assert not any(r.get("nonfinite_skip") for r in s["rows"])
    assert sum(r.get("samples/trained", 0) for r in s["rows"]) > 0


def test_sync_rollout_idle_counts_each_workers_own_time():
    s = controller(eta=0, steps=3, groups_per_step=4, rollout_workers=2, reward_workers=1).run_sync()
    assert s["rollout_idle_frac"] < 0.5  # the phase's wall time counted once over 2 workers gave >= 0.5


def test_an_error_during_a_checkpointing_step_keeps_that_steps_metrics_row(tmp_path, monkeypatch):
    import threading
    import time

    from elastic_moe.async_rl import workers
    from elastic_moe.metrics import read_metrics

    in_step, step = threading.Event(), workers.TrainerWorker.step

    def slow_step(self, groups, save_to=None, meta=None):
        in_step.set()
        time.sleep(0.3)
        return step(self, groups, save_to, meta)

    share, failed = TokenShareReward(TOY.vocab_size), []

    def reward(task_index, tokens):
        if in_step.is_set() and not failed:
            failed.append(1)
            raise ValueError("verifier bug")
        return share(task_index, tokens)

    monkeypatch.setattr(workers.TrainerWorker, "step", slow_step)
    ctl = controller(out=tmp_path, eta=1, steps=4, save_every=1)
    ctl.reward_fn = reward
    with pytest.raises(ValueError, match="verifier bug"):
        ctl.run()
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").iterdir())
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, saved[-1] + 1))


@pytest.mark.parametrize("mode", ["run", "run_sync"])
def test_an_error_or_interrupt_stops_every_worker_thread(mode):
    """Ctrl-C (or any error) in the controller: no worker thread outlives the run (one still inside torch at
    interpreter exit aborts the process: 'terminate called without an active exception')."""
    import threading

    def reward(task_index, tokens):
        raise KeyboardInterrupt

    ctl = controller()
    ctl.reward_fn = reward
    with pytest.raises(KeyboardInterrupt):
        getattr(ctl, mode)()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("async-rl-")]


def short_controller(out=None, **kw) -> Controller:
    run = dict(steps=2, groups_per_step=2, eta=0, lr=1e-3, rollout_workers=1, reward_workers=1)
    run.update(kw)
    return Controller(RunConfig(**run), toy_model(TOY), toy_prompts(TOY, 12, 0), TokenShareReward(TOY.vocab_size),
                      RolloutSettings(group_size=2, max_new_tokens=4, chunk_tokens=2), GRPOConfig(mask_truncated=False),
                      eos_id=2, out_dir=out)


def test_a_resume_with_another_groups_per_step_or_seed_is_refused_by_the_command(tmp_path, capsys):
    """Group g is trained at step g // groups_per_step, in an order seeded by run.seed: resumed with another
    groups_per_step the run trained groups 4 and 5 a second time (and with another seed, other prompts)."""
    from elastic_moe.cli import main

    out = tmp_path / "run"
    assert main(["async-rl", "--out", str(out), "--set", "run.steps=2", "--set", "run.tensorboard=false"]) == 0
    saved = {p: (out / p).read_bytes() for p in ("config.json", "config.toml", "metrics.jsonl")}
    capsys.readouterr()
    for change, words in (("run.groups_per_step=2", "run.groups_per_step 4 -> 2"), ("run.seed=1", "run.seed 0 -> 1")):
        assert main(["async-rl", "--out", str(out), "--set", "run.steps=3", "--set", change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("elastic-moe async-rl: error: ") and words in err and "\n" not in err, err
        assert {p: (out / p).read_bytes() for p in saved} == saved  # nothing rewritten
    assert main(["async-rl", "--out", str(out), "--set", "run.steps=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_gids"] == list(range(12))


def test_a_resume_with_another_groups_per_step_is_refused_by_the_controller(tmp_path):
    short_controller(out=tmp_path, steps=2, groups_per_step=2).run()
    with pytest.raises(UserError, match=r"run.groups_per_step 2 -> 1"):
        short_controller(out=tmp_path, steps=4, groups_per_step=1).run()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("async-rl-")]
    resumed = controller(out=tmp_path, steps=3, groups_per_step=2).run()
    assert resumed["start_step"] == 2 and resumed["trained_gids"] == [4, 5]


@pytest.mark.parametrize("vocab", [3, 4])
def test_a_toy_vocabulary_without_room_for_prompt_tokens_is_refused_in_one_line(tmp_path, capsys, vocab):
    from elastic_moe.cli import main

    assert main(["async-rl", "--out", str(tmp_path / "run"), "--set", f"toy.vocab_size={vocab}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elastic-moe async-rl: error: ") and "toy.vocab_size" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_reward_pool_is_closed_when_the_command_stops_before_training(tmp_path, capsys, monkeypatch):
    """A refusal after the pool was started (here: a damaged config.json) left its worker processes running."""

    from elastic_moe import reward_pool
    from elastic_moe.cli import main

    pools = []

    class Pool:
        def __init__(self, *args, **kwargs):
            self.closed = False
            pools.append(self)

        def close(self, wait: bool = True) -> None:
            self.closed = True

    monkeypatch.setattr(reward_pool, "RewardPool", Pool)
    init = policy_checkpoint(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(b"\xff{")
    sets = [f"init={init}", "task.train_size=2", "task.reward_pool_workers=1"]
    assert main(["async-rl", "--out", str(out), *[a for x in sets for a in ("--set", x)]]) == 2
    assert "config.json is corrupt" in capsys.readouterr().err
    assert all(p.closed for p in pools)


@pytest.mark.slow  # a Ray cluster takes half a minute to start here
def test_ray_the_weight_store_actor_goes_with_the_run(ray_cluster):
    """The workers' actors were killed at the end of a run, the weight store's was not: it stayed alive, holding the
    last weights in the object store, in every later run of the same process."""
    from ray.exceptions import RayActorError

    ctl = short_controller(steps=1, backend="ray", rollout_cpus=0.25, reward_cpus=0.25, trainer_cpus=0.5)
    assert ctl.run()["trained_gids"] == [0, 1]
    with pytest.raises(RayActorError):
        ray_cluster.get(ctl.weights.actor.version.remote(), timeout=60)


@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("threads", [-1, 0])
def test_async_rl_thread_count_below_one_gets_one_message_that_names_the_allowed_range(backend, threads):
    # it used to say "must be in [0, ...] (0: torch's default)" for -1 and then "threads >= 1" for 0
    with pytest.raises(UserError) as e:
        RunConfig(backend=backend, threads=threads).validate()
    msg = str(e.value)
    assert f"run.threads = {threads}" in msg and "torch's default" not in msg
    assert (f"[1, {4 * (os.cpu_count() or 1)}]" if backend == "local" else ">= 1") in msg
    RunConfig(backend=backend, threads=1).validate()


def test_a_stop_during_a_trainer_step_hands_out_no_more_rollouts_or_verifications(tmp_path, monkeypatch):
    """A signal while the trainer works: the controller waits for that step (its checkpoint is kept), but hands no
    further job to the rollout and reward workers: the stop drops their results, and would have to wait out each
    slow verification it started (a Python thread cannot be interrupted)."""
    import time
    import types

    from elastic_moe.async_rl import local, workers
    from elastic_moe.async_rl.controller import Controller, RunConfig
    from elastic_moe.async_rl.toy import TokenShareReward, ToyConfig, toy_model, toy_prompts
    from elastic_moe.async_rl.workers import RolloutSettings

    toy = ToyConfig(hidden_size=32, vocab_size=48, prompt_len=6)
    real_submit, real_step, handed_out, signalled = local.LocalHandle.submit, workers.TrainerWorker.step, [], []

    def submit(self, method, *args):
        if method in ("rollout", "score"):
            handed_out.append(time.monotonic())
        return real_submit(self, method, *args)

    def step(self, groups, save_to=None, meta=None):
        if groups[0].gid == 2:  # step 2: SIGINT arrives while the trainer is at it
            ctl.stop.signum = 2
            signalled.append(time.monotonic())
            time.sleep(1.5)
        return real_step(self, groups, save_to, meta)

    monkeypatch.setattr(local.LocalHandle, "submit", submit)
    monkeypatch.setattr(workers.TrainerWorker, "step", step)
    ctl = Controller(RunConfig(steps=6, groups_per_step=2, eta=1, lr=1e-3, rollout_workers=2, reward_workers=2),
                     toy_model(toy), toy_prompts(toy, 12, 0), TokenShareReward(toy.vocab_size, 0.1),
                     RolloutSettings(group_size=4, max_new_tokens=12, chunk_tokens=4), GRPOConfig(mask_truncated=False),
                     eos_id=2, out_dir=tmp_path)
    ctl.stop = types.SimpleNamespace(signum=None)
    s = ctl.run()
    assert s["stopped_by"] == 2 and s["step"] == 2 and s["interrupted"]
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()
    assert not [round(t - signalled[0], 2) for t in handed_out if t > signalled[0] + 0.1]


def _bare_controller(eta: int) -> Controller:
    ctl = Controller.__new__(Controller)  # _record needs only this bookkeeping, no workers
    ctl.cfg, ctl.rs, ctl.stats, ctl.rows, ctl.sink, ctl.mode = RunConfig(eta=eta), RolloutSettings(), Stats(), [], \
        None, "async"
    return ctl


def _partial_group():
    """One sample whose first tokens came from version 0 and the rest (a partial rollout) from version 1."""
    s = GroupSample([1, 2], [5, 6, 7, 8], [0.0] * 4, [0, 0, 1, 1], "length")
    return Group(0, 0, [s], rewards=[1.0], start_version=0)


def test_a_partial_rollouts_staleness_is_that_of_its_oldest_token():
    """Catches counting a sample's lag from its newest token (max(versions)) instead of its oldest (min_version):
    the staleness histogram and the eta bound are about the oldest token a sample holds."""
    ctl = _bare_controller(eta=2)
    row = ctl._record(2, [_partial_group()], {}, time.perf_counter() - 1.0, {})
    assert row["staleness_hist"] == {"2": 1}
    assert dict(ctl.stats.token_staleness) == {2: 2, 1: 2}
    with pytest.raises(AssertionError, match="staleness bound violated"):
        _bare_controller(eta=1)._record(2, [_partial_group()], {}, time.perf_counter() - 1.0, {})


def test_each_epoch_of_the_prompt_stream_is_a_fresh_shuffle():
    """Catches seeding every epoch's shuffle alike (`mix(seed, 0)`): group g's task is from a per-epoch permutation of
    the prompts; every epoch covers each prompt once, in an order of its own."""
    ctl = _bare_controller(eta=1)
    ctl.prompts = [[i] for i in range(20)]
    epochs = [[ctl._order(g) for g in range(e * 20, (e + 1) * 20)] for e in range(3)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


WORKER_TOY = ToyConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, moe_num_experts=4, moe_k=2, prompt_len=4)


def test_groups_of_the_same_prompt_draw_different_samples():
    """A group's samples are seeded by (seed, group, chunk): two groups of the same prompt (a prompt seen again in
    a later epoch, or a retried group under another gid) do not repeat each other's samples."""
    model = toy_model(WORKER_TOY)
    store = WeightStore()
    store.publish(snapshot(model), 0)
    w = RolloutWorker(model, store, RolloutSettings(group_size=2, max_new_tokens=8, chunk_tokens=4), eos_id=-1)
    prompt = [5, 6, 7, 8]
    a = w.rollout(RolloutJob(0, 0, prompt, 8, seed=0))
    b = w.rollout(RolloutJob(1, 0, prompt, 8, seed=0))
    again = w.rollout(RolloutJob(0, 0, prompt, 8, seed=0))
    assert [s.tokens for s in again.samples] == [s.tokens for s in a.samples]  # deterministic per group
    assert [s.tokens for s in a.samples] != [s.tokens for s in b.samples]


def test_the_trainer_measures_a_partial_rollouts_staleness_from_its_oldest_token():
    """TrainerWorker.step hands each sample to the trainer with its oldest token's version: a partial rollout
    begun at version 0 and finished at version 1, trained at version 1, has a lag of 1, not 0."""
    model = toy_model(WORKER_TOY)
    store = WeightStore()
    tw = TrainerWorker(model, store, GRPOConfig(), lr=1e-3, temperature=1.0, version=1)
    samples = [GroupSample([5, 6], [9, 10, 11, 12], [-1.0] * 4, [0, 0, 1, 1], "length"),
               GroupSample([5, 6], [13, 14, 15, 16], [-1.0] * 4, [1, 1, 1, 1], "length")]
    m = tw.step([Group(0, 0, samples, rewards=[1.0, 0.0], start_version=0)])
    assert m["staleness/max_lag"] == 1 and m["staleness/mean_lag"] == 0.5
