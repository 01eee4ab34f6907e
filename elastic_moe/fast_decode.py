"""Fast decoding for rollout and serving: static KV cache, CUDA graphs per (sub-model, batch bucket) on a GPU.

`FastDecoder(model).generate(prompts, params, spec, eos_id)` returns what `generate.generate` returns (one
`Completion` per prompt: tokens, log-probs under logits / temperature, finish reason, routed experts of every
position when asked). On a CPU it calls `generate` unless `static_on_cpu=True`; then, with `compile=True`, each
decode step is one compiled call (the CPU analogue of a graph replay: on a 2-core CPU about 2.7x the tokens/s of
the eager loop at batch 1 and 1.7x at batch 16, docs/benchmarks/model_throughput.md).

How a call runs:
- The batch is padded up to a bucket size (1, 2, 4, ..., 256), the prompts (left) and the cache length up to powers
  of two, so that one captured graph serves many requests. The prefill runs the blocks' own forward over the prompt
  into the static cache, and its last hidden state gives the first token; on a GPU with the grouped-GEMM experts it
  is a CUDA graph too, per prompt bucket (eagerly, its ~1,000 kernel launches took ~50 ms of a 64-token prompt).
- Every later token is one replay of a CUDA graph that holds the whole decode step: embedding, every kept layer
  (attention over the full static cache under a mask, the MoE with the sub-model's expert mask and top-k), the head,
  sampling (greedy, or Gumbel-max, with top-p, on noise written into a static buffer before each replay), and the
  bookkeeping (token, its log-prob, the routes, end-of-sequence flags, positions) into static buffers. The host does
  not wait on the GPU between steps; it looks at the end-of-sequence flags every `check_every` steps.
- Graphs are cached per (spec, batch bucket, cache bucket, sampling mode), so switching the sub-model at run time
  costs one capture the first time and nothing after; with `compile=True` the pieces of a layer are compiled once
  per layer kind (dense / MoE x top-k) and shared by all layers and all specs (regional compilation, ~7 s), or with
  `regional=False` the whole step once per spec (~30 s; ~14% faster on an H100 at batch 1).
- Finished rows keep decoding (their output is ignored) instead of leaving the batch: the batch shape stays static.
- Sampling draws other random numbers than `generate` (Gumbel-max instead of `torch.multinomial`); greedy decoding
  and the log-probs and routes of given tokens are the same computation.

Experts per decode step (`expert_path`): "sorted" (the training dispatch: sort pairs by expert, grouped GEMM;
reads each chosen expert once, right for large batches), "gathered" (copy the chosen experts' weights, batched GEMM;
for a handful of tokens), "gemv" (the chosen experts' weights, and the shared experts, read by one fused reduction
per projection; needs compile=True) or "auto" (gemv/gathered for up to 8 (token, slot) pairs, 64 for gemv on a CPU;
sorted above). Compiled for a GPU, the router's product and top-k are fused reductions too (`moe.top_k_indices`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from elastic_moe import ops
from elastic_moe.compat import torch_version
from elastic_moe.errors import UserError
from elastic_moe.generate import Completion, SamplingParams, check_prompts, generate, one_spec
from elastic_moe.model import ElasticMoE, KVCache, Rotary
from elastic_moe.moe import count_ids, route_dtype
from elastic_moe.spec import ResolvedSpec

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# above this many rows a step reads each chosen expert once through the grouped GEMM; the Triton kernels, which
# read an expert's rows once per (token, slot), are for the few-token steps of batch-1 to batch-8 decoding
TRITON_MAX_BATCH = 8


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise UserError(f"batch of {n} exceeds the largest batch bucket {buckets[-1]}")


def _spec_key(rs: ResolvedSpec):
    return (rs.layers, tuple(sorted(rs.experts.items())), tuple(sorted(rs.top_k.items())))


# ------------------------------------------------------------------------------------- pieces of one step
# Plain functions of (module, tensors): torch.compile compiles each once per layer kind and reuses it for every
# layer, since the layers differ only in their parameters, which are inputs of the compiled code.

def _attn_in(blk, x_BH, cos_BD, sin_BD):
    """Pre-attention norm, QKV projection, RoPE; returns q (B, nq, 1, D) and the new key/value (B, nkv, 1, 2D)."""
    a = blk.attn
    B = x_BH.shape[0]
    q, k, v = a.qkv(blk.attn_norm(x_BH[:, None])).split([a.nq * a.d, a.nkv * a.d, a.nkv * a.d], dim=-1)
    q = Rotary.apply(q.view(B, 1, a.nq, a.d).transpose(1, 2), cos_BD[:, None], sin_BD[:, None])
    k = Rotary.apply(k.view(B, 1, a.nkv, a.d).transpose(1, 2), cos_BD[:, None], sin_BD[:, None])
    v = v.view(B, 1, a.nkv, a.d).transpose(1, 2)
    return q, torch.cat([k, v], dim=-1)


def _attn_out_mlp(blk, x_BH, q, kv, mask_add_BL, emask, top_k: int, expert_path: str, experts_t=None,
                  fused_attention: bool = False):
    """Attention of one new token over the static cache, output projection, residual, the feed-forward (MoE).
    experts_t: the layer's expert weights laid out (E, out, in) for the gemv path, or None. fused_attention: both
    attention products as multiply-sums, which torch.compile fuses with the softmax (instead of two batched GEMM
    calls of a few rows each; on a CPU ~5% more tokens/s at batch 16)."""
    a = blk.attn
    B = x_BH.shape[0]
    D, g = a.d, a.nq // a.nkv
    k, v = kv[..., :D], kv[..., D:]  # (B, nkv, L, D)
    qg = q.reshape(B, a.nkv, g, D)
    fused = fused_attention and torch.compiler.is_compiling()
    if fused:
        s = (qg[:, :, :, None, :] * k[:, :, None]).sum(-1)
    else:
        s = torch.matmul(qg, k.transpose(-1, -2))
    p = torch.softmax(s.float() * (1.0 / math.sqrt(D)) + mask_add_BL[:, None, None, :], dim=-1).to(v.dtype)
    y = (p[..., None] * v[:, :, None]).sum(-2) if fused else torch.matmul(p, v)
    y = y.reshape(B, a.nq * D)
    h = x_BH + a.o(y)
    hn = blk.mlp_norm(h)
    if not blk.is_moe:
        return h + blk.mlp(hn), None
    out, idx = _moe(blk.mlp, hn, emask, top_k, expert_path, experts_t)
    return h + out.to(h.dtype), idx


def _moe(mlp, x_TH, emask, top_k: int, expert_path: str, experts_t=None):
    """`MoE.forward` for decoding, with the expert computation picked by `expert_path`; returns (out, expert ids)."""
    idx, w, _ = mlp.route(x_TH, emask, top_k, None, False)
    folded = expert_path == "gemv" and _fold_shared(mlp, x_TH, experts_t)
    if expert_path == "gemv":
        out = _experts_gemv(mlp, x_TH, idx, w, experts_t)
    elif expert_path == "gathered":
        out = mlp._experts_gathered(x_TH, idx, w)
    else:
        out = mlp._experts_sorted(x_TH, idx.flatten(), w.flatten(), count_ids(idx, mlp.num_experts + 1), idx.shape[1])
    if mlp.shared is not None and not folded:
        out = out + mlp.shared(x_TH)
    return out, idx


def _fold_shared(mlp, x_TH, experts_t) -> bool:
    """Whether the gemv takes the shared experts from the copies: on a GPU (one kernel fewer per projection, in a
    launch-bound step) or for one token; a CPU with several tokens runs them faster as one GEMM over the rows."""
    has = experts_t is not None and experts_t[0].shape[0] > mlp.num_experts
    return has and (x_TH.is_cuda or x_TH.shape[0] == 1)


def _experts_gemv(mlp, x_TH, idx_TK, w_TK, experts_t=None):
    """Chosen experts as matrix-vector products written as multiply-and-sum: under torch.compile one reduction
    kernel per projection reads each chosen expert's weights in place (no gathered copy), accumulating in fp32.

    On a CPU the routing slots run one after another (T rows each): torch 2.13's vectorised CPU code miscompiled
    the flat (T * K) form inside the whole compiled decode step (wrong tokens at batch >= 2 with top-k 3, and
    with top-k 2 before its final sum was reshaped; docs/LOG.md session 21). A GPU runs the flat form: one kernel
    per projection for the launch-bound step. experts_t = (w_gate_up, w_down) laid out (E, out, in) makes the
    reduction run over contiguous memory (FastDecoder keeps such copies on a CPU). Copies with more than E experts
    hold the shared experts as extra experts of the same width (`_expert_copies`): every token then also takes
    those, with weight 1, in the same kernels."""
    E = mlp.num_experts
    valid = idx_TK < E
    e_TK = idx_TK.clamp(max=E - 1)
    w_TK = w_TK * valid
    if _fold_shared(mlp, x_TH, experts_t):
        shared = torch.arange(E, experts_t[0].shape[0], device=idx_TK.device).expand(idx_TK.shape[0], -1)
        e_TK = torch.cat([e_TK, shared], 1)
        w_TK = torch.cat([w_TK, torch.ones(shared.shape, dtype=w_TK.dtype, device=w_TK.device)], 1)
    T, K = e_TK.shape
    if x_TH.device.type == "cpu":
        x32, y = x_TH.float(), None
        for k in range(K):
            y_k = _gemv_pairs(mlp, x32, e_TK[:, k], experts_t, x_TH.dtype) * w_TK[:, k, None]
            y = y_k if y is None else y + y_k
        return y.to(x_TH.dtype)
    xs = x_TH.repeat_interleave(K, dim=0).float()  # (N, H)
    y = _gemv_pairs(mlp, xs, e_TK.flatten(), experts_t, x_TH.dtype)
    return (y.view(T, K, -1) * w_TK[:, :, None]).sum(1).to(x_TH.dtype)


def _gemv_pairs(mlp, xs_NH, e_N, experts_t, dtype):
    """Expert e_N[n] applied to row xs_NH[n] (float32 in and out; the activation rounded to `dtype` as in eager)."""
    if experts_t is None:
        h = (xs_NH[:, :, None] * mlp.w_gate_up[e_N].float()).sum(1)  # (N, 2I)
    else:
        h = (xs_NH[:, None, :] * experts_t[0][e_N].float()).sum(-1)
    gate, up = h.chunk(2, dim=-1)
    a = (F.silu(gate) * up).to(dtype).float()
    if experts_t is None:
        return (a[:, :, None] * mlp.w_down[e_N].float()).sum(1)  # (N, H)
    return (a[:, None, :] * experts_t[1][e_N].float()).sum(-1)


def _head_sample(model, x_BH, temperature, top_p, noise, greedy: bool, use_top_p: bool):
    """Final norm, LM head, then a token and its log-probability (see `_sample`)."""
    hidden = model.norm(x_BH)
    logits = ops.linear(hidden, model.head_weight(), None if model.lm_head is None else model.lm_head.bias,
                        model.numerics)
    return _sample(logits.float(), temperature, top_p, noise, greedy, use_top_p)


def _sample(logits_BV, temperature, top_p, noise, greedy: bool, use_top_p: bool):
    """(token, log-prob under logits / temperature), as `generate.sample` defines them; the draw is Gumbel-max on
    uniform `noise` (B, V), which a CUDA graph can hold, restricted to the top-p nucleus when use_top_p."""
    if greedy:
        tok = logits_BV.argmax(-1)
        return tok, torch.log_softmax(logits_BV, -1).gather(1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits_BV / temperature, -1)
    score = logp
    if use_top_p:
        sp, si = logp.sort(-1, descending=True)
        pr = sp.exp()
        keep = pr.cumsum(-1) - pr < top_p
        score = torch.full_like(logp, float("-inf")).scatter(1, si, sp.masked_fill(~keep, float("-inf")))
    tok = (score - torch.log(-torch.log(noise.clamp(1e-20, 1.0)))).argmax(-1)
    return tok, logp.gather(1, tok[:, None])[:, 0]


def _copied_params(mlp) -> list[torch.Tensor]:
    shared = [] if mlp.shared is None else [mlp.shared.gate_up.weight, mlp.shared.down.weight]
    return [mlp.w_gate_up, mlp.w_down, *shared]


def _expert_copies(mlp) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up (E', 2I, H), down (E', H, I)): the expert weights laid out (out, in), so that a matrix-vector
    product reads contiguous rows. When the shared experts have no bias they are appended as E' - E extra experts of
    width I (their SwiGLU splits exactly along the inner dimension), so one kernel computes routed and shared."""
    gate_up = mlp.w_gate_up.detach().transpose(1, 2)
    down = mlp.w_down.detach().transpose(1, 2)
    sh = mlp.shared
    if sh is not None and sh.gate_up.bias is None and sh.down.bias is None and sh.inner % down.shape[2] == 0:
        inner, n = down.shape[2], sh.inner // down.shape[2]
        g, u = sh.gate_up.weight.detach().view(2, n, inner, -1).unbind(0)  # (n, I, H) each
        gate_up = torch.cat([gate_up, torch.cat([g, u], 1)])
        down = torch.cat([down, sh.down.weight.detach().view(-1, n, inner).transpose(0, 1)])
    return gate_up.contiguous(), down.contiguous()


@contextlib.contextmanager
def _inductor_tuning(on: bool):
    """Coordinate-descent tuning of inductor's generated kernels for the compilations made inside (gpt-fast's
    setting for decoding)."""
    if not on:
        yield
        return
    from torch._inductor import config

    with config.patch(coordinate_descent_tuning=True):
        yield


# ------------------------------------------------------------------------------------------ static state
@dataclass
class _State:
    """Static buffers for one (batch bucket, cache bucket)."""

    kv: list[torch.Tensor]  # per layer (B, nkv, L, 2D): keys then values in the last dimension
    key_valid: torch.Tensor  # (B, L) bool: False for left padding
    tok: torch.Tensor  # (B,) the token fed next
    pos: torch.Tensor  # (B,) its position
    step: torch.Tensor  # () index of the token produced next; the fed token is step - 1 and sits at slot
    slot: torch.Tensor  # () cache column of the fed token
    out_tok: torch.Tensor  # (B, L)
    out_lp: torch.Tensor  # (B, L) float32
    done: torch.Tensor  # (B,) bool
    eos: torch.Tensor  # () long
    temperature: torch.Tensor  # () float32
    top_p: torch.Tensor  # () float32
    noise: torch.Tensor | None = None  # (B, V) float32: the uniform noise of the next draw (sampling only)
    prompts: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt bucket P -> (B, P) left-padded ids


class _Graph:
    def __init__(self, rs, knobs, routes, mode):
        self.rs, self.knobs, self.routes, self.mode = rs, knobs, routes, mode
        self.graph = None  # the decode step
        self.prefill: dict[int, torch.cuda.CUDAGraph] = {}  # prompt bucket -> the prefill
        self.prefill_routes: dict[int, dict[int, torch.Tensor]] = {}  # prompt bucket -> layer -> (B, P, K)
        self.emask_add: dict[int, torch.Tensor] = {}  # MoE layer -> (E,) for the Triton kernels
        self.step = None  # the decode step run without a graph: FastDecoder._run_step, or _step for the expert loop


class FastDecoder:
    """Decode engine over a model on a GPU (bf16 weights recommended). Reuse one instance: it caches graphs.

    expert_copies: keep (E + shared, out, in) copies of the expert weights for the gemv path, the shared experts
    split into experts of the routed width (None: when compiling; they double the memory the expert weights take).
    regional (GPU): compile the pieces of a layer once per layer kind (fast to compile, shared by every spec);
    False compiles the whole step once per spec, which lets the compiler fuse across pieces and layers.
    tune (GPU): coordinate-descent tuning of the generated kernels while compiling (slower first call).
    fused_attention: the attention products as multiply-sums fused with the softmax (None: when compiling).
    triton_kernels: decode steps of up to `TRITON_MAX_BATCH` rows run every layer through the hand-written Triton
    kernels of `triton_decode` (six per MoE layer instead of ~21 compiled ones); needs the `triton` package (GPU,
    or its interpreter on a CPU for tests) and the expert copies, which it turns on."""

    def __init__(self, model: ElasticMoE, *, compile: bool = True, cuda_graphs: bool = True,
                 expert_path: str = "auto", batch_buckets=BATCH_BUCKETS, min_cache: int = 128,
                 check_every: int = 16, static_on_cpu: bool = False, expert_copies: bool | None = None,
                 regional: bool = True, tune: bool = False, fused_attention: bool | None = None,
                 triton_kernels: bool = False):
        if expert_path not in ("auto", "sorted", "gathered", "gemv"):
            raise ValueError(f"unknown expert_path {expert_path!r}")
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.static = self.device.type == "cuda" or static_on_cpu
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.expert_path = expert_path
        self.small_path = "gemv" if compile else "gathered"  # what "auto" takes up to `small_pairs` (token, slot) pairs
        # crossovers measured with the model_throughput config: on 2 CPU cores gemv beats the grouped GEMM up to
        # batch 32 x top-2 (642 vs 492 tok/s; at 64 x 2, 787 vs 820), on an H100 up to a handful of pairs
        self.small_pairs = 64 if compile and self.device.type == "cpu" else 8
        self.buckets = tuple(batch_buckets)
        self.min_cache = min_cache
        self.check_every = check_every
        self._states: dict[tuple[int, int], _State] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._noise: dict[int, torch.Tensor] = {}  # batch bucket -> (B, V) noise buffer, shared by its cache buckets
        self.captures = 0  # graphs captured so far (a spec switch to a cached spec adds none)
        # gemv path: the expert weights also held as (E, out, in), made again whenever the model's change
        self._transposed = compile if expert_copies is None else expert_copies
        self.triton = None
        if triton_kernels:
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise UserError("triton_kernels=True off a GPU runs only in Triton's interpreter: set "
                                "TRITON_INTERPRET=1 before the first import of elastic_moe.triton_decode")
            try:
                from elastic_moe import triton_decode
            except ImportError as e:
                raise UserError(f"triton_kernels=True needs the triton package ({e})") from None
            triton_decode.check_model(model)
            self.triton, self._transposed = triton_decode, True
        if compile and self.device.type == "cpu" and not self._transposed:
            # torch 2.13's vectorised CPU code gives wrong results for the gemv reduction over the weights read in
            # place (fused into the decode step; correct without vectorisation or fusion, docs/LOG.md session 5)
            if expert_path == "gemv":
                raise ValueError("expert_path='gemv' compiled on a CPU needs expert_copies=True")
            self.small_path = "gathered"
        if compile and self.device.type == "cpu" and torch_version() < (2, 8) and expert_path == "auto":
            self.small_path = "gathered"  # torch 2.6's inductor fails on the compiled gemv (an internal assertion)
        self.fused_attention = compile if fused_attention is None else fused_attention
        self.tune = tune and compile and self.cuda_graphs
        self._experts_t: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._experts_t_key = None
        self._attn_in, self._attn_out_mlp, self._head = _attn_in, _attn_out_mlp, _head_sample
        self._run_step = self._step
        self._whole_step_compiled = False
        if compile:
            from torch import _dynamo

            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            if self.cuda_graphs and (regional or self.triton):  # one compiled piece per layer kind; the graph
                # removes launches (the Triton kernels run from the eager step)
                self._attn_in = torch.compile(_attn_in, dynamic=False)
                self._attn_out_mlp = torch.compile(_attn_out_mlp, dynamic=False)
                self._head = torch.compile(_head_sample, dynamic=False)
            else:  # the whole step as one compiled call (on a CPU: one guard check per token)
                self._run_step = torch.compile(self._step, dynamic=False)
                self._whole_step_compiled = True
        cfg = model.cfg
        n = cfg.max_position_embeddings
        freqs = torch.arange(n, device=self.device, dtype=torch.float)[:, None] * model.rotary.inv_freq.to(self.device)
        self._cos, self._sin = freqs.cos(), freqs.sin()  # the values Rotary.cos_sin computes

    # ---------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, spec=None, eos_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None, n: int = 1) -> list[Completion]:
        """As `generate.generate`: `n` completions per prompt, prompt-major (here each one is prefilled)."""
        if not self.static:
            return generate(self.model, prompts, params, spec, eos_id, decode, n)
        model, cfg = self.model, self.model.cfg
        if not prompts:
            return []
        check_prompts(prompts, cfg.vocab_size)
        if n < 1:
            raise UserError(f"n = {n} samples per prompt: must be >= 1")
        spec = one_spec(model, spec, len(prompts))
        prompts = [p for p in prompts for _ in range(n)]
        if params.stop_strings and decode is None:
            raise UserError("stop strings need a decode function (a tokenizer)")
        eos_id = cfg.eos_token_id if eos_id is None else eos_id
        longest = max(len(p) for p in prompts)
        total = longest + params.max_new_tokens
        if total > cfg.max_position_embeddings:
            raise UserError(f"prompt of {longest} tokens + {params.max_new_tokens} new exceeds the context of "
                            f"{cfg.max_position_embeddings}")
        was_training = model.training
        model.eval()
        n_real = len(prompts)
        B = _bucket(n_real, self.buckets)
        P = max(16, 1 << (longest - 1).bit_length())  # prompts left-padded to a bucket length too
        L = max(self.min_cache, 1 << (P + params.max_new_tokens - 1).bit_length())
        st = self._state(B, L)
        rs = model.resolve(spec)
        greedy = params.temperature <= 0
        mode = ("greedy" if greedy else "sample", (not greedy) and params.top_p < 1.0, params.return_routes)
        if not greedy and st.noise is None:  # before a capture, which reads it
            st.noise = self._noise.setdefault(B, torch.zeros(B, cfg.vocab_size, device=self.device))
        if self._transposed:  # before a capture, which reads them
            self._refresh_experts_t()
        g = self._graph(st, rs, mode, B, L)

        # the static inputs of the prefill: left-padded prompts, which cache columns are real, the sampling knobs
        st.done.zero_()
        st.out_tok.zero_()
        st.out_lp.zero_()
        st.eos.fill_(eos_id)
        st.temperature.fill_(max(params.temperature, 1e-6))
        st.top_p.fill_(params.top_p)
        rows = prompts + [[cfg.pad_token_id]] * (B - n_real)
        ids = torch.full((B, P), cfg.pad_token_id, dtype=torch.long)
        valid = torch.ones(B, L, dtype=torch.bool)
        for r, p in enumerate(rows):
            ids[r, P - len(p):] = torch.tensor(p)
            valid[r, : P - len(p)] = False
        st.key_valid.copy_(valid)
        prompt = st.prompts.setdefault(P, torch.zeros(B, P, dtype=torch.long, device=self.device))
        prompt.copy_(ids)
        # the noise of every draw is written into a static buffer before the step that reads it, from a generator of
        # this call when seeded: the caller's global RNG is neither reseeded nor advanced by a seeded call
        gen = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        prefill = self._prefill_graph(st, g, P)
        if not greedy:
            torch.rand(st.noise.shape, generator=gen, device=self.device, out=st.noise)
        if prefill is not None:
            prefill.replay()
        else:
            self._prefill(st, g, prompt)
        n_new = params.max_new_tokens
        for s in range(1, n_new):
            if (s - 1) % self.check_every == 0 and s > 1 and bool(st.done[:n_real].all()):
                break
            if not greedy:
                torch.rand(st.noise.shape, generator=gen, device=self.device, out=st.noise)
            if g.graph is not None:
                g.graph.replay()
            else:
                g.step(st, g)
        results = self._collect(st, g, prompts, g.prefill_routes.get(P), P, n_new, eos_id, params, decode)
        model.train(was_training)
        return results

    # --------------------------------------------------------------------------------------- internals
    def _state(self, B: int, L: int) -> _State:
        key = (B, L)
        if key not in self._states:
            cfg, dev = self.model.cfg, self.device
            z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
            kv = [torch.zeros(B, cfg.num_key_value_heads, L, 2 * cfg.dim_head, dtype=self.dtype, device=dev)
                  for _ in range(cfg.num_hidden_layers)]
            self._states[key] = _State(kv, torch.ones(B, L, dtype=torch.bool, device=dev), z(B), z(B), z(), z(),
                                       z(B, L), z(B, L, dtype=torch.float32), z(B, dtype=torch.bool), z(),
                                       z(dtype=torch.float32), z(dtype=torch.float32))
        return self._states[key]

    def _graph(self, st: _State, rs: ResolvedSpec, mode, B: int, L: int) -> _Graph:
        key = (_spec_key(rs), B, L, mode)
        if key in self._graphs:
            return self._graphs[key]
        model, cfg = self.model, self.model.cfg
        knobs = {i: model._moe_knobs(i, rs, None, 1, self.device) for i in rs.layers if model.blocks[i].is_moe}
        routes = None
        if mode[2]:
            routes = {i: torch.full((B, L, rs.top_k[i]), cfg.moe_num_experts, dtype=route_dtype(cfg.moe_num_experts),
                                    device=self.device) for i in knobs}
        g = _Graph(rs, knobs, routes, mode)
        if self._triton_step(B):  # additive expert masks for the router kernel: 0 kept, -inf dropped
            g.emask_add = {i: torch.zeros(cfg.moe_num_experts, device=self.device) if m is None else
                           torch.zeros(m.shape, device=self.device).masked_fill(~m, float("-inf"))
                           for i, (m, _) in knobs.items()}
        sorted_path = any(self._path(B, k) == "sorted" for _, k in knobs.values()) and not self._triton_step(B)
        g.step = self._run_step
        if self._whole_step_compiled and sorted_path and not self._dispatch_on_device():
            g.step = self._step  # the per-expert loop reads group sizes back: no single compiled call holds it
        if self.cuda_graphs and (self._dispatch_on_device() or not sorted_path):  # else each step runs eagerly
            st.slot.fill_(0)  # a valid cache column and step for the warm-up runs
            st.step.fill_(1)
            with _inductor_tuning(self.tune):
                g.graph = self._capture(lambda: self._run_step(st, g))
        self._graphs[key] = g
        return g

    def _prefill_graph(self, st: _State, g: _Graph, P: int):
        """The prefill of prompt bucket P as a CUDA graph (captured on first use; None without graphs). The eager
        forward of a 64-token prompt launches ~1,000 kernels from Python, ~50 ms on an H100 against ~1 ms replayed."""
        if g.mode[2] and P not in g.prefill_routes:
            E = self.model.cfg.moe_num_experts
            g.prefill_routes[P] = {i: torch.full((st.tok.shape[0], P, g.rs.top_k[i]), E, dtype=route_dtype(E),
                                                 device=self.device) for i in g.knobs}
        if not (self.cuda_graphs and self._dispatch_on_device()):
            return None
        if P not in g.prefill:
            g.prefill[P] = self._capture(lambda: self._prefill(st, g, st.prompts[P]))
        return g.prefill[P]

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Warm `fn` up on a side stream (compiles, autotunes, allocates), then capture it as a CUDA graph. `fn` works
        on static buffers only; what the warm-up scribbles on them is reset by every call before use."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        self.captures += 1
        return graph

    def _dispatch_on_device(self) -> bool:
        """Whether the sorted expert dispatch (prefill, large decode batches) stays on the GPU, as a CUDA graph needs:
        the grouped GEMM takes its group sizes as a device tensor, while the per-expert loop (float32 on CUDA, FP8,
        `set_expert_backend("loop")`) reads them back."""
        for i in self.model.moe_layers:
            m = self.model.blocks[i].mlp
            if m.backend == "loop" or (m.backend == "auto" and not ops._grouped_mm_usable(m.w_gate_up, m.w_gate_up,
                                                                                          m.numerics)):
                return False
        return True

    def _prefill(self, st: _State, g: _Graph, ids_BP: torch.Tensor) -> None:
        """The prompt through every kept layer into the static cache (the blocks' own forward, as `model.forward`
        runs them, without its input checks, which read values back from the GPU), then the first token."""
        model = self.model
        B, P = ids_BP.shape
        valid = st.key_valid[:, :P]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        D = model.cfg.dim_head
        cache = KVCache.from_buffers([t[..., :D] for t in st.kv], [t[..., D:] for t in st.kv], st.key_valid)
        for t in st.kv:  # the decode steps attend over every column under a mask: no NaN of an earlier call may stay
            t[:, :, P:].zero_()
        x = model.embed(ids_BP)
        cos, sin = self._cos[positions], self._sin[positions]
        routes = g.prefill_routes.get(P)
        for i in g.rs.layers:
            emask, k = g.knobs.get(i, (None, None))
            x, mo = model.blocks[i](x, cos, sin, cache, mask, emask, k)
            if mo is not None and routes is not None:
                routes[i].copy_(mo.routes.view(B, P, -1))
        greedy, use_top_p = g.mode[0] == "greedy", g.mode[1]
        noise = None if greedy else st.noise
        tok, lp = _head_sample(model, x[:, -1], st.temperature, st.top_p, noise, greedy, use_top_p)
        st.out_tok[:, 0].copy_(tok)
        st.out_lp[:, 0].copy_(lp)
        st.done.copy_(tok == st.eos)
        st.tok.copy_(tok)
        st.pos.copy_(positions[:, -1] + 1)
        st.step.fill_(1)
        st.slot.fill_(P)
        if g.routes is not None:
            for r in g.routes.values():
                r.fill_(model.cfg.moe_num_experts)

    def _refresh_experts_t(self) -> None:
        """Bring the copies of the expert weights up to date (`_expert_copies`). An optimizer step,
        `load_state_dict` or `.to()` changes a parameter's version counter or storage; only then are the copies made
        again (in place when they exist: a captured CUDA graph and the compiled step keep reading the same memory)."""
        moes = [self.model.blocks[i].mlp for i in self.model.moe_layers]
        params = [p for m in moes for p in _copied_params(m)]
        key = tuple((p._version, p.data_ptr()) for p in params)
        if key != self._experts_t_key:
            for i, m in zip(self.model.moe_layers, moes):
                fresh = _expert_copies(m)
                old = self._experts_t.get(i)
                if old is not None and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(old, fresh)):
                    old[0].copy_(fresh[0])
                    old[1].copy_(fresh[1])
                else:
                    self._experts_t[i] = fresh
            self._experts_t_key = key

    def _triton_step(self, B: int) -> bool:
        return self.triton is not None and B <= TRITON_MAX_BATCH

    def _path(self, B: int, k: int | None) -> str:
        if self.expert_path != "auto":
            return self.expert_path
        return self.small_path if B * (k or 1) <= self.small_pairs else "sorted"

    def _step(self, st: _State, g: _Graph) -> None:
        """One decode step on the static buffers (this is what a graph holds)."""
        model = self.model
        x = model.embed(st.tok)  # (B, H)
        cos, sin = self._cos[st.pos], self._sin[st.pos]
        cols = torch.arange(st.key_valid.shape[1], device=self.device)
        ok = st.key_valid & (cols <= st.slot)[None]
        mask_add = torch.zeros(ok.shape, dtype=torch.float32, device=self.device).masked_fill(~ok, float("-inf"))
        slot = st.slot.view(1)
        routes = []
        tri = self.triton if self._triton_step(x.shape[0]) else None
        for i in g.rs.layers:
            blk = model.blocks[i]
            if tri is not None:
                h = tri.attention(blk, x, cos, sin, st.kv[i], st.slot, mask_add)
                if blk.is_moe:  # the kernels write the routes themselves
                    x, _ = tri.moe(blk, h, g.emask_add[i], g.knobs[i][1], self._experts_t[i],
                                   None if g.routes is None else g.routes[i], st.step)
                else:
                    x = h + blk.mlp(blk.mlp_norm(h))
                continue
            q, kv_new = self._attn_in(blk, x, cos, sin)
            st.kv[i].index_copy_(2, slot, kv_new)
            emask, k = g.knobs.get(i, (None, None))
            path = self._path(x.shape[0], k)
            wt = self._experts_t.get(i) if path == "gemv" else None
            x, idx = self._attn_out_mlp(blk, x, q, st.kv[i], mask_add, emask, k, path, wt, self.fused_attention)
            if idx is not None and g.routes is not None:
                routes.append((i, idx))
        greedy, use_top_p = g.mode[0] == "greedy", g.mode[1]
        tok, lp = self._head(model, x, st.temperature, st.top_p, None if greedy else st.noise, greedy, use_top_p)
        step = st.step.view(1)
        for i, idx in routes:
            g.routes[i].index_copy_(1, step - 1, idx.to(g.routes[i].dtype)[:, None])
        st.out_tok.index_copy_(1, step, tok[:, None])
        st.out_lp.index_copy_(1, step, lp[:, None])
        st.done |= tok == st.eos
        st.tok.copy_(tok)
        st.pos += 1
        st.slot += 1
        st.step += 1

    def _collect(self, st, g, prompts, prefill_routes, P, n_new, eos_id, params, decode) -> list[Completion]:
        n = len(prompts)
        toks = st.out_tok[:n, :n_new].cpu().tolist()
        lps = st.out_lp[:n, :n_new].cpu().tolist()
        routes = {i: r[:n].cpu() for i, r in g.routes.items()} if g.routes is not None else None
        pre = {i: r[:n].cpu() for i, r in prefill_routes.items()} if prefill_routes is not None else None
        E = self.model.cfg.moe_num_experts
        results = []
        for r, p in enumerate(prompts):
            c = Completion(list(p))
            for t, lp in zip(toks[r], lps[r]):
                c.tokens.append(t)
                c.logprobs.append(lp)
                if t == eos_id or (params.stop_strings and any(s in decode(c.tokens) for s in params.stop_strings)):
                    c.finish_reason = "stop"
                    break
            if routes is not None:
                c.routes = {}
                for i, rt in routes.items():
                    head = pre[i][r, P - len(p):]
                    gen = rt[r, : max(len(c.tokens) - 1, 0)]
                    last = torch.full((1, rt.shape[-1]), E, dtype=rt.dtype)
                    c.routes[i] = torch.cat([head.to(rt.dtype), gen, last])
            results.append(c)
        return results


def fast_generate(model: ElasticMoE, prompts: list[list[int]], params: SamplingParams, spec=None,
                  eos_id: int | None = None, decode=None, decoder: FastDecoder | None = None) -> list[Completion]:
    """`generate` with the fast engine on a GPU (pass `decoder` to reuse its graph cache), `generate` on a CPU."""
    decoder = decoder or FastDecoder(model)
    return decoder.generate(prompts, params, spec, eos_id, decode)
