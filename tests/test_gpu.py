"""The GPU path: helpers of elastic_moe.gpu (checked on the CPU: FSDP2 over gloo, checkpointing, regional compile)
and the static decode engine (its static-cache logic runs on the CPU too); `gpu`-marked tests need CUDA."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import tiny_model

from elastic_moe import gpu
from elastic_moe.distributed import fsdp2_runs_on_cpu
from elastic_moe.errors import UserError
from elastic_moe.fast_decode import FastDecoder, fast_generate
from elastic_moe.generate import SamplingParams, generate
from elastic_moe.spec import SubModelSpec

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
SPECS = [None, SubModelSpec(layers=3, experts=5, top_k=1)]


def assert_same_completions(a, b, lp_tol=1e-4):
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens and x.finish_reason == y.finish_reason
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < lp_tol
        if x.routes is not None:
            assert sorted(x.routes) == sorted(y.routes)
            for i in x.routes:
                assert torch.equal(x.routes[i], y.routes[i]), i


@pytest.mark.parametrize("path", ["auto", "sorted", "gathered", "gemv", "gemv_copies"])
def test_static_decode_equals_generate(path):
    model = tiny_model()
    copies = path == "gemv_copies"  # the gemv path over (E, out, in) copies of the expert weights
    dec = FastDecoder(model, compile=False, static_on_cpu=True, expert_path=path.removesuffix("_copies"),
                      expert_copies=copies)
    for spec in SPECS:
        p = SamplingParams(max_new_tokens=12, temperature=0, return_routes=True)
        assert_same_completions(generate(model, PROMPTS, p, spec, eos_id=-1), dec.generate(PROMPTS, p, spec, eos_id=-1))


def test_compiled_cpu_decode_step_equals_generate():
    # the CPU fast path: each decode step one compiled call; up to 64 (token, slot) pairs the experts run as
    # matrix-vector products over (E, out, in) copies of their weights, above that as the grouped GEMM (custom op)
    torch.manual_seed(0)
    model = tiny_model()
    dec = FastDecoder(model, compile=True, static_on_cpu=True)
    p = SamplingParams(max_new_tokens=8, temperature=0, return_routes=True)
    many = PROMPTS * 12  # 36 rows (bucket 64) x top-2: the sorted (grouped GEMM) path
    # several rows at top-k 2 and 3: the flat (rows x slots) gemv was miscompiled there (session 21)
    cases = [(PROMPTS, SPECS[1]), (PROMPTS, None), (PROMPTS, SubModelSpec(top_k=3)), (many, None)]
    for prompts, spec in cases:  # one compile each (~20 s with a cold cache)
        assert_same_completions(generate(model, prompts, p, spec, eos_id=-1),
                                dec.generate(prompts, p, spec, eos_id=-1))
    # an optimizer step changes the weights in place: the decoder's copies follow, with no recompilation
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.tensor([PROMPTS[2]])).logits.square().mean().backward()
    opt.step()
    from torch._dynamo.utils import counters

    compiled = dict(counters["stats"])
    assert_same_completions(generate(model, PROMPTS, p, SPECS[1], eos_id=-1),
                            dec.generate(PROMPTS, p, SPECS[1], eos_id=-1))
    assert dict(counters["stats"]) == compiled, "the weight change recompiled the decode step"
    x = torch.randn(5, model.cfg.hidden_size)
    for i, (gu, down) in dec._experts_t.items():
        mlp = model.blocks[i].mlp
        E = mlp.num_experts
        assert torch.equal(gu[:E], mlp.w_gate_up.transpose(1, 2))
        assert torch.equal(down[:E], mlp.w_down.transpose(1, 2))
        # the rows past E are the shared experts split along their inner dimension
        g, u = torch.einsum("th,soh->sto", x, gu[E:]).chunk(2, dim=-1)
        shared = torch.einsum("sti,shi->th", torch.nn.functional.silu(g) * u, down[E:])
        assert gu.shape[0] > E and torch.allclose(shared, mlp.shared(x), atol=1e-5)


def test_compiled_cpu_decode_without_copies_avoids_the_in_place_gemv():
    # torch 2.13's vectorised CPU code miscompiles the gemv over weights read in place (docs/LOG.md, session 5)
    model = tiny_model()
    with pytest.raises(ValueError, match="expert_copies"):
        FastDecoder(model, compile=True, static_on_cpu=True, expert_path="gemv", expert_copies=False)
    dec = FastDecoder(model, compile=True, static_on_cpu=True, expert_copies=False)
    assert dec._path(1, 2) == "gathered" and dec._path(64, 2) == "sorted"


def test_top_k_by_rank_equals_topk():
    # the GPU decode step's top-k (pointwise ops and reductions the compiler fuses) against torch.topk
    from elastic_moe.moe import top_k_by_rank

    s = torch.randn(300, 64)
    s[:, :20] = float("-inf")  # experts outside the sub-model
    s[:5, 20:30] = 0.5  # exact ties go to the lower expert id, as torch.topk's CPU kernel does
    assert torch.equal(top_k_by_rank(s, 6), torch.topk(s, 6).indices)
    assert torch.equal(top_k_by_rank(s[:, :32], 1), s[:, :32].argmax(-1, keepdim=True))


def test_grouped_mm_custom_op_gradients_match_eager():
    from elastic_moe import ops

    if not ops.grouped_mm_available("cpu"):
        pytest.skip(f"torch {torch.__version__} has no CPU torch._grouped_mm")
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 4, requires_grad=True)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    ref = torch._grouped_mm(x, w, offs=offs)
    gx, gw = torch.autograd.grad(ref.square().sum(), (x, w))
    out = ops._grouped_mm_cpu_op(x, w, offs)
    hx, hw = torch.autograd.grad(out.square().sum(), (x, w))
    assert torch.equal(out, ref) and torch.allclose(gx, hx) and torch.allclose(gw, hw)
    # a compiled float32 backward traces the op's backward too: it must not reach the bf16-only shape rule
    f = torch.compile(lambda a, b: ops._grouped_mm_any(a, b, offs).square().sum(), backend="aot_eager")
    cx, cw = torch.autograd.grad(f(x, w), (x, w))
    assert torch.allclose(gx, cx) and torch.allclose(gw, cw)


def test_static_decode_stops_at_eos_and_caches_per_spec():
    model = tiny_model()
    dec = FastDecoder(model, compile=False, static_on_cpu=True)
    p = SamplingParams(max_new_tokens=10, temperature=0, return_routes=True)
    free = generate(model, PROMPTS, p, eos_id=-1)
    eos = free[0].tokens[3]
    assert_same_completions(generate(model, PROMPTS, p, eos_id=eos), dec.generate(PROMPTS, p, eos_id=eos))
    assert dec.generate(PROMPTS, p, eos_id=eos)[0].finish_reason == "stop"
    n = len(dec._graphs)
    for spec in SPECS + SPECS:
        dec.generate(PROMPTS, p, spec, eos_id=-1)
    assert len(dec._graphs) == n + 1  # one new entry for the sub-model, none on switching back


def test_static_decode_sampling_is_seeded_and_reports_logprobs():
    model = tiny_model()
    dec = FastDecoder(model, compile=False, static_on_cpu=True)
    p = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    a, b = dec.generate(PROMPTS, p, eos_id=-1), dec.generate(PROMPTS, p, eos_id=-1)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    # the reported log-probs are those of the sampled tokens under logits / temperature (as `generate` reports)
    c = a[0]
    with torch.no_grad():
        logits = model(torch.tensor([c.prompt + c.tokens])).logits[0, len(c.prompt) - 1:-1].float()
    ref = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
    assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)


def test_fast_generate_falls_back_to_generate_on_cpu():
    model = tiny_model()
    p = SamplingParams(max_new_tokens=6, temperature=0)
    assert_same_completions(generate(model, PROMPTS, p, eos_id=-1), fast_generate(model, PROMPTS, p, eos_id=-1))


def test_activation_checkpointing_same_grads_and_keys():
    x = torch.randint(3, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = tiny_model().train()
        keys = list(model.state_dict())
        if ckpt:
            gpu.apply_activation_checkpointing(model)
            assert list(model.state_dict()) == keys
        loss, _ = model.loss(x, x)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if ckpt:
            gpu.remove_activation_checkpointing(model)
            assert "forward" not in model.blocks[0].__dict__
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_lm_loss_fn_equals_model_loss():
    model = tiny_model().train()
    x = torch.randint(3, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, _ = model.loss(x, x)
    got, out = gpu.lm_loss_fn(model, compile=False)(x, x)
    assert out.logits is None and torch.allclose(ref, got, atol=1e-6)


def test_fused_adamw_on_cpu_is_plain_adamw():
    model = tiny_model()
    opt = gpu.fused_adamw(model.parameters(), lr=1e-3)
    assert not opt.defaults["fused"]


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_share_graphs():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # bf16: the fake-tensor rule of torch._grouped_mm (what compile traces with) accepts only bf16
    model = tiny_model(num_hidden_layers=6).to(torch.bfloat16).train()
    model.set_expert_backend("grouped_mm")
    x = torch.randint(3, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, _ = model.loss(x, x)
    gpu.compile_blocks(model, backend="aot_eager")
    got, _ = model.loss(x, x)
    got.backward()
    assert torch.allclose(ref, got, atol=1e-5)
    n = counters["stats"]["unique_graphs"]
    assert n <= 2  # one dense and one MoE layer graph serve all six layers
    model.loss(x, x, spec=SubModelSpec(layers=4))  # fewer layers: no new graph
    assert counters["stats"]["unique_graphs"] == n
    gpu.uncompile_blocks(model)


def test_compiled_blocks_run_the_hooks_of_the_model_they_belong_to():
    """A second model compiled in the same process reuses the first one's graphs; its own forward hooks (the
    pre-training run's expert-importance hooks) must run, not those the graphs were traced with."""
    x = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(2):
        model = gpu.compile_blocks(tiny_model().train(), backend="aot_eager")
        calls = torch.zeros(())

        def count(module, args, output, calls=calls):
            calls.add_(1.0)

        model.moe(model.moe_layers[0]).register_forward_hook(count)
        model.loss(x, x)
        seen.append(float(calls))
    assert seen == [1.0, 1.0]


def test_compiled_blocks_with_expert_importance_hooks_share_one_graph_per_layer_kind():
    """The expert-importance hook is one function for every MoE layer: with hook guards on, a closure per layer
    would give each layer a graph of its own (and a deep model would run past dynamo's recompile limit)."""
    from torch._dynamo.utils import counters

    from elastic_moe.elastic import ElasticConfig, Importance

    torch._dynamo.reset()
    counters.clear()
    model = gpu.compile_blocks(tiny_model(num_hidden_layers=5).train(), backend="aot_eager")
    importance = Importance(model, ElasticConfig(expert_policy="importance"))
    x = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    model.loss(x, x)
    assert counters["stats"]["unique_graphs"] == 2  # one dense layer graph, one MoE layer graph for the four
    for i in model.moe_layers:  # each layer's router probabilities, summed over its 16 tokens, in its own counter
        assert abs(float(importance.mass[i].sum()) - 16.0) < 1e-5
    importance.remove_hooks()
    assert not hasattr(model.moe(model.moe_layers[0]), "routing_mass")


def test_compiled_blocks_take_a_dynamic_sequence_length_without_graph_breaks():
    """A second sequence length makes dynamo compile the layers with a symbolic length, which SDPA's is_causal
    (a plain bool) cannot take: the layer then broke into pieces around attention."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = gpu.compile_blocks(tiny_model().train(), backend="aot_eager", dynamic=None)
    for S in (8, 12, 16):
        x = torch.randint(3, 101, (2, S), generator=torch.Generator().manual_seed(S))
        model.loss(x, x)[0].backward()
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]


def test_compiled_blocks_train_under_ddp_with_per_sequence_sub_models(tmp_path):
    """The pre-training step under torchrun: DDP around the model, layers compiled, a layer's row count changing
    from step to step. Dynamo's DDP graph splitting (at 1 MB, DDP's first bucket) failed on those dynamic shapes."""
    import random

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from elastic_moe.train import Rows, TrainForward

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_model(vocab_size=512, hidden_size=128, moe_intermediate_size=128).train()
        gpu.compile_blocks(model, backend="aot_eager", dynamic=None)
        root = DistributedDataParallel(TrainForward(model))
        rng = random.Random(0)
        for step in range(4):  # a MoE layer holds ~1.7 MB of weights
            specs = [SubModelSpec() if rng.random() < 0.5 else
                     SubModelSpec(layers=rng.choice([2, 3]), experts=rng.choice([None, 4, 6]), top_k=rng.choice([None, 1]))
                     for _ in range(4)]
            x = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(step))
            logits, _, touch = root(x, Rows(specs))
            (logits.float().logsumexp(-1).mean() + touch).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_fsdp2_refuses_a_bf16_cast_model_with_a_clear_error():
    with pytest.raises(UserError, match="mix bfloat16, float32; shard the float32 model"):
        gpu.apply_fsdp2(tiny_model().to(torch.bfloat16))


def _fsdp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = tiny_model().train()
        for per_block in (False, True):
            m = tiny_model().train()
            gpu.apply_fsdp2(m, gpu.init_mesh("cpu"), per_block=per_block, param_dtype=None, reduce_dtype=None)
            x = torch.randint(3, 101, (2, 16), generator=torch.Generator().manual_seed(rank))
            loss, _ = m.loss(x, x)
            loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.grad is not None}
            if rank == 0:
                torch.save(grads, f"{result_file}.{int(per_block)}")
        del model
        dist.barrier()  # no rank tears gloo down while the other still has a collective in flight (an abort, 1 in ~12)
    finally:
        dist.destroy_process_group()
    # and none runs the interpreter's teardown: a native thread still joinable there aborted a rank ("terminate
    # called without an active exception") about 1 time in 25 even after the barrier
    os._exit(0)


def test_fsdp2_wrapping_on_cpu_gloo_averages_gradients(tmp_path):
    if not fsdp2_runs_on_cpu():  # a clear error instead
        with pytest.raises(UserError, match="FSDP2 on a CPU needs torch >= 2.9"):
            gpu.apply_fsdp2(tiny_model())
        pytest.skip(f"torch {torch.__version__} cannot run FSDP2 on a CPU")
    world = 2
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "grads")), nprocs=world, join=True)
    model = tiny_model().train()
    for r in range(world):  # FSDP averages the ranks' gradients
        x = torch.randint(3, 101, (2, 16), generator=torch.Generator().manual_seed(r))
        loss, _ = model.loss(x, x)
        (loss / world).backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for per_block in (0, 1):
        got = torch.load(tmp_path / f"grads.{per_block}")
        assert got.keys() == ref.keys()
        for n in ref:
            assert torch.allclose(got[n], ref[n], atol=1e-5), (per_block, n)


# ------------------------------------------------------------------------------------------------ CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_cuda_graph_decode_matches_generate():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model().cuda()  # float32: the same tokens as `generate`, not just close ones
    model.set_expert_backend("loop")
    dec = FastDecoder(model, compile=False)  # 4 rows x top-2: the gathered expert path
    p = SamplingParams(max_new_tokens=16, temperature=0, return_routes=True)
    for spec in SPECS:
        assert_same_completions(generate(model, PROMPTS, p, spec, eos_id=-1), dec.generate(PROMPTS, p, spec, eos_id=-1),
                                lp_tol=1e-3)
    assert dec.captures == 2  # the decode step per spec; float32 experts loop on the host, so the prefill runs eagerly


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("regional", [True, False])
def test_compiled_cuda_graph_decode_matches_generate(regional):
    # compiled step: gemv experts over the copies (shared experts folded in), fused attention, rank top-k
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model().cuda()
    model.set_expert_backend("loop")
    dec = FastDecoder(model, regional=regional, tune=not regional)
    p = SamplingParams(max_new_tokens=16, temperature=0, return_routes=True)
    for spec in SPECS + SPECS:
        assert_same_completions(generate(model, PROMPTS, p, spec, eos_id=-1), dec.generate(PROMPTS, p, spec, eos_id=-1),
                                lp_tol=1e-3)
    assert dec.captures == 2


@pytest.mark.gpu
@cuda
def test_bf16_prefill_and_steps_replayed_equal_eager():
    # bf16 with the grouped GEMM: the prefill is captured too; replays compute what the same kernels compute eagerly
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs sm90")
    model = tiny_model().cuda().to(torch.bfloat16)
    model.set_expert_backend("grouped_mm")
    graphs, eager = FastDecoder(model, compile=False), FastDecoder(model, compile=False, cuda_graphs=False)
    p = SamplingParams(max_new_tokens=16, temperature=0, return_routes=True)
    for spec in SPECS:
        assert_same_completions(eager.generate(PROMPTS, p, spec, eos_id=-1), graphs.generate(PROMPTS, p, spec, eos_id=-1),
                                lp_tol=1e-6)
    assert graphs.captures == 4 and eager.captures == 0  # per spec: the decode step and the 16-token prompt bucket


@pytest.mark.gpu
@cuda
def test_fp8_scaled_mm_matches_emulation():
    from elastic_moe import ops

    if not ops._scaled_mm_ok():
        pytest.skip("no FP8 matmul on this GPU")
    a = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16) * 0.02
    real = ops._fp8_scaled_mm(a, w).float()
    emu = ops.fake_quant_fp8(a.float()) @ ops.fake_quant_fp8(w.float().t()).t()
    assert ((real - emu).norm() / emu.norm()).item() < 1e-2


@pytest.mark.gpu
@cuda
def test_compiled_bf16_training_step_runs():
    model = tiny_model().cuda().to(torch.bfloat16).train()
    model.set_expert_backend("grouped_mm" if torch.cuda.get_device_capability() >= (9, 0) else "loop")
    gpu.compile_blocks(model)
    opt = gpu.fused_adamw(model.parameters(), lr=1e-4)
    x = torch.randint(3, 101, (2, 64), device="cuda")
    for _ in range(2):
        loss, _ = model.loss(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU guard")
def test_triton_kernels_off_a_gpu_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="TRITON_INTERPRET=1"):
        FastDecoder(tiny_model(hidden_size=64), compile=False, static_on_cpu=True, triton_kernels=True)


def test_gpu_report_fills_skipped_sections_from_a_second_run():
    # benchmarks/gpu_throughput.py --report-only --fill-from: only sections the run skipped are filled, and a filled
    # sub-model's speed-up is taken against its own run's full-model figure
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_throughput as gt

    from elastic_moe.config import ModelConfig
    from elastic_moe.model import ElasticMoE

    def run(decode, errors, device="H100"):
        return {"device": device, "torch": "2.11", "best_b1_expert_path": "triton", "decode": decode, "errors": errors}

    R = run({"ours_b1_triton": {"tok_s": 100.0}}, {"ours_sub_b1": "skipped: 63s left"})
    second = run({"ours_b1_triton": {"tok_s": 90.0}, "ours_sub_b1": {"tok_s": 135.0}, "ours_b64": {"tok_s": 5.0}}, {})
    with pytest.raises(SystemExit, match="A100"):
        gt.fill_decode(R, run({}, {}, device="A100"))
    gt.fill_decode(R, second)
    assert sorted(R["decode"]) == ["ours_b1_triton", "ours_sub_b1"] and R["errors"] == {}
    assert R["decode"]["ours_sub_b1"]["reference_tok_s"] == 90.0
    cfg = ModelConfig(**gt.TINY)
    S = gt.summarize(R, cfg, ElasticMoE(cfg), float("nan"))
    assert S["subnet"]["b1"]["speedup"] == pytest.approx(1.5)
    assert S["decode_b1_tok_s"] == 100.0 and S["bandwidth_frac_b1"] is None
