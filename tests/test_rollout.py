"""Rollout engine: group sampling, log-probs and routes as the trainer recomputes them, R3 replay, weight sync,
length-aware batching, bad inputs (prompts too long for the context, non-finite weights or logits), the static-cache
decoder's input checks and recovery, and rollout seeds."""

from __future__ import annotations

import pytest
import torch
from helpers import small_tokenizer, tiny_model

from elastic_moe import ops
from elastic_moe.errors import UserError
from elastic_moe.grpo_trainer import policy_logp
from elastic_moe.rl.mismatch import route_set_flips
from elastic_moe.rollout import NonFiniteError, RolloutEngine, RolloutParams, check_fit, collate

PROMPTS = [[5, 17, 33, 42, 9], [7, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [3, 4, 5]]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_groups_logprobs_and_routes():
    model = tiny_model()
    eng = RolloutEngine(model)
    p = RolloutParams(group_size=3, max_new_tokens=6, temperature=1.0, batch_size=7)
    b = eng.rollout(PROMPTS, p, seed=1, eos_id=-1)
    assert len(b.samples) == 12 and b.groups == [0, 1, 2, 3] and not b.skipped
    assert [s.group for s in b.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # group-major, prompt order
    assert b.stats["rollout/calls"] == 2  # 4 prompts x 3 samples in calls of at most 7 sequences (2 prompts)
    for s in b.samples:
        assert s.prompt == PROMPTS[s.group] and len(s.tokens) == 6 == len(s.logprobs) and s.truncated
        assert s.version == 0
        assert set(s.routes) == set(model.moe_layers)
        for r in s.routes.values():
            assert r.dtype == torch.uint8 and r.shape == (len(s.prompt) + 6, model.cfg.moe_k)
            assert (r[-1] == model.cfg.moe_num_experts).all() and (r[:-1] < model.cfg.moe_num_experts).all()
    # seeded: the same call gives the same samples; the G samples of a prompt differ
    b2 = eng.rollout(PROMPTS, p, seed=1, eos_id=-1)
    assert [s.tokens for s in b.samples] == [s.tokens for s in b2.samples]
    assert len({tuple(s.tokens) for s in b.samples[:3]}) > 1


def flat_logp(model, samples, temperature):
    """Reference: every sample alone, its whole sequence through the model without a cache."""
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt + s.tokens])
        logits = model(ids).logits[0, len(s.prompt) - 1:-1].float() / temperature
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(s.tokens)[:, None])[:, 0])
    return out


def test_trainer_recompute_matches_rollout_and_replay_equals_recompute():
    """Unified numerics: the trainer's shared-prefix forward reproduces the engine's log-probs and routes; replaying
    the rollout's routes (R3) gives exactly the recompute when the routes agree."""
    model = tiny_model()
    eng = RolloutEngine(model)
    b = eng.rollout(PROMPTS, RolloutParams(group_size=2, max_new_tokens=8, temperature=0.7), seed=0, eos_id=-1)
    tb = collate(b.samples, 0, model.cfg.moe_num_experts)
    assert tb.prompt_ids.shape[0] == len(PROMPTS) and tb.response_ids.shape[0] == 2 * len(PROMPTS)
    with torch.no_grad():
        own = policy_logp(model, tb, 0.7, replay=False)
        rep = policy_logp(model, tb, 0.7, replay=True)
    m = tb.mask_BT
    assert torch.allclose(own.logp_BT[m], tb.rollout_logp_BT[m], atol=1e-4)
    pred = tb.rollout_pred_routes()
    for i in model.moe_layers:
        assert not route_set_flips(own.own_routes[i][m][None], pred[i][m][None]).any()
        assert torch.equal(rep.own_routes[i], own.own_routes[i])  # the probe sees the router's own choice
    assert torch.allclose(rep.logp_BT, own.logp_BT, atol=1e-6)


def test_shared_prefix_forward_equals_per_sample_forward_with_gradients():
    """One prompt pass for a group (KV cache with grad) gives the log-probs and gradients of running every sample's
    whole sequence on its own, with prompts of different lengths and responses that stop early."""
    model = tiny_model().train()
    eng = RolloutEngine(model)
    p = RolloutParams(group_size=3, max_new_tokens=5)
    eos = eng.rollout(PROMPTS, p, seed=4, eos_id=-1).samples[0].tokens[2]  # same seed: sample 0 stops at its 3rd
    b = eng.rollout(PROMPTS, p, seed=4, eos_id=eos)
    assert len({len(s.tokens) for s in b.samples}) > 1
    tb = collate(b.samples, 0, model.cfg.moe_num_experts)
    po = policy_logp(model, tb, 0.9)
    po.logp_BT[tb.mask_BT].sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = flat_logp(model, b.samples, 0.9)
    torch.cat(ref).sum().backward()
    for j, r in enumerate(ref):
        assert torch.allclose(po.logp_BT[j, :len(r)], r, atol=1e-5)
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert (grads[k] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max(), k  # fp32 summation order only
    sub = tb.rows(torch.tensor([4, 0, 5]))  # a subset keeps only the prompts it uses
    assert sub.prompt_ids.shape[0] == 2 and sub.prompt_of.tolist() == [1, 0, 1]
    with torch.no_grad():
        assert torch.allclose(policy_logp(model, sub, 0.9).logp_BT, po.logp_BT[[4, 0, 5]].detach(), atol=1e-5)


def test_replay_follows_the_given_routes():
    """Replaying other routes changes the log-probs (the replay is used), and the router still gets gradients."""
    model = tiny_model()
    b = RolloutEngine(model).rollout(PROMPTS[:2], RolloutParams(group_size=2, max_new_tokens=5), eos_id=-1)
    tb = collate(b.samples, 0, model.cfg.moe_num_experts)
    E = model.cfg.moe_num_experts
    for routes in (tb.prompt_routes, tb.response_routes):
        for i, r in routes.items():
            routes[i] = torch.where(r < E, (r.long() + 1) % E, r.long()).to(r.dtype)
    model.train()
    rep = policy_logp(model, tb, 1.0, replay=True)
    with torch.no_grad():
        own = policy_logp(model, tb, 1.0, replay=False)
    assert not torch.allclose(rep.logp_BT, own.logp_BT, atol=1e-4)
    rep.logp_BT[tb.mask_BT].sum().backward()
    assert model.moe(model.moe_layers[0]).router.grad.abs().sum() > 0


def test_weight_sync_and_versions():
    model = tiny_model()
    eng = RolloutEngine(model, ops.Numerics("bf16"))
    assert eng.model is not model and eng.model.numerics.precision == "bf16" and model.numerics.precision == "fp32"
    p = RolloutParams(group_size=2, max_new_tokens=4, temperature=0)
    before = eng.rollout(PROMPTS[:1], p, eos_id=-1).samples[0].tokens
    other = tiny_model(seed=3)
    eng.load_weights(other.state_dict(), version=5)
    b = eng.rollout(PROMPTS[:1], p, eos_id=-1)
    assert b.version == 5 and all(s.version == 5 for s in b.samples)
    assert b.samples[0].tokens != before
    bad = {k: v.clone() for k, v in other.state_dict().items()}
    bad["embed.weight"][3, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        eng.load_weights(bad, version=6)
    assert eng.version == 5


def test_prompt_too_long_is_skipped_and_counted():
    model = tiny_model(max_position_embeddings=32)
    eng = RolloutEngine(model)
    prompts = [[5, 6, 7], list(range(3, 3 + 30)), [8, 9]]
    b = eng.rollout(prompts, RolloutParams(group_size=2, max_new_tokens=4), eos_id=-1)
    assert b.skipped == [1] and b.groups == [0, 2] and b.stats["rollout/skipped_prompts"] == 1
    assert [s.group for s in b.samples] == [0, 0, 2, 2]


def test_nan_logits_stop_the_rollout():
    model = tiny_model()
    eng = RolloutEngine(model)
    with torch.no_grad():
        eng.model.norm.weight.fill_(float("nan"))  # corrupt the engine's copy behind load_weights' back
    with pytest.raises(NonFiniteError):
        eng.rollout(PROMPTS[:2], RolloutParams(group_size=2, max_new_tokens=3), eos_id=-1)


def test_finished_sequences_stop_early():
    """A sequence that emits EOS stops (finish 'stop'), while the others go on to their budget."""
    model = tiny_model()
    eng = RolloutEngine(model)
    greedy = eng.rollout(PROMPTS[:1], RolloutParams(group_size=2, max_new_tokens=6, temperature=0), eos_id=-1)
    eos = greedy.samples[0].tokens[2]  # make the third greedy token of prompt 0 the end of sequence
    b = eng.rollout(PROMPTS[:2], RolloutParams(group_size=2, max_new_tokens=6, temperature=0), eos_id=eos)
    s0 = b.samples[0]
    assert s0.finish_reason == "stop" and s0.tokens[-1] == eos and len(s0.tokens) <= 3
    assert s0.routes[model.moe_layers[0]].shape[0] == len(s0.prompt) + len(s0.tokens)
    tb = collate(b.samples, 0, model.cfg.moe_num_experts)
    assert tb.mask_BT.sum(1).tolist() == [len(s.tokens) for s in b.samples] and tb.prompt_of.tolist() == [0, 0, 1, 1]
    assert tb.truncated_B.tolist() == [s.truncated for s in b.samples]


def test_sampled_accuracy_is_seeded_and_per_task():
    from elastic_moe.rollout import evaluate_accuracy
    from elastic_moe.tasks import get_suite

    tok = small_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=1024)
    tasks = get_suite("reasoning", "test", 5, seed=0)
    greedy = evaluate_accuracy(model, tok, tasks, 6)
    assert greedy["n"] == 5 and all(a in (0.0, 1.0) for a in greedy["per_task"])
    a = evaluate_accuracy(model, tok, tasks, 6, samples=4, temperature=1.0, seed=3)
    assert a == evaluate_accuracy(model, tok, tasks, 6, samples=4, temperature=1.0, seed=3)  # seeded
    assert all(4 * x == int(4 * x) for x in a["per_task"])
    assert len(a["per_task"]) == 5 and a["accuracy"] == sum(a["per_task"]) / 5


class _AllRight:
    def score(self, tasks, texts):
        return [1.0] * len(texts), [True] * len(texts), {}


def test_sampled_accuracy_counts_every_sample():
    from elastic_moe.rollout import evaluate_accuracy
    from elastic_moe.tasks import get_suite

    tok = small_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=1024)
    res = evaluate_accuracy(model, tok, get_suite("reasoning", "test", 3, seed=0), 4, samples=3, temperature=0.7,
                            scorer=_AllRight())
    assert res["accuracy"] == 1.0 and res["per_task"] == [1.0, 1.0, 1.0] and res["n"] == 3


def test_fast_decode_engine_matches_generate_engine():
    """The engine's FastDecoder path (the GPU default; here its static-cache code without graphs) gives what
    `generate` gives greedily, and its sampled log-probs and routes are what the trainer recomputes."""
    model = tiny_model()
    slow, fast = RolloutEngine(model, fast_decode=False), RolloutEngine(model, fast_decode=True)
    assert slow.decoder is None and fast.decoder is not None
    greedy = RolloutParams(group_size=2, max_new_tokens=6, temperature=0)
    a, b = slow.rollout(PROMPTS, greedy, eos_id=-1), fast.rollout(PROMPTS, greedy, eos_id=-1)
    for x, y in zip(a.samples, b.samples, strict=True):
        assert x.tokens == y.tokens and x.group == y.group and x.finish_reason == y.finish_reason
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-4
        assert all(torch.equal(x.routes[i], y.routes[i]) for i in x.routes)
    p = RolloutParams(group_size=2, max_new_tokens=8, temperature=0.7)
    s1, s2 = fast.rollout(PROMPTS, p, seed=3, eos_id=-1), fast.rollout(PROMPTS, p, seed=3, eos_id=-1)
    assert [s.tokens for s in s1.samples] == [s.tokens for s in s2.samples]  # seeded
    tb = collate(s1.samples, 0, model.cfg.moe_num_experts)
    with torch.no_grad():
        own = policy_logp(model, tb, 0.7, replay=False)
    assert torch.allclose(own.logp_BT[tb.mask_BT], tb.rollout_logp_BT[tb.mask_BT], atol=1e-4)
    with torch.no_grad():
        fast.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError):
        fast.rollout(PROMPTS[:2], p, eos_id=-1)


def test_check_fit_names_the_setting_when_a_prompt_and_its_new_tokens_exceed_the_context():
    from elastic_moe.rollout import check_fit

    check_fit([[1] * 10, [1] * 30], 34, 64, "rollout.max_new_tokens")  # 30 + 34 = 64 fits
    with pytest.raises(UserError, match=r"^rollout.max_new_tokens = 35: with the longest prompt \(30 tokens\) it "
                                        r"exceeds the model's context of 64 tokens; lower it$"):
        check_fit([[1] * 10, [1] * 30], 35, 64, "rollout.max_new_tokens")


def test_weight_sync_refuses_a_tensor_of_another_shape_before_copying_anything():
    # before: copy_ broadcast a (1,) tensor over a (H,) one silently, and a shape that does not broadcast raised a
    # RuntimeError half-way, leaving the engine with some new weights under the old version
    from elastic_moe.errors import UserError
    from elastic_moe.rollout import RolloutEngine

    model = tiny_model()
    eng = RolloutEngine(model)
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    for bad in (torch.ones(1), torch.ones(5)):
        sd = {k: v * 2 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        sd["norm.weight"] = bad
        with pytest.raises(UserError, match="norm.weight"):
            eng.load_weights(sd, 4)
        assert eng.version == 0
        assert all(torch.equal(v, before[k]) for k, v in eng.model.state_dict().items())


@pytest.mark.parametrize("prompt", [[500, 3], [-1, 3]])
def test_fast_decoder_refuses_token_ids_outside_the_vocabulary_as_generate_does(prompt):
    # before: the static-cache prefill skipped the model's input checks: an IndexError traceback
    from elastic_moe.errors import UserError
    from elastic_moe.fast_decode import FastDecoder
    from elastic_moe.generate import SamplingParams, generate

    model = tiny_model()
    with pytest.raises(UserError, match="vocabulary"):
        generate(model, [prompt], SamplingParams(3))
    with pytest.raises(UserError, match="vocabulary"):
        FastDecoder(model, compile=False, static_on_cpu=True).generate([prompt], SamplingParams(3))


def test_fast_decoder_takes_a_list_of_equal_specs_and_refuses_differing_ones_as_generate_does():
    # before: AttributeError ('list' object has no attribute 'layers')
    from elastic_moe.errors import UserError
    from elastic_moe.fast_decode import FastDecoder
    from elastic_moe.generate import SamplingParams, generate
    from elastic_moe.spec import SubModelSpec

    model = tiny_model()
    fd = FastDecoder(model, compile=False, static_on_cpu=True)
    p = SamplingParams(4, temperature=0)
    s = SubModelSpec(top_k=1)
    same = fd.generate([[1, 3], [4, 5, 6]], p, [s, s])
    assert [c.tokens for c in same] == [c.tokens for c in generate(model, [[1, 3], [4, 5, 6]], p, s)]
    for decode in (fd.generate, lambda *a: generate(model, *a)):
        with pytest.raises(UserError, match="one spec"):
            decode([[1, 3], [4, 5, 6]], p, [s, None])


def test_fast_decoder_recovers_after_a_call_with_non_finite_weights():
    # before: the static KV cache kept the NaN keys / values of the bad call in the columns a later call masks out,
    # and the masked attention (0 * NaN) made every later call NaN: one bad step poisoned the engine for good
    from elastic_moe.fast_decode import FastDecoder
    from elastic_moe.generate import SamplingParams

    model = tiny_model()
    fd = FastDecoder(model, compile=False, static_on_cpu=True)
    p = SamplingParams(6, temperature=0)
    good = fd.generate([[1, 2, 3]], p)[0]
    w = model.blocks[0].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(float("nan"))
    assert all(x != x for x in fd.generate([[1, 2, 3]], p)[0].logprobs)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.copy_(w)
    again = fd.generate([[1, 2, 3]], p)[0]
    assert again.tokens == good.tokens and again.logprobs == good.logprobs


def test_samples_of_one_prompt_routed_differently_keep_their_own_prompt_routes():
    from elastic_moe.rollout import Sample, collate

    def sample(prompt_experts: int, version: int) -> Sample:
        routes = {1: torch.tensor([[prompt_experts, 0]] * 3 + [[2, 3]] * 2, dtype=torch.uint8)}
        return Sample(0, [5, 6, 7], [8, 9], [-0.5, -0.25], "length", version, routes)

    same = collate([sample(1, 0), sample(1, 0)], pad_id=0, num_experts=4)
    assert same.prompt_ids.shape[0] == 1 and same.prompt_of.tolist() == [0, 0]
    # two weight versions routed the prompt differently (async RL): R3 must replay each one's own prompt routes
    tb = collate([sample(1, 0), sample(2, 1), sample(1, 0)], pad_id=0, num_experts=4)
    assert tb.prompt_ids.shape[0] == 2 and tb.prompt_of.tolist() == [0, 1, 0]
    assert tb.prompt_routes[1][:, :, 0].tolist() == [[1, 1, 1], [2, 2, 2]]
    pred = tb.rollout_pred_routes()[1]
    assert pred[:, 0, 0].tolist() == [1, 2, 1]
    assert collate([sample(1, 0), sample(2, 1)], 0, 4, with_routes=False).prompt_ids.shape[0] == 1


def test_two_run_seeds_sample_differently_at_the_same_step_and_seed_0_as_before():
    from elastic_moe.rl_train import rollout_seed, rollout_step

    assert [rollout_seed(0, s) for s in range(5)] == list(range(5))  # committed seed-0 results still reproduce
    assert len({rollout_seed(seed, s) for seed in range(4) for s in range(50)}) == 200
    model = tiny_model()
    eng = RolloutEngine(model)
    params = RolloutParams(group_size=4, max_new_tokens=8)

    def tokens(seed: int, step: int):
        batch, _ = rollout_step(eng, model, 0, [PROMPTS[0]], ["task"], step, 1, seed, params, -1)
        return [s.tokens for s in batch.samples]

    eng.load_weights(model.state_dict(), 0)
    before = [s.tokens for s in eng.rollout([PROMPTS[0]], params, seed=3, eos_id=-1).samples]  # what seed=step gave
    assert tokens(0, 3) == before
    assert tokens(1, 3) != tokens(0, 3)  # one task: the same prompt at step 3, so only the sampling seed differs
    assert tokens(1, 3) == tokens(1, 3)  # and a pure function of (seed, step): resume repeats it


def test_a_prompt_that_exactly_fills_the_context_with_its_budget_is_sampled():
    """Catches `len(prompt) + max_new_tokens < context` in RolloutEngine.fits: check_fit accepts such a prompt, so the
    engine must not skip it (a run would silently train on a subset of its tasks)."""
    model = tiny_model(max_position_embeddings=32)
    prompt = list(range(3, 3 + 28))
    check_fit([prompt], 4, 32, "rl.max_new_tokens")  # accepted
    b = RolloutEngine(model).rollout([prompt, list(range(3, 3 + 29))], RolloutParams(group_size=2, max_new_tokens=4),
                                     eos_id=-1)
    assert b.groups == [0] and b.skipped == [1]
    assert all(len(s.tokens) == 4 for s in b.samples)
