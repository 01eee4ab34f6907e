"""On-policy distillation: the OPD losses on a tiny model against the exact reverse KL from full logits, teacher
routing by domain, teachers with another tokenizer / chat template / EOS refused, and one trainer step."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from elastic_moe.errors import UserError
from elastic_moe.opd import (
    OPDLossConfig,
    OPDTrainer,
    Teachers,
    TokenizerIdentity,
    check_compatible,
    load_teachers,
    opd_loss,
    response_hidden,
)
from elastic_moe.rl.kl import reverse_kl_from_logits
from elastic_moe.rollout import RolloutEngine, RolloutParams

PROMPTS = [[5, 17, 33, 42, 9], [7, 8], [11, 12, 13]]
RESPONSES = [[3, 4, 5, 6], [9], [20, 21, 22, 23, 24, 25]]
PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_kl(student, teacher, prompts, responses, temperature=1.0):
    """Reference: KL(student || teacher) from full logits / T of each sequence run alone, per response token."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        zs = student(ids).logits[0, len(p) - 1:len(p) + len(r) - 1]
        zt = teacher(ids).logits[0, len(p) - 1:len(p) + len(r) - 1]
        out.append(reverse_kl_from_logits(zs / temperature, zt / temperature))
    return torch.cat(out)


def _two_teachers():
    return Teachers({"a": tiny_model(seed=1), "b": tiny_model(seed=2)}, {"reasoning": "a", "code": "b"}, fallback="b")


def test_response_hidden_matches_single_sequence_logits():
    model = tiny_model()
    h, resp, mask = response_hidden(model, PROMPTS, RESPONSES, PAD)
    assert h.shape[:2] == resp.shape == mask.shape == (3, 6)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ref = model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
        got = h[b, :len(r)] @ model.head_weight().T
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert resp[b, :len(r)].tolist() == r and int(mask[b].sum()) == len(r)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_full_opd_loss_equals_exact_kl_with_two_teachers(chunk):
    student, teachers = tiny_model(seed=0), _two_teachers()
    domains = ["reasoning", "code", "agent"]  # agent -> fallback b
    loss, stats = opd_loss(student, teachers, PROMPTS, RESPONSES, domains, OPDLossConfig("full", chunk_size=chunk), PAD)
    models = [teachers.models[n] for n in teachers.route(domains)]
    exact = torch.cat([_exact_kl(student, t, [p], [r]) for t, p, r in zip(models, PROMPTS, RESPONSES)])
    torch.testing.assert_close(loss, exact.mean(), atol=1e-5, rtol=1e-5)
    assert stats["n_tokens"] == sum(map(len, RESPONSES))
    # the mean KL of each domain's tokens, whichever teacher graded it
    for b, d in enumerate(domains):
        own = _exact_kl(student, models[b], [PROMPTS[b]], [RESPONSES[b]]).mean()
        assert stats[f"kl/{d}"] == pytest.approx(float(own.detach()), abs=1e-5)
    # gradients reach the student only
    loss.backward()
    assert student.embed.weight.grad is not None
    assert all(p.grad is None for t in teachers.models.values() for p in t.parameters())


def test_full_opd_gradient_matches_autograd_through_full_logits():
    s1, s2, teacher = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=3)
    teachers = Teachers({"t": teacher}, {}, fallback="t")
    loss, _ = opd_loss(s1, teachers, PROMPTS, RESPONSES, ["x"] * 3, OPDLossConfig("full", chunk_size=3), PAD)
    loss.backward()
    _exact_kl(s2, teacher, PROMPTS, RESPONSES).mean().backward()
    for (k, a), b in zip(s1.named_parameters(), s2.parameters()):
        if b.grad is not None:  # float32 summation order differs: tolerance on the scale of the largest entry
            scale = max(1.0, b.grad.abs().max().item())
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5 * scale, rtol=1e-4, msg=k)


def test_topk_with_full_vocab_equals_exact_and_smaller_k_is_a_lower_bound():
    student, teachers = tiny_model(seed=0), _two_teachers()
    domains = ["reasoning", "code", "code"]
    V = student.cfg.vocab_size
    full, _ = opd_loss(student, teachers, PROMPTS, RESPONSES, domains, OPDLossConfig("full"), PAD)
    topv, _ = opd_loss(student, teachers, PROMPTS, RESPONSES, domains, OPDLossConfig("topk", topk=V, chunk_size=5), PAD)
    top4, _ = opd_loss(student, teachers, PROMPTS, RESPONSES, domains, OPDLossConfig("topk", topk=4), PAD)
    torch.testing.assert_close(topv, full, atol=1e-5, rtol=1e-5)
    assert float(top4.detach()) <= float(full.detach()) + 1e-6


def test_sampled_opd_is_the_k1_estimate_and_its_gradient_is_the_reinforce_form():
    student, teacher = tiny_model(seed=0), tiny_model(seed=4)
    teachers = Teachers({"t": teacher}, {}, fallback="t")
    loss, stats = opd_loss(student, teachers, PROMPTS, RESPONSES, ["x"] * 3, OPDLossConfig("sampled"), PAD)
    # k1 per token: log pi_s(y) - log pi_t(y) on the given tokens
    lps, lpt = [], []
    for p, r in zip(PROMPTS, RESPONSES):
        ids = torch.tensor([p + r])
        y = torch.tensor(r)
        for m, acc in ((student, lps), (teacher, lpt)):
            z = m(ids).logits[0, len(p) - 1:len(p) + len(r) - 1]
            acc.append(torch.log_softmax(z.float(), -1).gather(1, y[:, None])[:, 0])
    k1 = (torch.cat(lps) - torch.cat(lpt)).detach()
    assert stats["kl"] == pytest.approx(float(k1.mean()), abs=1e-5)
    # on-policy PPO with advantage -k1 (ratio 1): loss value = mean(k1), gradient = mean(k1 * grad log pi_s)
    assert float(loss.detach()) == pytest.approx(float(k1.mean()), abs=1e-5)
    loss.backward()
    g_opd = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    (k1 * torch.cat(lps)).mean().backward()
    assert g_opd
    for k, p in student.named_parameters():
        if k in g_opd:
            torch.testing.assert_close(g_opd[k], p.grad, atol=2e-4, rtol=1e-3)  # batched vs one-by-one forwards


@pytest.mark.parametrize("kind", ["full", "topk", "sampled"])
def test_loss_is_taken_at_the_sampling_temperature_and_matches_the_rollout(kind):
    T = 0.6
    student, teacher = tiny_model(seed=0), tiny_model(seed=4)
    teachers = Teachers({"t": teacher}, {}, fallback="t")
    batch = RolloutEngine(student).rollout(PROMPTS, RolloutParams(group_size=1, max_new_tokens=6, temperature=T,
                                                                  return_routes=False), seed=0, eos_id=-1)
    prompts, responses = [s.prompt for s in batch.samples], [s.tokens for s in batch.samples]
    cfg = OPDLossConfig(kind, topk=student.cfg.vocab_size)  # top-k at k = V is the exact KL
    loss, stats = opd_loss(student, teachers, prompts, responses, ["x"] * 3, cfg, PAD, temperature=T,
                           rollout_logp=[s.logprobs for s in batch.samples])
    assert stats["mismatch/k3"] < 1e-9  # the student's log-probs in the loss are the ones it sampled with
    if kind != "sampled":
        torch.testing.assert_close(loss.detach(), _exact_kl(student, teacher, prompts, responses, T).mean(),
                                   atol=1e-5, rtol=1e-5)
    _, at_one = opd_loss(student, teachers, prompts, responses, ["x"] * 3, cfg, PAD,
                         rollout_logp=[s.logprobs for s in batch.samples])
    assert at_one["mismatch/k3"] > 1e-3  # scored at T = 1, the same samples are off-policy, and the metric shows it


def test_teacher_routing_by_domain_with_fallback():
    t = Teachers({"r": None, "c": None, "sft": None}, {"reasoning": "r", "code": "c"}, fallback="sft")
    assert t.route(["code", "reasoning", "open_ended", "agent"]) == ["c", "r", "sft", "sft"]
    with pytest.raises(UserError, match="no teacher for domain 'agent'"):
        Teachers({"r": None}, {"reasoning": "r"}).route(["agent"])


def _ckpt(tmp_path, name, tok, model=None, template_edit=None):
    from elastic_moe.checkpoint import save_checkpoint

    tok_dir = tmp_path / f"{name}_tok"
    tok.save(tok_dir)
    if template_edit is not None:
        conf = json.loads((tok_dir / "tokenizer_config.json").read_text())
        conf["chat_template"] = template_edit(conf["chat_template"])
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(conf))
    model = model or tiny_model(vocab_size=tok.vocab_size)
    return save_checkpoint(tmp_path / name, model, tokenizer_dir=tok_dir)


def _tok(seed_texts):
    from elastic_moe.tokenizer import Tokenizer

    return Tokenizer.train(seed_texts, vocab_size=300)


def test_mismatched_teachers_are_rejected_with_one_line(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 20
    tok = _tok(texts)
    student = _ckpt(tmp_path, "student", tok)
    same = _ckpt(tmp_path, "same", tok)
    other_tok = _ckpt(tmp_path, "other_tok", _tok(["def f(x): return x * 2 + 1 # code"] * 20))
    other_tpl = _ckpt(tmp_path, "other_tpl", tok, template_edit=lambda s: s + " ")
    teachers = load_teachers({"reasoning": str(same)}, student_dir=student)
    assert list(teachers.models) == [str(same)]
    for bad, what in ((other_tok, "tokenizer differs"), (other_tpl, "chat template differs")):
        with pytest.raises(UserError, match=what) as e:
            load_teachers({"reasoning": str(bad)}, student_dir=student)
        assert "\n" not in str(e.value)
    ident = TokenizerIdentity.of_checkpoint(student)
    with pytest.raises(UserError, match="end-of-sequence token"):
        check_compatible(ident, TokenizerIdentity(ident.fingerprint, ident.chat_template, 99, ident.vocab_rows), "x")


def test_a_failed_verification_gives_its_group_no_reward_term():
    teachers = Teachers({"t": tiny_model(seed=5)}, {}, fallback="t")
    batch = RolloutEngine(tiny_model(seed=0)).rollout(PROMPTS[:2], RolloutParams(group_size=2, max_new_tokens=4,
                                                      return_routes=False), seed=0, eos_id=-1)
    after = []
    for rewards in ([None, 1.0, 0.0, 1.0], [0.5, 0.5, 0.0, 1.0]):  # a failed group, or one with equal rewards
        student = tiny_model(seed=0)
        opt = torch.optim.SGD(student.parameters(), lr=1.0)
        tr = OPDTrainer(student, teachers, OPDLossConfig("full", reward_coef=1.0), opt, PAD, group_size=2)
        assert tr.step(batch.samples, ["x"] * 4, rewards)["skipped"] == 0
        after.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(after[0], after[1])


def test_trainer_step_lowers_the_kl_on_the_same_samples():
    student, teacher = tiny_model(seed=0).train(), tiny_model(seed=5)
    teachers = Teachers({"t": teacher}, {}, fallback="t")
    eng = RolloutEngine(student)
    batch = eng.rollout(PROMPTS, RolloutParams(group_size=2, max_new_tokens=5, return_routes=False), seed=0, eos_id=-1)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    tr = OPDTrainer(student, teachers, OPDLossConfig("full"), opt, PAD)
    first = tr.step(batch.samples, ["x"] * len(batch.samples))
    for _ in range(4):
        last = tr.step(batch.samples, ["x"] * len(batch.samples))
    assert first["skipped"] == 0 and tr.version == 5
    assert last["kl"] < first["kl"]


def test_a_damaged_stage_checkpoint_is_refused_in_one_line_on_resume(tmp_path):
    """The loop state of the checkpoint a stage (OPD, general RL) resumes from is checked before it is unpickled: a
    damaged trainer.pt is named as such, not reported by torch.load's traceback."""
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.opd import LOOP_STATE, resume_point

    ckpt = save_checkpoint(tmp_path / "stage" / "checkpoints" / "step_00000001", tiny_model(),
                           extra={LOOP_STATE: lambda p: torch.save({"step": 1}, p)})
    assert resume_point(tmp_path / "stage", "init")[1] == {"step": 1}
    (ckpt / LOOP_STATE).write_bytes((ckpt / LOOP_STATE).read_bytes()[:100])
    with pytest.raises(UserError, match=r"is corrupt: checksum mismatch on trainer.pt$"):
        resume_point(tmp_path / "stage", "init")
