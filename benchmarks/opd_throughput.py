"""On-policy distillation step: elastic-moe's OPDTrainer against TRL's GKDTrainer (lmbda=1, beta=1: reverse KL on
student samples), same student, teacher, prompts, lengths and dtype, side by side on the CPU.

One step = the student samples one completion of `--new` tokens per prompt (temperature 1, no early stop), the
teacher scores every completion token, and one optimizer step on the per-token reverse KL(student || teacher) over
the full vocabulary. Ours: RolloutEngine.rollout + OPDTrainer.step (chunked exact KL) + weight sync. TRL:
GKDTrainer.train() on the same chat prompts; a callback times every optimizer step. Medians over --steps steps after
one warm-up step, the two trainers interleaved in rounds so both see the same machine load.

    .venv/bin/python benchmarks/opd_throughput.py [--init CKPT] [--batch 8] [--new 32] [--steps 5] [--quick] [--out DIR]

TRL is a benchmark-only dependency, imported here only. Writes opd_throughput.{md,json,png} under --out (default
docs/benchmarks; with --quick runs/bench_quick) and prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, md_table, report_dir, write_report  # noqa: E402


def make_models(init: str | None):
    """Student and teacher of the tiny architecture: the pre-trained checkpoint (teacher = student + noise) or
    random weights, with the checkpoint's tokenizer (or one trained on task demonstrations)."""
    from elastic_moe.checkpoint import load_checkpoint
    from elastic_moe.config import ModelConfig
    from elastic_moe.model import ElasticMoE
    from elastic_moe.tasks import get_mixed_suite
    from elastic_moe.tokenizer import Tokenizer

    if init:
        student, meta = load_checkpoint(init)
        tok = Tokenizer.load(Path(meta["path"]) / "tokenizer")
    else:
        texts = [t.demonstration()[-1]["content"] + t.prompt() for t in get_mixed_suite("train", 400, seed=3)]
        tok = Tokenizer.train(texts, vocab_size=4096)
        cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, moe_num_experts=8, moe_k=2,
                          moe_intermediate_size=128, moe_layer_start_index=1, max_position_embeddings=1024)
        torch.manual_seed(0)
        student = ElasticMoE(cfg)
    teacher = type(student)(student.cfg)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in teacher.parameters():
            if p.is_floating_point():
                p.add_(0.02 * torch.randn(p.shape, generator=g) * p.std())
    return student, teacher, tok


def step_prompts(prompts: list, batch: int, step: int) -> list:
    """The `batch` prompts of step `step`, cycling through all of them: TRL's loop draws its batches from every
    task, so ours must not train on the first `batch` prompts only (prompt lengths differ)."""
    return [prompts[(step * batch + j) % len(prompts)] for j in range(batch)]


class Ours:
    def __init__(self, student, teacher, tok, prompts, batch: int, new_tokens: int):
        from elastic_moe.opd import OPDLossConfig, OPDTrainer, Teachers
        from elastic_moe.rollout import RolloutEngine, RolloutParams

        self.student, self.tok, self.prompts, self.batch = student.train(), tok, prompts, batch
        teachers = Teachers({"t": teacher.eval().requires_grad_(False)}, {}, fallback="t")
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
        self.trainer = OPDTrainer(student, teachers, OPDLossConfig("full", chunk_size=1024), opt, tok.pad_id)
        self.engine = RolloutEngine(student)
        self.params = RolloutParams(group_size=1, max_new_tokens=new_tokens, temperature=1.0, return_routes=False)
        self.seed = 0
        self.sample_s: list[float] = []

    def step(self) -> float:
        t = time.perf_counter()
        self.engine.load_weights(self.student.state_dict(), self.trainer.version)
        batch = self.engine.rollout(step_prompts(self.prompts, self.batch, self.seed), self.params, seed=self.seed,
                                    eos_id=-1)  # no early stop
        self.sample_s.append(time.perf_counter() - t)
        self.trainer.step(batch.samples, ["x"] * len(batch.samples))
        self.seed += 1
        return time.perf_counter() - t


def trl_trainer(student, teacher, tok, tasks, batch: int, new_tokens: int, steps: int, work: Path):
    """TRL's GKDTrainer on the HF exports of the same weights; returns (trainer, list of step times)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from elastic_moe.hf import export_hf

    for name, m in (("student", student), ("teacher", teacher)):
        export_hf(m, work / name)
        tok.save(work / name)
    hf_s = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    hf_t = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    for m in (hf_s, hf_t):
        m.generation_config.eos_token_id = None  # exactly new_tokens per completion, as ours
    hf_tok = PreTrainedTokenizerFast.from_pretrained(work / "student")
    hf_tok.padding_side = "left"
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    data = Dataset.from_list([{"messages": t.demonstration()} for t in tasks])
    cfg = GKDConfig(output_dir=str(work / "trl"), lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=new_tokens,
                    per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5, report_to=[],
                    use_cpu=True, bf16=False, fp16=False, logging_steps=10**6, save_strategy="no",
                    dataloader_num_workers=0, max_length=1024, disable_dropout=True)
    trainer = GKDTrainer(model=hf_s, teacher_model=hf_t, args=cfg, train_dataset=data, processing_class=hf_tok,
                         callbacks=[Timer()])
    trainer.generation_config.eos_token_id = None  # the trainer copies the tokenizer's EOS in; switch it off again
    completion_tokens: list[float] = []
    sample_s: list[float] = []
    generate = trainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        t = time.perf_counter()
        ids, mask, labels = generate(model, inputs, generation_config)
        sample_s.append(time.perf_counter() - t)
        completion_tokens.append(float((labels != -100).sum()) / labels.shape[0])
        return ids, mask, labels

    trainer.generate_on_policy_outputs = counted
    return trainer, times, completion_tokens, sample_s


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", help="pre-trained checkpoint (default: random weights of the tiny architecture)")
    ap.add_argument("--batch", type=int, default=8, help="prompts per step (one completion each)")
    ap.add_argument("--new", type=int, default=32, help="completion tokens per prompt")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per trainer (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="--steps 2")
    ap.add_argument("--out", help="where the report goes (default: docs/benchmarks; with --quick runs/bench_quick, "
                    "so that a smoke run does not replace the committed results)")
    args = ap.parse_args(argv)
    args.out = report_dir(args.out, args.quick)
    return args


def main() -> None:
    args = parse_args()
    steps = 2 if args.quick else args.steps
    torch.set_num_threads(args.threads)

    import transformers
    import trl

    from elastic_moe.tasks import get_suite

    student, teacher, tok = make_models(args.init)
    tasks = get_suite("open_ended", "train", args.batch * (steps + 1), seed=5)
    prompts = [tok.encode_chat(t.messages, add_generation_prompt=True) for t in tasks]
    work = Path(tempfile.mkdtemp(prefix="opd_bench_"))
    import copy

    ours = Ours(copy.deepcopy(student), teacher, tok, prompts, args.batch, args.new)
    trainer, trl_times, trl_tokens, trl_sample_s = trl_trainer(copy.deepcopy(student), teacher, tok, tasks, args.batch, args.new, steps + 1,
                                     work)
    # TRL's loop owns its steps: run it whole, then ours the same number of steps, then TRL again is not possible
    # without re-building it, so alternate whole runs: ours, TRL, ours (ours' median over both of its runs).
    ours_times = [ours.step() for _ in range(steps + 1)][1:]
    ours.sample_s.pop(0)
    t0 = time.perf_counter()
    trainer.train()
    trl_wall = time.perf_counter() - t0
    ours_times += [ours.step() for _ in range(steps)]
    trl_steady = trl_times[1:]
    ours_s, trl_s = statistics.median(ours_times), statistics.median(trl_steady)
    ours_gen, trl_gen = statistics.median(ours.sample_s), statistics.median(trl_sample_s[1:])
    prompt_len = sum(map(len, prompts)) / len(prompts)  # both sides draw from all of them
    headline = {"opd_speedup_vs_trl": trl_s / ours_s, "ours_samples_per_s": args.batch / ours_s,
                "trl_samples_per_s": args.batch / trl_s, "ours_step_s": ours_s, "trl_step_s": trl_s,
                "batch": args.batch, "new_tokens": args.new, "mean_prompt_tokens": prompt_len, "dtype": "float32",
                "params_M": sum(p.numel() for p in student.parameters()) / 1e6, "steps": steps,
                "trl_version": trl.__version__, "transformers_version": transformers.__version__,
                "trl_wall_s_incl_warmup": trl_wall, "ours_sampling_s": ours_gen, "trl_sampling_s": trl_gen,
                "trl_mean_completion_tokens": statistics.mean(trl_tokens) if trl_tokens else None}
    rows = [["elastic-moe OPDTrainer (full-vocab chunked reverse KL)", ours_s, ours_gen, ours_s - ours_gen,
             args.batch / ours_s, 1.0],
            ["TRL GKDTrainer (lmbda=1, beta=1)", trl_s, trl_gen, trl_s - trl_gen, args.batch / trl_s, ours_s / trl_s]]
    md = f"""# On-policy distillation step: elastic-moe vs TRL GKDTrainer (CPU)

`{command_line()}` on {machine()}; TRL {trl.__version__}, transformers {transformers.__version__}.

Student and teacher: the tiny architecture ({headline['params_M']:.2f} M parameters, vocabulary
{student.cfg.vocab_size}), {'pre-trained `' + args.init + '`' if args.init else 'random weights'}; the teacher is
the student plus 2% noise. {args.batch} open-ended chat prompts per step, drawn from the same {len(prompts)} on both
sides (mean {prompt_len:.0f} tokens), one sampled completion of exactly {args.new} tokens each (temperature 1, EOS
off), float32, {args.threads} torch thread(s).
TRL runs the HF export of the same weights (`Ernie4_5_MoeForCausalLM`). Step times are medians after one warm-up: TRL's over its {steps} steps, ours over {2 * steps} (a run of {steps} before TRL's and one after).

{md_table(["trainer", "step (s)", "of which sampling (s)", "loss + update (s)", "trained samples / s", "relative"],
          rows)}

**Speed-up: {headline['opd_speedup_vs_trl']:.2f}x** (target >= 1.5x: {'met' if headline['opd_speedup_vs_trl'] >= 1.5 else 'missed'}).

Completion tokens per sample: ours {args.new} (fixed), TRL {headline['trl_mean_completion_tokens']}.

Both compute the same loss: TRL's `generalized_jsd_loss` with beta = 1 is `kl_div(teacher_logp, student_logp)` =
KL(student || teacher) per token over the full vocabulary, averaged over completion tokens. Where the time goes
(the sampling column, median of the same steps): ours samples with the rollout engine (KV cache, prefill once,
per-token expert products on weight views), TRL with `model.generate` of the HF model. The loss side differs: TRL
materialises student and teacher logits [batch, prompt + completion, vocabulary] for every position, ours only the
completion positions, [chunk, vocabulary] at a time, and recomputes them in the backward pass.
The machine is a shared 2-core CPU with other jobs running; the two trainers alternate (ours, TRL, ours) so both see
similar load, but absolute numbers are noisy.

![step time](opd_throughput.png)
"""
    plot_steps(ours_times, trl_steady, ours_gen, trl_gen, args.out / "opd_throughput.png")
    write_report("opd_throughput", md, headline, args.out)


def plot_steps(ours_times: list[float], trl_times: list[float], ours_gen: float, trl_gen: float, path: Path) -> None:
    """Median step split into sampling and loss + update, and every timed step of both trainers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elastic_moe.atomic import atomic_savefig

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    names = ["elastic-moe", "TRL GKDTrainer"]
    meds = [statistics.median(ours_times), statistics.median(trl_times)]
    gens = [ours_gen, trl_gen]
    ax[0].bar(names, gens, color="C1", label="sampling")
    ax[0].bar(names, [m - g for m, g in zip(meds, gens)], bottom=gens, color="C0", label="loss + update")
    ax[0].set_ylabel("median step (s)")
    ax[0].legend(fontsize=8)
    for i, ts in enumerate((ours_times, trl_times)):
        ax[1].plot(range(1, len(ts) + 1), ts, marker="o", ms=4, color=f"C{i + 2}", label=names[i])
    ax[1].set_xlabel("timed step")
    ax[1].set_ylabel("step (s)")
    ax[1].set_ylim(bottom=0)
    ax[1].legend(fontsize=8)
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
