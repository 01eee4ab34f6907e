"""Batched generation with a KV cache on the elastic model: the rollout engine's core and the `generate` command.

Prompts of different lengths are left-padded into one batch; a sequence that finishes (EOS, a stop string or its
token budget) leaves the batch, so a long-tail sample does not make the others wait. For every generated token it
returns the log-probability under logits / temperature (over the whole vocabulary: a top-p draw's renormalisation
over its nucleus is left out, as the trainer's log-probs leave it out, and as veRL's do) and, when asked, the experts
every MoE layer routed each position to (prompt and response), in a compact integer dtype — what Rollout Router
Replay feeds back to the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from elastic_moe import ops
from elastic_moe.errors import UserError
from elastic_moe.model import ElasticMoE, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    return_routes: bool = False
    seed: int | None = None

    def __post_init__(self):
        # top_p = 0 keeps no token at all, and 0 new tokens leaves routes one row longer than prompt + tokens
        if self.max_new_tokens < 1 or not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise UserError(f"sampling: max_new_tokens = {self.max_new_tokens} must be >= 1, temperature = "
                            f"{self.temperature} >= 0 and top_p = {self.top_p} in (0, 1]")
        # an empty stop string is in every text (each completion would stop after one token), and a string given for
        # the tuple would stop at any one of its characters
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise UserError(f"sampling: stop_strings = {self.stop_strings!r} must be a list of non-empty strings")


@dataclass
class Completion:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # stop | length
    routes: dict[int, torch.Tensor] | None = None  # MoE layer -> (len(prompt) + len(tokens), K); last slot = pad


def sample(logits_BV: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    """Returns (token ids (B,), log-probs of those tokens under logits/temperature (B,))."""
    if temperature <= 0:
        tok = logits_BV.argmax(-1)
        return tok, torch.log_softmax(logits_BV.float(), -1).gather(1, tok[:, None])[:, 0]
    # as FastDecoder: below ~1e-37, logits / temperature overflow to inf and the probabilities to NaN
    logp = torch.log_softmax(logits_BV.float() / max(temperature, 1e-6), -1)
    probs = logp.exp()
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        probs = torch.zeros_like(probs).scatter(1, si, sp * keep)
    # inverse-CDF sampling: on a CPU it is several times cheaper than torch.multinomial (exponential noise over
    # the whole vocabulary); right=True never lands on a zero-probability token
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")
    u = torch.rand(total.shape, generator=gen, device=probs.device) * total
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
    return tok, logp.gather(1, tok[:, None])[:, 0]


@torch.no_grad()
def generate(model: ElasticMoE, prompts: list[list[int]], params: SamplingParams, spec=None, eos_id: int | None = None,
             decode: Callable[[list[int]], str] | None = None, n: int = 1) -> list[Completion]:
    """Sample `n` completions for every prompt, prompt-major (the n of prompt 0 first); each prompt is prefilled once
    and its KV cache copied to its n samples. `decode` (ids -> text) is needed only for stop strings."""
    cfg = model.cfg
    if not prompts:
        return []
    check_prompts(prompts, cfg.vocab_size)
    if n < 1:
        raise UserError(f"n = {n} samples per prompt: must be >= 1")
    spec = one_spec(model, spec, len(prompts))
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    if total > cfg.max_position_embeddings:
        raise UserError(f"prompt of {longest} tokens + {params.max_new_tokens} new exceeds the context of "
                        f"{cfg.max_position_embeddings}")
    if params.stop_strings and decode is None:
        raise UserError("stop strings need a decode function (a tokenizer)")
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    was_training = model.training
    model.eval()
    B = len(prompts)
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, total, device=device, dtype=dtype)
    ids = torch.full((B, longest), cfg.pad_token_id, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p, device=device)
        cache.key_valid[r, : longest - len(p)] = False
    positions = (cache.key_valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    out = model(ids, spec, cache=cache, positions=positions, return_routes=params.return_routes, track_load=False,
                return_logits=False)
    # the LM head on the last prompt position only (the model's own head op, same numerics)
    bias = None if model.lm_head is None else model.lm_head.bias
    logits = ops.linear(out.hidden[:, -1], model.head_weight(), bias, model.numerics)
    routes = out.routes
    if n > 1:
        rep = torch.arange(B, device=device).repeat_interleave(n)
        cache.select_rows(rep)
        positions, logits = positions[rep], logits[rep]
        routes = {i: r[rep] for i, r in routes.items()}
        prompts = [p for p in prompts for _ in range(n)]
        B = len(prompts)
    results = [Completion(list(p)) for p in prompts]
    route_log = {i: [r.cpu()] for i, r in routes.items()} if params.return_routes else {}
    active = torch.arange(B, device=device)  # which original rows are still in the batch
    next_pos = positions[:, -1] + 1
    for step in range(params.max_new_tokens):
        tok, lp = sample(logits, params.temperature, params.top_p, gen)
        done = torch.zeros(len(active), dtype=torch.bool)
        for j, (row, t, logp) in enumerate(zip(active.tolist(), tok.tolist(), lp.tolist())):
            c = results[row]
            c.tokens.append(t)
            c.logprobs.append(logp)
            if t == eos_id or (params.stop_strings and any(s in decode(c.tokens) for s in params.stop_strings)):
                c.finish_reason = "stop"
                done[j] = True
        if step == params.max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero()[:, 0].to(device)
            cache.select_rows(keep)
            active, tok, next_pos = active[keep], tok[keep], next_pos[keep]
        out = model(tok[:, None], spec, cache=cache, positions=next_pos[:, None], return_routes=params.return_routes,
                    track_load=False)
        if params.return_routes:
            for i, r in out.routes.items():
                route_log[i].append(_scatter_rows(r.cpu(), active.cpu(), B, cfg.moe_num_experts))
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    if params.return_routes:
        _attach_routes(results, route_log, prompts, longest, cfg.moe_num_experts)
    model.train(was_training)
    return results


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt")
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise UserError(f"token id outside the vocabulary of {vocab_size}")


def one_spec(model: ElasticMoE, spec, n_prompts: int):
    """The one sub-model a generation call decodes with: a list of specs (one per prompt) must name the same one."""
    if not isinstance(spec, (list, tuple)):
        return spec
    if len(spec) != n_prompts:
        raise UserError(f"{len(spec)} specs for {n_prompts} prompts")
    specs = [model.resolve(s) for s in spec]
    if any(s != specs[0] for s in specs):
        raise UserError("per-sequence sub-models are a training feature; decode with one spec")
    return specs[0]


def _scatter_rows(r_bSK: torch.Tensor, rows: torch.Tensor, B: int, pad: int) -> torch.Tensor:
    full = torch.full((B, *r_bSK.shape[1:]), pad, dtype=r_bSK.dtype)
    full[rows] = r_bSK
    return full


def _attach_routes(results, route_log, prompts, longest, pad):
    for i, chunks in route_log.items():
        prefill = chunks[0]
        steps = torch.cat(chunks[1:], dim=1) if len(chunks) > 1 else prefill[:, :0]
        if prefill.shape[0] != len(results):  # prefill is for all rows; later chunks were scattered to B rows
            raise AssertionError("route bookkeeping")
        for r, c in enumerate(results):
            p = prefill[r, longest - len(prompts[r]):]
            gen = steps[r, : max(len(c.tokens) - 1, 0)]
            last = torch.full((1, p.shape[-1]), pad, dtype=p.dtype)  # the last token was never fed forward
            if c.routes is None:
                c.routes = {}
            c.routes[i] = torch.cat([p, gen, last])
