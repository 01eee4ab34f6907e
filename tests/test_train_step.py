"""The pieces of a pre-training step: the sandwich objective, gradient accumulation and clipping, weight
decay groups, held-out evaluation, the teacher of in-place distillation, and the balancing bias moved every step."""

import math
from contextlib import nullcontext

import pytest
import torch
from helpers import micro_config, tiny_model, write_micro_toml, write_synthetic_corpus

from elastic_moe import distributed
from elastic_moe import train as train_mod
from elastic_moe.elastic import FULL
from elastic_moe.metrics import read_metrics
from elastic_moe.tomlconfig import load_config
from elastic_moe.train import TrainConfig, evaluate, objective, train

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = micro_config({"model.num_hidden_layers": 3, "data.heldout_frac": 0.1, "train.max_steps": 2,
                      "train.batch_size": 4, "train.save_every": 0, "eval.every": 0, "eval.max_batches": 1})


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_step")
    corpus = write_synthetic_corpus(root / "corpus", docs=60, max_lines=30)
    return write_micro_toml(root / "micro.toml", MICRO, corpus, root / "cache")


def micro(toml, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, toml, list(overrides))


def test_accumulated_micro_batches_give_the_gradient_of_the_bigger_batch(toml, tmp_path):
    """With grad_accum micro-batches each micro-batch's loss is divided by grad_accum, so the summed gradient (and
    its logged norm) is that of one batch grad_accum times bigger, not grad_accum times larger."""
    common = ("train.max_steps=1", "elastic.p_full=1.0", "optim.grad_clip=0.0")
    train(micro(toml, *common), tmp_path / "big", log=lambda _: None)
    train(micro(toml, *common, "train.batch_size=2", "train.grad_accum=2"), tmp_path / "acc", log=lambda _: None)
    big, acc = read_metrics(tmp_path / "big")[0], read_metrics(tmp_path / "acc")[0]
    assert acc["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
    assert acc["loss"] == pytest.approx(big["loss"], rel=1e-5)


def test_clip_grad_norm_returns_the_norm_before_clipping_and_clips_to_max_norm():
    """distributed.clip_grad_norm scales the gradients down to max_norm (and leaves them as they are with 0)."""
    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    before = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters()))
    assert distributed.clip_grad_norm(model, 0.5) == pytest.approx(before)
    after = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters()))
    assert after == pytest.approx(0.5, rel=1e-4)
    assert distributed.clip_grad_norm(model, 0.0) == pytest.approx(after)
    assert all(torch.allclose(p.grad, p.grad.new_full(p.shape, 2.0 * 0.5 / before)) for p in model.parameters())


def test_sandwich_objective_distils_the_detached_largest_group_into_the_others():
    """Sandwich: loss = mean over groups of their cross-entropy + w * mean KL(largest || other group), with the
    largest group's logits detached (its gradient comes from its cross-entropy only)."""
    torch.manual_seed(0)
    G, B, S, V = 3, 2, 4, 7
    logits = torch.randn(G * B, S, V, requires_grad=True)
    y = torch.randint(0, V, (B, S)).repeat(G, 1)
    loss, parts = objective(logits, y, [None] * (G * B), G, 0.5)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(G * B, S)
    t = logits[:B].detach().log_softmax(-1)
    s = logits[B:].view(G - 1, B, S, V).log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    torch.testing.assert_close(loss, ce.mean() + 0.5 * kl)
    torch.testing.assert_close(parts["kl"][0], kl.double().detach())
    loss.backward()
    ce_only = torch.autograd.grad(ce.mean(), logits)[0]
    torch.testing.assert_close(logits.grad[:B], ce_only[:B])  # no distillation gradient into the teacher rows


def test_sandwich_groups_see_the_same_sequences(toml, tmp_path, monkeypatch):
    """Under the sandwich scheme the G sub-models of a step train on the same B sequences: row g * B + b of the
    repeated batch is sequence b for every group g (the KL between groups compares the same inputs)."""
    seen = []
    real = train_mod.objective

    def spy(logits, y, specs, groups, *a, **kw):
        seen.append((y.clone(), groups))
        return real(logits, y, specs, groups, *a, **kw)

    monkeypatch.setattr(train_mod, "objective", spy)
    train(micro(toml, "train.max_steps=1", "elastic.scheme='sandwich'", "elastic.distill_weight=0.5"),
          tmp_path / "sw", log=lambda _: None)
    (y, groups), = seen
    assert groups > 1
    per_group = y.view(groups, -1, y.shape[-1])
    assert all(torch.equal(per_group[0], per_group[g]) for g in range(1, groups))
    assert not torch.equal(per_group[0][0], per_group[0][1])


def test_in_place_distillation_teacher_is_the_detached_full_model_in_eval_mode(toml, tmp_path, monkeypatch):
    """Per-sample distillation: the teacher logits come from a forward of the full model without autograd and in
    eval mode (no expert-load counting, so the router balancing sees only the training rows)."""
    from elastic_moe.model import ElasticMoE

    teachers, modes = [], []
    real_objective, real_forward = train_mod.objective, ElasticMoE.forward

    def spy_objective(logits, y, specs, groups, distill_weight, teacher=None, **kw):
        teachers.append(teacher)
        return real_objective(logits, y, specs, groups, distill_weight, teacher, **kw)

    def spy_forward(self, x, spec=None, *a, **kw):
        if spec is None:  # the full model's forwards: the teacher's (and a reorder's, also under no_grad)
            modes.append((self.training, torch.is_grad_enabled()))
        return real_forward(self, x, spec, *a, **kw)

    monkeypatch.setattr(train_mod, "objective", spy_objective)
    monkeypatch.setattr(ElasticMoE, "forward", spy_forward)
    train(micro(toml, "train.max_steps=2", "elastic.distill_weight=0.5", "elastic.p_full=0.25",
                "elastic.layer_policy='random'", "elastic.expert_policy='random'"), tmp_path / "kd", log=lambda _: None)
    got = [t for t in teachers if t is not None]
    assert got and all(not t.requires_grad and t.grad_fn is None for t in got)
    assert modes and all(m == (False, False) for m in modes), modes


def test_evaluation_is_the_mean_token_loss_in_eval_mode_and_leaves_the_loads_alone():
    """train.evaluate: the mean held-out cross-entropy per token of each sub-model, in eval mode (no expert-load
    counting that would steer the router bias), with the model back in train mode afterwards."""
    model = tiny_model().train()
    torch.manual_seed(1)
    batches = [(torch.randint(0, 101, (2, 6)), torch.randint(0, 101, (2, 6))) for _ in range(2)]
    loads = [model.moe(i).load.clone() for i in model.moe_layers]
    got = evaluate(model, model, batches, [FULL], distributed.Dist(), False, nullcontext)
    assert model.training
    assert all(torch.equal(model.moe(i).load, ld) for i, ld in zip(model.moe_layers, loads))
    model.eval()
    with torch.no_grad():
        ce = [torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum")
              for x, y in batches]
    (name, value), = got.items()
    assert value == pytest.approx(float(sum(ce)) / 24, rel=1e-5)


def test_weight_decay_applies_to_matrices_only_not_to_norms_biases_or_routers():
    """make_optimizer: optim.weight_decay on the 2-D weight matrices (embeddings, projections, experts); none on
    norm weights, biases, the balancing bias or the routers."""
    from elastic_moe.train import OptimConfig, make_optimizer

    model = tiny_model()
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and not name.endswith("router")), name
    assert any(name.endswith("router") for name, _ in model.named_parameters())
    assert any(p.ndim == 1 for p in model.parameters())


def test_each_step_moves_the_router_bias_toward_balance(toml, tmp_path):
    """Aux-loss-free balancing in the loop: every optimizer step moves each MoE layer's selection bias by
    +-router_bias_rate (or 0) from its expert loads; rate 0 leaves it at zero."""
    from elastic_moe.checkpoint import load_checkpoint

    for rate in (0.01, 0.0):
        run = tmp_path / f"rate{rate}"
        train(micro(toml, "train.max_steps=2", f"train.router_bias_rate={rate}"), run, log=lambda _: None)
        model, _ = load_checkpoint(run)
        biases = torch.cat([model.moe(i).bias for i in model.moe_layers])
        if rate:
            assert biases.abs().max() > 0 and biases.abs().max() <= 2 * rate + 1e-7
            assert torch.allclose(biases / rate, (biases / rate).round(), atol=1e-4)
        else:
            assert not biases.any()
