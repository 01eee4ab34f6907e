"""What every training loop here shares (pre-training, SFT, GRPO, OPD, asynchronous RL): stopping on a signal
with a checkpoint, RNG state for exact resumes, which checkpoints are kept, and what a resumed run says."""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from elastic_moe.checkpoint import CorruptCheckpoint, find_checkpoint
from elastic_moe.errors import Interrupted


class StopSignal:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop after the current step; a second one interrupts."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # a signal the process ignores stays ignored
                    self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise Interrupted("a second signal: stopped without a checkpoint", signum)
        self.signum = signum
        tqdm.write(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
                   "(again to abort without one)")

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    if "cuda" in state and torch.cuda.is_available():  # one state per GPU of the saving machine: as many as are here
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def latest_checkpoint(out: Path) -> Path | None:
    ck = out / "checkpoints"
    if not ck.is_dir() or not any(p.name.startswith("step_") for p in ck.iterdir()):
        return None
    return find_checkpoint(out)


@contextlib.contextmanager
def resuming_from(ckpt: Path):
    """Around reading a run's latest checkpoint to resume: a corrupt one names the earlier one to go back to."""
    try:
        yield
    except CorruptCheckpoint as e:
        earlier = sorted(p for p in ckpt.parent.glob("step_*") if p.name < ckpt.name and (p / "config.json").is_file())
        if not earlier:
            raise
        raise CorruptCheckpoint(f"{e}; to resume from the one before ({earlier[-1].name}), remove {ckpt}") from None


def prune_checkpoints(out: Path, keep: int) -> None:
    ck = out / "checkpoints"
    steps = sorted(p for p in ck.iterdir() if p.name.startswith("step_"))
    complete = [p for p in steps if (p / "config.json").is_file()]
    if complete:  # a damaged folder numbered past the latest checkpoint must not push it out of the kept ones
        steps = [p for p in steps if p <= complete[-1]]
    for p in steps[:-keep]:
        if (p / "family" / "family.jsonl").is_file():  # a measured sub-model family (`elastic-moe family`) stays
            continue
        shutil.rmtree(p, ignore_errors=True)
    for p in ck.iterdir():  # torn temporaries of a killed save
        if p.name.startswith(".step_"):
            shutil.rmtree(p, ignore_errors=True)


def raise_if_stopped(summary: dict) -> None:
    """A run that a signal stopped, or that a signal reached during its last step, ends its command (and a pipeline
    around it) as an interruption: `Interrupted`, exit 128 + the signal, once its checkpoint is written."""
    signum = summary.get("stopped_by")
    if signum:
        if not summary["interrupted"]:
            raise Interrupted("the run had finished", signum)
        if "checkpoint" in summary and not summary["checkpoint"]:
            raise Interrupted(f"stopped at step {summary['step']}, before the first checkpoint", signum)
        raise Interrupted(f"stopped at step {summary['step']} with a checkpoint; run the same command again to resume",
                          signum)


def save_or_stop(step: int, max_steps: int, save_every: int, stop: StopSignal, save: Callable[[], Path],
                 last: Path | None, say: Callable[[str], None]) -> tuple[Path | None, bool]:
    """The end of a post-training loop's step: checkpoint at the end, every `save_every` steps and when a signal
    arrived; returns (the last checkpoint, whether to stop now)."""
    if step == max_steps or stop.signum is not None or (save_every and step % save_every == 0):
        last = save()
    if stop.signum is not None and step < max_steps:
        say(f"stopped at step {step}; checkpoint {last}; run the same command again to resume")
    return last, stop.signum is not None


def resume_or_seed(state: dict | None, out: Path, ckpt: Path | None, max_steps: int, seed: int,
                   say: Callable[[str], None]) -> None:
    """A post-training loop's start: a resumed one gets its RNG state back and says where it resumed (and whether
    anything is left to train); a fresh one is seeded."""
    if state is None:
        torch.manual_seed(seed)
        return
    set_rng_state(state["rng"])
    say(f"resuming {out} from step {state['step']} ({ckpt.name})")
    say_if_finished(state["step"], max_steps, say)


def say_if_finished(step: int, max_steps: int, say: Callable[[str], None]) -> None:
    """A resumed run that has nothing left to train says so (rather than only reporting `done` at once)."""
    if step >= max_steps:
        say(f"the run is already at step {step}, at or past max_steps {max_steps}: nothing to train "
            "(a larger --max-steps trains on)")


def stopped_note(step: int, max_steps: int) -> str:
    """The line a stopped run's report opens its findings with (the report covers the steps so far)."""
    return (f"**Stopped at step {step} of {max_steps}** by a signal: run the same command again to resume; this "
            "report covers the steps so far.")
