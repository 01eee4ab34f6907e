"""The rollout engine: group sampling on its own copy of the weights and its own numerics.

    engine = RolloutEngine(model, numerics=ops.Numerics("bf16"), spec=None)   # copies the weights
    engine.load_weights(trainer_model.state_dict(), version=7)                # weight sync
    batch = engine.rollout(prompts, RolloutParams(group_size=8, max_new_tokens=64), seed=step)
    batch.samples[i].tokens / .logprobs / .routes / .version
    tb = collate(batch.samples, pad_id, num_experts)                           # padded tensors for the trainer

Every kept prompt gives `group_size` consecutive samples (group-major). Prompts that cannot fit the context with
their token budget are skipped and counted, never truncated silently. Prompts are sorted by length and cut into
generation calls of at most `batch_size` sequences (length-aware batching: little left padding); a call prefills
each prompt once for its G samples (shared KV cache), and a finished sequence leaves the batch, so a long-tail
sample holds up only itself. On a GPU the engine samples through `fast_decode.FastDecoder` instead (static KV cache,
CUDA graphs per sub-model and batch bucket; finished rows stay in the batch): the same tokens, log-probs and routes
for greedy decoding, other random numbers when sampling.

The engine is the "inference side" of the training-inference mismatch: it may run other numerics (precision or
kernel) than the trainer, which is what `rl.mismatch` measures and Rollout Router Replay (R3) corrects. A sample
records the routed experts of every MoE layer for every position (uint8 when there are < 255 experts).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from elastic_moe import ops
from elastic_moe.errors import UserError
from elastic_moe.fast_decode import FastDecoder
from elastic_moe.generate import SamplingParams, generate
from elastic_moe.model import ElasticMoE
from elastic_moe.moe import route_dtype


class NonFiniteError(RuntimeError):
    """NaN or inf in weights or logits: the step must not be used for an update."""


@dataclass
class RolloutParams:
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 256  # sequences per generation call
    return_routes: bool = True


@dataclass
class Sample:
    group: int  # index of the prompt in the list given to `rollout`
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # under logits / temperature, as sampled
    finish_reason: str  # stop | length
    version: int  # weight version that sampled it
    routes: dict[int, torch.Tensor] | None = None  # MoE layer -> (len(prompt) + len(tokens), K); last slot = pad

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RolloutBatch:
    samples: list[Sample]  # group-major: group_size consecutive samples per kept prompt
    group_size: int
    version: int
    groups: list[int]  # kept prompt indices, in the order of `samples`
    skipped: list[int] = field(default_factory=list)  # prompts too long for the context
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainBatch:
    """Samples as the trainer consumes them, each distinct prompt once (shared prefix): the trainer runs a prompt
    once for all the samples that continue it, then their responses on copies of its KV cache.

    U distinct prompts (left-padded to P), B responses (right-padded to R); response token t of sample b is predicted
    by the last prompt position for t = 0 and by response position t - 1 after."""

    prompt_ids: torch.Tensor  # (U, P) left-padded
    prompt_len: torch.Tensor  # (U,) long
    prompt_of: torch.Tensor  # (B,) long: which prompt each sample continues
    response_ids: torch.Tensor  # (B, R) right-padded
    mask_BT: torch.Tensor  # (B, R) bool: real response tokens
    rollout_logp_BT: torch.Tensor  # (B, R) float32, 0 off the mask
    prompt_routes: dict[int, torch.Tensor] | None  # MoE layer -> (U, P, K); num_experts where nothing was recorded
    response_routes: dict[int, torch.Tensor] | None  # MoE layer -> (B, R, K); the last real position is padding
    truncated_B: torch.Tensor  # (B,) bool
    versions_B: torch.Tensor  # (B,) long

    @property
    def num_tokens(self) -> int:
        return int(self.mask_BT.sum())

    def rollout_pred_routes(self) -> dict[int, torch.Tensor]:
        """MoE layer -> (B, R, K): the engine's experts at the position that predicts each response token."""
        if self.prompt_routes is None:
            return {}
        return {i: torch.cat([self.prompt_routes[i][self.prompt_of, -1:], r[:, :-1]], 1)
                for i, r in self.response_routes.items()}

    def rows(self, idx: torch.Tensor) -> TrainBatch:
        """The samples `idx` (a 1-D index tensor), with only the prompts they use."""
        used, prompt_of = torch.unique(self.prompt_of[idx], return_inverse=True)
        pr = None if self.prompt_routes is None else {i: r[used] for i, r in self.prompt_routes.items()}
        rr = None if self.response_routes is None else {i: r[idx] for i, r in self.response_routes.items()}
        return TrainBatch(self.prompt_ids[used], self.prompt_len[used], prompt_of, self.response_ids[idx],
                          self.mask_BT[idx], self.rollout_logp_BT[idx], pr, rr, self.truncated_B[idx],
                          self.versions_B[idx])


def collate(samples: list[Sample], pad_id: int, num_experts: int, with_routes: bool = True) -> TrainBatch:
    with_routes = with_routes and all(s.routes is not None for s in samples)
    keys: dict[tuple, int] = {}
    first: list[Sample] = []
    prompt_of = []
    for s in samples:
        k = (tuple(s.prompt),)  # one prompt row per distinct prompt and, for R3, per distinct set of its routes
        if with_routes:  # (samples of one prompt drawn by two weight versions routed it differently)
            k += tuple(r[:len(s.prompt)].numpy().tobytes() for _, r in sorted(s.routes.items()))
        if k not in keys:
            keys[k] = len(first)
            first.append(s)
        prompt_of.append(keys[k])
    U, B = len(first), len(samples)
    P = max(len(s.prompt) for s in first)
    R = max(max(len(s.tokens) for s in samples), 1)
    prompt_ids = torch.full((U, P), pad_id, dtype=torch.long)
    for u, s in enumerate(first):
        prompt_ids[u, P - len(s.prompt):] = torch.tensor(s.prompt)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.bool)
    logp = torch.zeros(B, R, dtype=torch.float32)
    for b, s in enumerate(samples):
        n = len(s.tokens)
        resp[b, :n] = torch.tensor(s.tokens, dtype=torch.long)
        mask[b, :n] = True
        logp[b, :n] = torch.tensor(s.logprobs, dtype=torch.float32)
    pr = rr = None
    if with_routes:
        dt = route_dtype(num_experts)
        K = {i: r.shape[-1] for i, r in samples[0].routes.items()}
        pr = {i: torch.full((U, P, k), num_experts, dtype=dt) for i, k in K.items()}
        rr = {i: torch.full((B, R, k), num_experts, dtype=dt) for i, k in K.items()}
        for u, s in enumerate(first):
            for i, r in s.routes.items():
                pr[i][u, P - len(s.prompt):] = r[:len(s.prompt)]
        for b, s in enumerate(samples):
            for i, r in s.routes.items():
                rr[i][b, :len(s.tokens)] = r[len(s.prompt):]
    return TrainBatch(prompt_ids, torch.tensor([len(s.prompt) for s in first]), torch.tensor(prompt_of), resp, mask,
                      logp, pr, rr, torch.tensor([s.truncated for s in samples], dtype=torch.bool),
                      torch.tensor([s.version for s in samples], dtype=torch.long))


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class RolloutEngine:
    """Samples groups of completions with its own copy of the model, its own numerics and sub-model spec."""

    def __init__(self, model: ElasticMoE, numerics: ops.Numerics = ops.FP32, spec=None, device: str | None = None,
                 fast_decode: bool | None = None):
        """fast_decode: sample through `FastDecoder` (static KV cache, CUDA graphs; None: on a GPU when the engine
        runs the model in its own precision; emulated bf16 / FP8 numerics go through `generate`, where every product
        honours them, while the decoder's fused expert reductions do not), else through `generate`. On a CPU, True
        runs the decoder's static-cache code without graphs."""
        self.model = copy.deepcopy(model).eval()
        if device is not None:
            self.model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.set_numerics(numerics)
        self.numerics = numerics
        self.spec = spec
        self.version = 0
        self.cfg = self.model.cfg
        on_gpu = next(self.model.parameters()).is_cuda
        if fast_decode is None:
            fast_decode = on_gpu and numerics.precision == "fp32"
        self.decoder = FastDecoder(self.model, compile=on_gpu, static_on_cpu=True) if fast_decode else None

    def generate(self, prompts: list[list[int]], params: SamplingParams, eos_id: int | None = None, decode=None,
                 n: int = 1, spec=None) -> list:
        """`generate.generate` on this engine's model and spec (or `spec`), through the fast decoder when it has
        one; the same completions (tokens, log-probs, routes), sampled with other random numbers."""
        spec = self.spec if spec is None else spec
        if self.decoder is not None:
            return self.decoder.generate(prompts, params, spec, eos_id, decode, n=n)
        return generate(self.model, prompts, params, spec, eos_id=eos_id, decode=decode, n=n)

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Weight sync: copy a trainer state dict in (keys and shapes must match). Non-finite weights are refused."""
        own = self.model.state_dict()
        missing = set(own) - set(state_dict)
        if missing:
            raise UserError(f"rollout weight sync: missing tensors {sorted(missing)[:3]}")
        for k, v in state_dict.items():
            if k not in own:
                raise UserError(f"rollout weight sync: unexpected tensor {k}")
            if v.shape != own[k].shape:
                raise UserError(f"rollout weight sync: {k} has shape {tuple(v.shape)}, the engine's model "
                                f"{tuple(own[k].shape)}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise NonFiniteError(f"rollout weight sync: non-finite values in {k} (version {version})")
        for k, v in state_dict.items():
            own[k].copy_(v)
        self.version = version

    def fits(self, prompt: list[int], max_new_tokens: int) -> bool:
        return 0 < len(prompt) and len(prompt) + max_new_tokens <= self.cfg.max_position_embeddings

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], params: RolloutParams, seed: int = 0, eos_id: int | None = None,
                decode=None) -> RolloutBatch:
        """`group_size` samples for every prompt that fits the context; `decode` (ids -> text) for stop strings.

        Raises NonFiniteError when the logits are not finite (sampling cannot proceed, or a log-prob is NaN)."""
        G = params.group_size
        kept = [i for i, p in enumerate(prompts) if self.fits(p, params.max_new_tokens)]
        skipped = [i for i in range(len(prompts)) if i not in set(kept)]
        # prompts sorted by length so a generation call pads little; each call prefills a prompt once for its G
        # samples, and finished samples leave the batch
        order = sorted(kept, key=lambda i: (-len(prompts[i]), i))
        per_call = max(1, params.batch_size // G)
        if self.decoder is not None:  # the decoder's largest batch bucket
            per_call = max(1, min(per_call, self.decoder.buckets[-1] // G))
        out: dict[int, list[Sample]] = {}
        t0 = time.perf_counter()
        n_calls = 0
        for c in range(0, len(order), per_call):
            chunk = order[c:c + per_call]
            sp = SamplingParams(params.max_new_tokens, params.temperature, params.top_p, tuple(params.stop_strings),
                                params.return_routes, seed=_mix(seed, self.version, c))
            try:
                comps = self.generate([prompts[i] for i in chunk], sp, eos_id=eos_id, decode=decode, n=G)
            except RuntimeError as e:
                if "probability tensor" in str(e):  # sampling from NaN / inf probabilities
                    raise NonFiniteError(f"non-finite logits while sampling (weight version {self.version})") from e
                raise
            n_calls += 1
            for j, i in enumerate(chunk):
                group = []
                for comp in comps[j * G:(j + 1) * G]:
                    if not all(math.isfinite(x) for x in comp.logprobs):
                        raise NonFiniteError(f"non-finite log-probs while sampling (weight version {self.version})")
                    group.append(Sample(i, comp.prompt, comp.tokens, comp.logprobs, comp.finish_reason,
                                        self.version, comp.routes))
                out[i] = group
        dt = time.perf_counter() - t0
        samples = [x for i in kept for x in out[i]]
        n_tok = sum(len(s.tokens) for s in samples)
        stats = {"rollout/time_s": dt, "rollout/samples": len(samples), "rollout/tokens": n_tok,
                 "rollout/tokens_per_s": n_tok / dt if dt > 0 else 0.0, "rollout/calls": n_calls,
                 "rollout/skipped_prompts": len(skipped),
                 "rollout/truncated_frac": sum(s.truncated for s in samples) / max(len(samples), 1),
                 "rollout/response_len": n_tok / max(len(samples), 1)}
        return RolloutBatch(samples, G, self.version, kept, skipped, stats)


def check_fit(prompts: list[list[int]], max_new_tokens: int, context: int, key: str) -> None:
    """Every prompt with `max_new_tokens` more fits the model's context; else a one-line UserError naming the
    setting `key`, before any work (the engine skips a prompt that does not fit: a run would train on a subset of
    its tasks, or on nothing)."""
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > context:
        raise UserError(f"{key} = {max_new_tokens}: with the longest prompt ({longest} tokens) it exceeds the model's "
                        f"context of {context} tokens; lower it")


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


@torch.no_grad()
def evaluate_accuracy(model: ElasticMoE, tok, tasks: list, max_new_tokens: int, batch_size: int = 64, spec=None,
                      scorer=None, samples: int = 1, temperature: float = 0.0, seed: int = 0,
                      keep_texts: bool = False) -> dict:
    """Accuracy of `model` on single-turn tasks: {"accuracy", "reward", "n", "skipped", "per_task"}.

    Greedy by default; with temperature > 0, `samples` seeded samples per task and the accuracy is their mean (the
    expected accuracy of the sampling policy); "per_task" holds each kept task's mean correctness, for paired
    comparisons; with `keep_texts`, "texts" holds each kept task's decoded samples. Verified in-process
    (tasks.verify) unless a scorer (grpo_trainer.PoolScorer / FunctionScorer) is given."""
    from elastic_moe.tasks import verify

    if temperature <= 0:
        samples = 1
    cfg = model.cfg
    prompts = [tok.encode_chat(t.messages, add_generation_prompt=True) for t in tasks]
    ok = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= cfg.max_position_embeddings]
    order = sorted(ok, key=lambda i: len(prompts[i]))
    texts: dict[int, list[str]] = {}
    per_call = max(1, batch_size // samples)
    for c in range(0, len(order), per_call):
        chunk = order[c:c + per_call]
        comps = generate(model, [prompts[i] for i in chunk],
                         SamplingParams(max_new_tokens, temperature=temperature, seed=seed + c), spec,
                         eos_id=tok.eos_id, n=samples)
        for j, i in enumerate(chunk):
            texts[i] = [tok.decode(comp.tokens, skip_special_tokens=True)
                        for comp in comps[j * samples:(j + 1) * samples]]
    kept = [tasks[i] for i in ok for _ in range(samples)]
    outs = [x for i in ok for x in texts[i]]
    if scorer is not None:
        rewards, correct, _ = scorer.score(kept, outs)
    else:
        verdicts = [verify(t, x) for t, x in zip(kept, outs)]
        rewards, correct = [v.reward for v in verdicts], [v.correct for v in verdicts]
    n = max(len(kept), 1)
    per_task = [sum(correct[k * samples:(k + 1) * samples]) / samples for k in range(len(ok))]
    res = {"accuracy": sum(correct) / n, "reward": sum(r or 0.0 for r in rewards) / n, "n": len(ok),
           "skipped": len(tasks) - len(ok), "per_task": per_task}
    if keep_texts:
        res["texts"] = [texts[i] for i in ok]
    return res
