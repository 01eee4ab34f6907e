"""Supervised fine-tuning on task demonstrations: stage 1 of post-training (`elastic-moe sft`).

    cfg = load_config(SFTConfig, "configs/sft.toml", ["init=runs/tiny"])
    summary = train_sft(cfg, "runs/sft")        # resumes from runs/sft/checkpoints/ when there is one

Examples are the demonstrations (`Task.demonstration()`: prompt + a correct assistant reply, with tool turns for
agent tasks) of the train split of every listed domain and difficulty, mixed and shuffled per epoch. The loss is
the token cross-entropy on assistant tokens only (`Tokenizer.encode_chat_with_mask`: assistant content and the
`</s>` that closes it), averaged over those tokens in the batch. An example longer than `data.max_len` (or than
the model's context) is skipped and counted, never cut (a cut demonstration teaches an answer without its end). The
batch order is a pure function of the step, so a resumed run sees the same batches as an uninterrupted one.

RUN_DIR/ holds config.toml/json, tokenizer/, metrics.jsonl, tb/, checkpoints/step_XXXXXXXX/ (model + trainer.pt with
the optimizer, step and RNG), report.md at the end: the layout of pre-training.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from elastic_moe import ops
from elastic_moe.atomic import atomic_write_json, atomic_write_text
from elastic_moe.checkpoint import TRAINER_STATE, load_optimizer_state, save_checkpoint, torch_state
from elastic_moe.errors import UserError, require, threads_check
from elastic_moe.model import ElasticMoE
from elastic_moe.runloop import resume_or_seed, save_or_stop, stopped_note
from elastic_moe.schedule import epoch_slice, lr_at
from elastic_moe.tokenizer import Tokenizer
from elastic_moe.tomlconfig import note_changed_settings
from elastic_moe.train import OptimConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sft.toml"
IGNORE = -100


@dataclass
class SFTDataConfig:
    domains: list[str] = field(default_factory=lambda: ["reasoning", "code", "agent", "open_ended"])
    difficulties: list[int] = field(default_factory=lambda: [1])
    n_per_domain: int = 1000  # train-split demonstrations per (domain, difficulty)
    heldout_per_domain: int = 32  # test-split demonstrations per domain for the held-out loss
    seed: int = 0
    max_len: int = 512  # tokens; longer examples are skipped (counted)
    families: list[str] = field(default_factory=list)  # only these task families (e.g. ["arith"]); empty: all


@dataclass
class SFTLoopConfig:
    max_steps: int = 500
    batch_size: int = 32
    seed: int = 0
    threads: int = 0
    log_every: int = 1
    eval_every: int = 100  # held-out loss (and accuracy); 0: only at the end
    accuracy_n: int = 32  # greedy test accuracy on this many tasks per single-turn domain at each eval; 0: off
    accuracy_max_new_tokens: int = 96
    save_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # consecutive non-finite losses or gradients before the run stops
    progress: bool = True
    tensorboard: bool = True


@dataclass
class SFTConfig:
    init: str = ""  # the pre-trained checkpoint (or run directory) to start from
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0))
    train: SFTLoopConfig = field(default_factory=SFTLoopConfig)

    def validate(self) -> None:
        from elastic_moe.tasks import DIFFICULTIES, DOMAINS

        d, t = self.data, self.train
        bad = [x for x in d.domains if x not in DOMAINS]
        checks = [
            (bool(d.domains) and not bad, f"data.domains: unknown {bad} (known: {', '.join(DOMAINS)})"),
            (bool(d.difficulties) and all(x in DIFFICULTIES for x in d.difficulties),
             f"data.difficulties must be among {DIFFICULTIES}"),
            (d.n_per_domain >= 1 and d.heldout_per_domain >= 0, "data.n_per_domain >= 1, heldout_per_domain >= 0"),
            (d.max_len >= 2, "data.max_len must be >= 2"),
            (t.max_steps >= 0 and t.batch_size >= 1, "train.max_steps >= 0, batch_size >= 1"),
            (t.eval_every >= 0 and t.save_every >= 0 and t.log_every >= 1 and t.keep_checkpoints >= 1,
             "train: eval_every/save_every >= 0, log_every/keep_checkpoints >= 1"),
            threads_check(t.threads, "train.threads"),
            (t.accuracy_n >= 0 and t.max_bad_steps >= 0, "train: accuracy_n and max_bad_steps must be >= 0"),
            (t.accuracy_max_new_tokens >= 1, "train.accuracy_max_new_tokens must be >= 1"),
        ]
        self.optim.validate()
        require(checks)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class Examples:
    ids: list[list[int]]
    masks: list[list[int]]
    domains: list[str]
    skipped: int  # longer than max_len


def build_examples(tok: Tokenizer, tasks: list, max_len: int) -> Examples:
    ex = Examples([], [], [], 0)
    for task in tasks:
        ids, mask = tok.encode_chat_with_mask(task.demonstration())
        if len(ids) > max_len:
            ex.skipped += 1
            continue
        ex.ids.append(ids)
        ex.masks.append(mask)
        ex.domains.append(task.domain)
    return ex


def make_batch(ex: Examples, rows: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) right-padded: y[t] = ids[t + 1] where that token is an assistant token, else IGNORE."""
    S = max(len(ex.ids[r]) for r in rows) - 1
    x = torch.full((len(rows), S), pad_id, dtype=torch.long)
    y = torch.full((len(rows), S), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        ids = torch.tensor(ex.ids[r])
        m = torch.tensor(ex.masks[r][1:], dtype=torch.bool)
        n = len(ids) - 1
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(m, ids[1:], IGNORE)
    return x, y


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The example indices of step `step` (a pure function of the step: resume needs no sampler state)."""
    return epoch_slice(step, batch_size, n, f"sft/{seed}")


def sft_loss(model: ElasticMoE, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the assistant tokens of the batch, and their number. The LM head runs only on the
    positions that predict an assistant token (most of a chat sequence is prompt)."""
    hidden = model(x, track_load=model.training, return_logits=False).hidden
    keep = y != IGNORE
    n = int(keep.sum())
    bias = None if model.lm_head is None else model.lm_head.bias
    logits = ops.linear(hidden[keep], model.head_weight(), bias, model.numerics)
    loss = F.cross_entropy(logits.float(), y[keep], reduction="sum")
    return loss / max(n, 1), n


@torch.no_grad()
def heldout_loss(model: ElasticMoE, ex: Examples, pad_id: int, batch_size: int) -> dict[str, float]:
    """Held-out assistant-token loss per domain and overall."""
    was = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    for c in range(0, len(ex.ids), batch_size):
        rows = list(range(c, min(c + batch_size, len(ex.ids))))
        x, y = make_batch(ex, rows, pad_id)
        logits = model(x, track_load=False).logits.float()
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none").view(y.shape)
        for b, r in enumerate(rows):
            s = sums.setdefault(ex.domains[r], [0.0, 0.0])
            s[0] += float(ce[b].sum())
            s[1] += float((y[b] != IGNORE).sum())
    model.train(was)
    out = {f"eval/{d}/loss": s[0] / max(s[1], 1) for d, s in sums.items()}
    tot = [sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values())]
    if tot[1]:
        out["eval/all/loss"] = tot[0] / tot[1]
    return out


# ------------------------------------------------------------------------------------------------------ loop


def train_sft(cfg: SFTConfig, out_dir: str | Path, log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune (or resume) the run in `out_dir` on demonstrations; returns a summary dict."""
    from elastic_moe.atomic import run_lock

    with run_lock(out_dir):
        return _train_sft(cfg, out_dir, log)


def _train_sft(cfg: SFTConfig, out_dir: str | Path, log: Callable[[str], None] | None = None) -> dict:
    from elastic_moe.checkpoint import load_policy
    from elastic_moe.metrics import MetricsSink, read_metrics, recent_mean
    from elastic_moe.rollout import evaluate_accuracy
    from elastic_moe.runloop import StopSignal, latest_checkpoint, prune_checkpoints, resuming_from, rng_state
    from elastic_moe.tasks import get_suite
    from elastic_moe.train import dump_toml, make_optimizer

    cfg.validate()
    say = log or tqdm.write
    out = Path(out_dir)
    tc, dc, o = cfg.train, cfg.data, cfg.optim
    if tc.threads:
        torch.set_num_threads(tc.threads)
    ckpt = latest_checkpoint(out)
    state = None
    if ckpt is not None:
        with resuming_from(ckpt):
            model, tok, _ = load_policy(ckpt)
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    else:
        if not cfg.init:
            raise UserError("no init checkpoint: set init = \"RUN_DIR_OF_PRETRAINING\" in the config or pass --init")
        model, tok, _ = load_policy(cfg.init)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.cfg.vocab_size}")
    train_tasks, test_tasks, acc_tasks = [], [], {}
    for d in dc.domains:
        for k in dc.difficulties:
            train_tasks += get_suite(d, "train", dc.n_per_domain, dc.seed, k, dc.families)
        if dc.heldout_per_domain:
            test_tasks += get_suite(d, "test", dc.heldout_per_domain, dc.seed, dc.difficulties[0], dc.families)
        if tc.accuracy_n and d != "agent":  # agent tasks need the multi-turn driver
            acc_tasks[d] = get_suite(d, "test", tc.accuracy_n, dc.seed + 1, dc.difficulties[0], dc.families)
    # a demonstration the model's context cannot hold is skipped too (its last token is only a target)
    max_len = min(dc.max_len, model.cfg.max_position_embeddings + 1)
    ex = build_examples(tok, train_tasks, max_len)
    held = build_examples(tok, test_tasks, max_len)
    if not ex.ids:
        raise UserError(f"no demonstration fits data.max_len = {dc.max_len} and the model's context of "
                        f"{model.cfg.max_position_embeddings} tokens")
    # the run's settings are written only once they have been found usable: a refused run leaves no config.toml
    # that a plain re-run would pick up
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(cfg.to_dict()))
    note_changed_settings(out, data, say)
    atomic_write_json(out / "config.json", data)
    atomic_write_text(out / "config.toml", dump_toml(data))
    tok.save_if_missing(out / "tokenizer")

    n_tok = sum(sum(m) for m in ex.masks)
    say(f"SFT data: {len(ex.ids)} demonstrations ({n_tok:,} assistant tokens) from {', '.join(dc.domains)}; "
        f"{ex.skipped} skipped as longer than {max_len} tokens; {len(held.ids)} held out")

    model.train()
    optimizer = make_optimizer(model, o, torch.device("cpu"))
    schedule = o.schedule_steps or max(tc.max_steps, 1)
    step, elapsed, tokens, skipped_steps = 0, 0.0, 0, 0
    if state is not None:
        load_optimizer_state(optimizer, state["optimizer"])
        step, elapsed, tokens = state["step"], state["elapsed_s"], state["tokens"]
        skipped_steps = state.get("skipped_steps", 0)  # checkpoints from before the count was saved: 0
    resume_or_seed(state, out, ckpt, tc.max_steps, tc.seed, say)

    def save() -> Path:
        path = out / "checkpoints" / f"step_{step:08d}"
        st = {"optimizer": optimizer.state_dict(), "rng": rng_state(), "step": step, "elapsed_s": elapsed,
              "tokens": tokens, "skipped_steps": skipped_steps}
        save_checkpoint(path, model, meta={"step": step, "stage": "sft"}, tokenizer_dir=out / "tokenizer",
                        extra={TRAINER_STATE: torch_state(st)})
        prune_checkpoints(out, tc.keep_checkpoints)
        return path

    def evaluate() -> dict[str, float]:
        res = heldout_loss(model, held, tok.pad_id, tc.batch_size) if held.ids else {}
        for d, tasks in acc_tasks.items():
            a = evaluate_accuracy(model, tok, tasks, tc.accuracy_max_new_tokens)
            res[f"eval/{d}/accuracy"] = a["accuracy"]
        return res

    sink = MetricsSink(out, step, tc.tensorboard)
    stop = StopSignal()
    bar = tqdm(total=tc.max_steps, initial=step, unit="step", disable=not tc.progress, dynamic_ncols=True)
    last_ckpt, bad, last_eval = ckpt, 0, {}
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, o.lr, o.warmup_steps, schedule, o.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = make_batch(ex, batch_rows(step, tc.batch_size, len(ex.ids), dc.seed), tok.pad_id)
            loss, n = sft_loss(model, x, y)
            ok = bool(torch.isfinite(loss))
            gn = float("nan")
            if ok:
                loss.backward()
                gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or float("inf")))
                ok = math.isfinite(gn)
            if ok:
                optimizer.step()
                bad = 0
            else:
                bad += 1
                skipped_steps += 1
                say(f"step {step + 1}: non-finite loss or gradient, update skipped ({bad} in a row)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += n
            dt = time.perf_counter() - t0
            elapsed += dt
            row = {"step": step, "tokens": tokens, "lr": lr, "loss": float(loss.detach()), "grad_norm": gn,
                   "tokens_per_s": n / dt, "step_s": dt, "elapsed_s": elapsed, "skipped_steps": skipped_steps}
            final = step == tc.max_steps
            if final or (tc.eval_every and step % tc.eval_every == 0):
                t_e = time.perf_counter()
                last_eval = evaluate()
                row.update(last_eval)
                elapsed += time.perf_counter() - t_e
                say(f"step {step}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in last_eval.items()))
            if step % tc.log_every == 0 or final or last_eval.keys() & row.keys():
                sink.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            if bad > tc.max_bad_steps:
                last_ckpt = save()  # the weights are those of the last good step: updates were skipped
                raise UserError(f"stopped after {bad} non-finite steps in a row; last checkpoint: {last_ckpt}")
            last_ckpt, stopping = save_or_stop(step, tc.max_steps, tc.save_every, stop, save, last_ckpt, say)
            if stopping:
                break
    finally:
        bar.close()
        stop.restore()
        sink.close()
    # from the whole run's metrics, so that a resumed (or finished and re-run) run reports all of its steps
    rows = read_metrics(out)
    if not last_eval:
        last_eval = next(({k: v for k, v in r.items() if k.startswith("eval/")} for r in reversed(rows)
                          if any(k.startswith("eval/") for k in r)), {})
    summary = {"run_dir": str(out), "step": step, "max_steps": tc.max_steps, "tokens": tokens, "elapsed_s": elapsed,
               "interrupted": step < tc.max_steps, "stopped_by": stop.signum, "checkpoint": str(last_ckpt) if last_ckpt else None,
               "final_loss": recent_mean(rows)[0], "loss_window": recent_mean(rows)[1], "eval": last_eval,
               "examples": len(ex.ids), "skipped_examples": ex.skipped}
    if rows or not summary["interrupted"]:  # a stopped run gets its report so far; the same command resumes and rewrites it
        summary["report"] = str(write_sft_report(out, rows, summary))
    if not summary["interrupted"]:
        say(f"done: {step} steps in {elapsed:.0f} s; report {summary['report']}")
    return summary


def write_sft_report(out: Path, rows: list[dict], summary: dict) -> Path:
    from elastic_moe.metrics import plot_losses

    has_plot = plot_losses(rows, out / "loss.png")
    lines = ["# SFT report", "", f"- run: `{out}`",
             f"- steps: {summary['step']}, assistant tokens: {summary['tokens']:,}, wall time {summary['elapsed_s']:.0f} s",
             f"- demonstrations: {summary['examples']} ({summary['skipped_examples']} skipped as too long)",
             f"- final training loss (mean of the last {summary['loss_window']} steps): {summary['final_loss']:.4f}",
             ""]
    if summary["interrupted"]:
        lines += [stopped_note(summary["step"], summary["max_steps"]), ""]
    if summary["eval"]:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k.removeprefix('eval/')} | {v:.4f} |" for k, v in sorted(summary["eval"].items())]
        lines.append("")
    if has_plot:
        lines += ["![loss](loss.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
