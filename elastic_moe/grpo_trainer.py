"""GRPO for domain experts: the policy update and reward scoring.

Separate pieces, so that a synchronous loop (`rl_train`) or an asynchronous controller (`async_rl`) can drive them:

    batch = engine.rollout(prompt_ids, rollout_params, seed=step)           # rollout.RolloutEngine
    rewards, correct, info = scorer.score([tasks[s.group] for s in batch.samples], texts)
    metrics = trainer.step(batch, rewards)                                  # GRPOTrainer: one optimizer step
    engine.load_weights(trainer.model.state_dict(), trainer.version)        # weight sync

`GRPOTrainer.step`: group-relative advantages; groups whose rewards are all equal (no signal) or that hold an
infrastructure failure (reward None) are dropped, truncated samples masked; then token-level PPO with separate
low/high clip, truncated importance sampling against the rollout log-probs, an optional KL penalty to a frozen
reference (k1/k2/k3; the reference routes with its own router). With R3 on, every policy forward (old log-prob
recompute and policy update) replays the experts the rollout engine routed each position to. Every step reports
the training-inference mismatch over the batch's tokens (rl.mismatch: K3/K1 KL(rollout||trainer), |dlogp|,
extreme-token fraction, router flips per layer and per token): on samples from the current weight version as
`mismatch/*` (the engine alone), on older ones as `offpolicy/*` (engine + staleness), with `staleness/*` the version
lag. Non-finite losses or gradients skip the update (counted).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elastic_moe import ops
from elastic_moe.checkpoint import load_optimizer_state
from elastic_moe.errors import UserError, require
from elastic_moe.model import ElasticMoE, KVCache
from elastic_moe.moe import route_dtype
from elastic_moe.rl.grpo import group_advantages, grpo_loss, zero_variance_groups
from elastic_moe.rl.mismatch import mismatch_metrics
from elastic_moe.rollout import RolloutBatch, TrainBatch, collate

# ----------------------------------------------------------------------------------------------------- config


@dataclass
class GRPOConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0  # > 0: penalty to the frozen initial policy
    kl_kind: str = "k3"  # k1 | k2 | k3
    tis_cap: float = 2.0  # truncated importance sampling against rollout log-probs; 0: off
    tis_mode: str = "truncate"  # truncate | mask
    scale_by_std: bool = True
    drop_zero_variance: bool = True
    mask_truncated: bool = True  # samples that hit max_new_tokens get no loss
    r3: bool = True  # Rollout Router Replay
    ppo_epochs: int = 1
    minibatches: int = 1  # optimizer steps per epoch
    micro_batch: int = 0  # sequences per forward/backward (gradient accumulation); 0: the whole minibatch
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean
    extreme_tau: float = 2.0  # mismatch: tokens with |dlogp| > ln tau are "extreme"

    def validate(self) -> None:
        checks = [
            (0 <= self.clip_low < 1 and self.clip_high >= 0, "grpo.clip_low must be in [0, 1), clip_high >= 0"),
            (self.kl_kind in ("k1", "k2", "k3"), f"grpo.kl_kind = {self.kl_kind!r}: expected k1, k2 or k3"),
            (self.kl_coef >= 0, "grpo.kl_coef must be >= 0"),
            (self.tis_cap >= 0, "grpo.tis_cap must be >= 0 (0: off)"),
            (self.tis_mode in ("truncate", "mask"), f"grpo.tis_mode = {self.tis_mode!r}: expected truncate or mask"),
            (self.ppo_epochs >= 1 and self.minibatches >= 1 and self.micro_batch >= 0,
             "grpo.ppo_epochs and grpo.minibatches must be >= 1, micro_batch >= 0"),
            (self.agg in ("token-mean", "seq-mean-token-mean"), f"grpo.agg = {self.agg!r}"),
            (self.extreme_tau > 1, "grpo.extreme_tau must be > 1"),
        ]
        require(checks)


@dataclass
class NumericsConfig:
    """One op library for both sides. unified: the rollout engine runs exactly the trainer's ops; mismatch: it runs
    rollout_precision / rollout_kernel (another precision or another kernel library)."""

    mode: str = "unified"  # unified | mismatch
    precision: str = "fp32"  # the trainer's (and the rollout's when unified): fp32 | bf16 | fp8
    kernel: str = "default"  # default | split
    fp8_scaling: str = "row"
    rollout_precision: str = "bf16"
    rollout_kernel: str = "default"

    def validate(self) -> None:
        if self.mode not in ("unified", "mismatch"):
            raise UserError(f"numerics.mode = {self.mode!r}: expected unified or mismatch")
        try:
            self.trainer(), self.rollout()
        except ValueError as e:
            raise UserError(f"numerics: {e}") from None

    def trainer(self) -> ops.Numerics:
        return ops.Numerics(self.precision, self.fp8_scaling, self.kernel)

    def rollout(self) -> ops.Numerics:
        if self.mode == "unified":
            return self.trainer()
        return ops.Numerics(self.rollout_precision, self.fp8_scaling, self.rollout_kernel)


# ------------------------------------------------------------------------------------------------ scoring


class FunctionScorer:
    """Rewards from a Python function fn(task, text) -> float (or a Verdict). A call that raises or runs past
    `timeout_s` gives reward None (an infrastructure failure: the sample's group is dropped, never scored 0).
    A hung call is abandoned in a daemon thread; verifiers that may hang or crash belong in the RewardPool."""

    def __init__(self, fn: Callable, timeout_s: float = 10.0):
        self.fn, self.timeout_s = fn, timeout_s
        self.errors = self.timeouts = 0

    def score(self, tasks: Sequence, texts: Sequence[str]) -> tuple[list[float | None], list[bool], dict]:
        rewards: list[float | None] = []
        correct: list[bool] = []
        errors0, timeouts0 = self.errors, self.timeouts
        for task, text in zip(tasks, texts):
            box: list = []

            def call(task=task, text=text, box=box):
                try:
                    box.append(("ok", self.fn(task, text)))
                except Exception as e:  # noqa: BLE001 - any failure of the reward function is reported, not raised
                    box.append(("error", e))

            th = threading.Thread(target=call, daemon=True)
            th.start()
            th.join(self.timeout_s)
            if not box:
                self.timeouts += 1
                rewards.append(None)
                correct.append(False)
                continue
            kind, value = box[0]
            if kind == "error":
                self.errors += 1
                rewards.append(None)
                correct.append(False)
                continue
            reward = getattr(value, "reward", value)
            ok = bool(getattr(value, "correct", reward is not None and reward >= 1.0))
            if reward is not None and not math.isfinite(float(reward)):
                self.errors += 1
                reward = None
            rewards.append(None if reward is None else float(reward))
            correct.append(ok)
        return rewards, correct, {"reward/errors": self.errors - errors0, "reward/timeouts": self.timeouts - timeouts0}

    def close(self) -> None:
        pass


class PoolScorer:
    """Rewards from the task verifiers on a RewardPool (worker processes, killed on timeout)."""

    def __init__(self, pool):
        self.pool = pool

    def score(self, tasks: Sequence, texts: Sequence[str]) -> tuple[list[float | None], list[bool], dict]:
        verdicts = self.pool.score(list(tasks), list(texts))
        info = {"reward/errors": sum(v.status == "error" for v in verdicts),
                "reward/timeouts": sum(v.status == "timeout" for v in verdicts)}
        return [v.reward for v in verdicts], [v.correct for v in verdicts], info

    def close(self, wait: bool = True) -> None:
        self.pool.close(wait)


# -------------------------------------------------------------------------------------------- the trainer


class RouteProbe:
    """While a forward replays given routes, records which experts each MoE router would have chosen by itself
    (the router flips that R3 hides). Hooks the MoE input; the router is cheap next to the experts."""

    def __init__(self, model: ElasticMoE, layers: Sequence[int]):
        self.routes: dict[int, torch.Tensor] = {}
        self._handles = [model.moe(i).register_forward_pre_hook(self._hook(i)) for i in layers]

    def _hook(self, layer: int):
        def hook(moe, args):
            x, emask, top_k, routes = args[:4]
            with torch.no_grad():
                logits = F.linear(x.float(), moe.router.float())
                if emask is not None:
                    logits = logits.masked_fill(~emask, float("-inf"))
                scores = F.softmax(logits, dim=-1) + moe.bias
                if emask is not None:
                    scores = scores.masked_fill(~emask, float("-inf"))
                k = routes.shape[1] if routes is not None else (top_k if isinstance(top_k, int) or top_k is None else top_k.shape[1])
                k = moe.top_k if k is None else k
                self.routes[layer] = torch.topk(scores, k, dim=-1).indices.to(route_dtype(moe.num_experts))

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class PolicyOutput:
    logp_BT: torch.Tensor  # log-probs of the response tokens under logits / temperature (0 off the mask)
    entropy_BT: torch.Tensor | None  # detached
    own_routes: dict[int, torch.Tensor]  # MoE layer -> (B, R, K): the trainer router's own choice at the position
    # that predicts each response token (TrainBatch.rollout_pred_routes' layout)


def policy_logp(model: ElasticMoE, tb: TrainBatch, temperature: float, spec=None, replay: bool = False,
                want_entropy: bool = False, want_routes: bool = True) -> PolicyOutput:
    """Log-probs of the response tokens of `tb` under `model` (with grad when enabled). Each distinct prompt runs
    once, filling a KV cache (with grad) that its samples' responses then attend to, so a group of G samples costs
    one prompt instead of G. The LM head runs only where a response token is predicted. replay: feed the rollout's
    routes (R3) to both forwards."""
    U, P = tb.prompt_ids.shape
    B, R = tb.response_ids.shape
    dev = next(model.parameters()).device
    cache = KVCache(model.cfg, U, P + R, device=dev, dtype=next(model.parameters()).dtype)
    valid = torch.arange(P, device=dev)[None, :] >= (P - tb.prompt_len.to(dev))[:, None]
    cache.key_valid[:, :P] = valid
    pos_p = (valid.long().cumsum(-1) - 1).clamp(min=0)
    pos_r = tb.prompt_len.to(dev)[tb.prompt_of][:, None] + torch.arange(R, device=dev)[None, :]
    replay = replay and tb.prompt_routes is not None
    own: dict[int, list[torch.Tensor]] = {}
    for ids, pos, routes in ((tb.prompt_ids, pos_p, tb.prompt_routes), (tb.response_ids, pos_r, tb.response_routes)):
        probe = RouteProbe(model, list(routes)) if replay and want_routes else None
        try:
            out = model(ids.to(dev), spec, routes=routes if replay else None, cache=cache, positions=pos,
                        return_routes=want_routes and not replay, return_logits=False, track_load=False)
        finally:
            if probe is not None:
                probe.close()
        for i, r in (probe.routes if probe is not None else out.routes).items():
            own.setdefault(i, []).append(r.view(ids.shape[0], ids.shape[1], -1))
        if ids is tb.prompt_ids:
            h_last = out.hidden[:, -1]
            cache.select_rows(tb.prompt_of.to(dev))  # each sample continues its prompt's cache
    h_pred = torch.cat([h_last[tb.prompt_of.to(dev)][:, None], out.hidden[:, :-1]], 1)  # (B, R, H)
    mask = tb.mask_BT.to(dev)
    bias = None if model.lm_head is None else model.lm_head.bias
    logits = ops.linear(h_pred[mask], model.head_weight(), bias, model.numerics).float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_NV = torch.log_softmax(logits, -1)
    logp_N = logp_NV.gather(1, tb.response_ids.to(dev)[mask][:, None])[:, 0]
    logp_BT = torch.zeros(mask.shape, dtype=logp_N.dtype, device=dev).masked_scatter(mask, logp_N)
    ent_BT = None
    if want_entropy:
        with torch.no_grad():
            ent_N = -(logp_NV.exp() * logp_NV).sum(-1)
            ent_BT = torch.zeros(mask.shape, dtype=ent_N.dtype, device=dev).masked_scatter(mask, ent_N)
    pred = {i: torch.cat([p[tb.prompt_of.to(dev), -1:], r[:, :-1]], 1) for i, (p, r) in own.items()}
    return PolicyOutput(logp_BT, ent_BT, pred)


def batch_mismatch(tb: TrainBatch, trainer_logp_BT: torch.Tensor, own_routes: dict[int, torch.Tensor],
                   rows: torch.Tensor, tau: float) -> dict[str, float]:
    """rl.mismatch metrics over the response tokens of `rows` (bool (B,)); router flips compare the rollout's
    recorded experts with the trainer router's own choice at the positions that predict response tokens."""
    m = tb.mask_BT & rows[:, None]
    rr = ro = None
    layers = sorted(own_routes) if tb.prompt_routes is not None else []
    if layers:
        pred = tb.rollout_pred_routes()
        rr = torch.stack([pred[i][m] for i in layers])
        ro = torch.stack([own_routes[i][m].to(rr.dtype) for i in layers])
    out = mismatch_metrics(tb.rollout_logp_BT, trainer_logp_BT, m, rr, ro, tau=tau)
    for j, i in enumerate(layers):  # name the per-layer rates by model layer id
        out[f"router_flip_rate/layer{i}"] = out.pop(f"router_flip_rate_layer{j}")
    return out


class GRPOTrainer:
    """The policy side of GRPO: owns the model (trainer numerics), the optimizer and the weight version."""

    def __init__(self, model: ElasticMoE, optimizer: torch.optim.Optimizer, cfg: GRPOConfig, temperature: float = 1.0,
                 spec=None, ref_model: ElasticMoE | None = None, pad_id: int | None = None, grad_clip: float = 1.0,
                 lr_fn: Callable[[int], float] | None = None):
        cfg.validate()
        if cfg.kl_coef > 0 and ref_model is None:
            raise UserError("grpo.kl_coef > 0 needs a reference policy, and none was given")
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.temperature, self.spec, self.ref_model = temperature, spec, ref_model
        self.pad_id = model.cfg.pad_token_id if pad_id is None else pad_id
        self.grad_clip, self.lr_fn = grad_clip, lr_fn
        self.version = 0  # optimizer steps taken: the weight version the rollout engine syncs to
        self.nonfinite_skips = 0

    # one optimizer step on a scored rollout batch
    def step(self, batch: RolloutBatch, rewards: Sequence[float | None]) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg, G = self.cfg, batch.group_size
        samples = batch.samples
        if len(rewards) != len(samples):
            raise ValueError(f"{len(rewards)} rewards for {len(samples)} samples")
        m: dict[str, float] = {"version": self.version, "samples": len(samples)}
        if not samples:
            m.update({"skipped": 1.0, "train/time_s": time.perf_counter() - t0})
            return m
        r = torch.tensor([math.nan if x is None else float(x) for x in rewards], dtype=torch.float32)
        valid = ~torch.isnan(r)
        group_ok = valid.view(-1, G).all(-1).repeat_interleave(G)
        r0 = torch.where(valid, r, torch.zeros_like(r))
        adv = group_advantages(r0, G, cfg.scale_by_std)
        zero_var = zero_variance_groups(r0, G) & group_ok
        truncated = torch.tensor([s.truncated for s in samples])
        keep = group_ok.clone()
        if cfg.drop_zero_variance:
            keep &= ~zero_var
        if cfg.mask_truncated:
            keep &= ~truncated
        lag = torch.tensor([self.version - s.version for s in samples], dtype=torch.float32)
        m.update({
            "reward/mean": float(r[valid].mean()) if bool(valid.any()) else math.nan,
            "reward/infra_failures": float((~valid).sum()),
            "groups/dropped_infra": float((~group_ok).view(-1, G)[:, 0].sum()),
            "groups/zero_variance_frac": float(zero_var.view(-1, G)[:, 0].float().mean()),
            "samples/truncated_frac": float(truncated.float().mean()),
            "samples/trained": float(keep.sum()),
            "staleness/mean_lag": float(lag.mean()), "staleness/max_lag": float(lag.max()),
        })
        if not bool(keep.any()):
            m.update({"skipped": 1.0, "train/time_s": time.perf_counter() - t0})
            return m
        idx = keep.nonzero()[:, 0]
        kept = [samples[i] for i in idx.tolist()]
        tb = collate(kept, self.pad_id, self.model.cfg.moe_num_experts, with_routes=True)
        adv_B = adv[idx]
        fresh_B = lag[idx] == 0
        replay = cfg.r3 and tb.prompt_routes is not None
        single = cfg.ppo_epochs == 1 and cfg.minibatches == 1
        self.model.train()
        old_BT = None
        ref_BT = None
        if self.ref_model is not None and cfg.kl_coef > 0:
            with torch.no_grad():
                # the reference routes with its own router: replaying the policy's experts would not be pi_ref
                ref_BT = policy_logp(self.ref_model, tb, self.temperature, self.spec, False, want_routes=False).logp_BT
        if not single:  # the old-policy recompute: its own forward, replaying routes under R3
            with torch.no_grad():
                po = policy_logp(self.model, tb, self.temperature, self.spec, replay, want_entropy=True)
            old_BT = po.logp_BT
            if not bool(torch.isfinite(old_BT[tb.mask_BT]).all()):
                return self._skip(m, t0, "non-finite old log-probs")
            m.update(self._mismatch(tb, po, fresh_B))
        B = len(kept)
        stats_acc: dict[str, list[tuple[float, float]]] = {}  # key -> (value, weight): token means weigh by tokens
        dev = next(self.model.parameters()).device
        logp_all_BT, routes_all = (torch.zeros(tb.mask_BT.shape, device=dev), {}) if single else (None, None)
        n_updates = 0
        # the minibatch order depends on the version only (not on the global RNG), so a resumed run repeats it
        shuffle = torch.Generator().manual_seed(self.version)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=shuffle) if cfg.minibatches > 1 else torch.arange(B)
            for mb in perm.chunk(cfg.minibatches):
                mb_tokens = float(tb.mask_BT[mb].sum())
                micro = cfg.micro_batch or len(mb)
                ok = True
                for c in range(0, len(mb), micro):
                    rows = mb[c:c + micro]
                    sub = tb.rows(rows)
                    po = policy_logp(self.model, sub, self.temperature, self.spec, replay, want_entropy=True,
                                     want_routes=single)
                    old = sub_old = po.logp_BT.detach() if single else old_BT[rows]
                    if single:
                        if not bool(torch.isfinite(old[sub.mask_BT]).all()):
                            ok = False
                            break
                        logp_all_BT[rows] = po.logp_BT.detach().to(logp_all_BT)  # mismatch: once, on the batch
                        for i, r in po.own_routes.items():
                            routes_all.setdefault(i, r.new_zeros((B, *r.shape[1:])))[rows] = r
                    loss, st = grpo_loss(
                        po.logp_BT, adv_B[rows], sub.mask_BT, sub_old, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        rollout_logp_BT=sub.rollout_logp_BT if cfg.tis_cap > 0 else None,
                        tis_cap=cfg.tis_cap, tis_mode=cfg.tis_mode,
                        ref_logp_BT=None if ref_BT is None else ref_BT[rows], kl_coef=cfg.kl_coef,
                        kl_kind=cfg.kl_kind, agg=cfg.agg,
                        num_tokens=mb_tokens if cfg.agg == "token-mean" else None, entropy_BT=po.entropy_BT)
                    if cfg.agg != "token-mean":
                        loss = loss * len(rows) / len(mb)
                    if not torch.isfinite(loss):
                        ok = False
                        break
                    loss.backward()
                    for k, v in st.items():
                        stats_acc.setdefault(f"loss/{k}", []).append((v, st["n_tokens"]))
                if ok:
                    gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"))
                    ok = bool(torch.isfinite(gn))
                if not ok:
                    self.optimizer.zero_grad(set_to_none=True)
                    if n_updates:  # earlier minibatches of this step did update the weights
                        self.version += 1
                    m["updates"] = n_updates
                    return self._skip(m, t0, "non-finite loss or gradient")
                if self.lr_fn is not None:
                    for g in self.optimizer.param_groups:
                        g["lr"] = self.lr_fn(self.version)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                stats_acc.setdefault("grad_norm", []).append((float(gn), 1.0))
        self.version += 1
        if single:
            m.update(self._mismatch(tb, PolicyOutput(logp_all_BT, None, routes_all), fresh_B))
        for k, vs in stats_acc.items():  # token-weighted means over micro-batches and updates; token counts add up
            total = sum(w for _, w in vs)
            if k.endswith("n_tokens"):  # over one epoch's minibatches: the tokens trained on, not times ppo_epochs
                m[k] = sum(v for v, _ in vs) / cfg.ppo_epochs
            else:
                m[k] = sum(v * w for v, w in vs) / total if total > 0 else sum(v for v, _ in vs) / len(vs)
        m.update({"updates": n_updates, "skipped": 0.0, "lr": self.optimizer.param_groups[0]["lr"],
                  "train/tokens": tb.num_tokens, "train/time_s": time.perf_counter() - t0})
        return m

    def _mismatch(self, tb: TrainBatch, po: PolicyOutput, fresh_B: torch.Tensor) -> dict[str, float]:
        """Engine mismatch on samples of the current version; off-policy gap (engine + staleness) on older ones."""
        out = {}
        for name, rows in (("mismatch", fresh_B), ("offpolicy", ~fresh_B)):
            if bool(rows.any()):
                for k, v in batch_mismatch(tb, po.logp_BT.detach(), po.own_routes, rows, self.cfg.extreme_tau).items():
                    out[f"{name}/{k}"] = v
        return out

    def _skip(self, m: dict, t0: float, why: str) -> dict:
        self.nonfinite_skips += 1
        m.update({"skipped": 1.0, "nonfinite_skip": 1.0, "train/time_s": time.perf_counter() - t0})
        m["skip_reason"] = why  # type: ignore[assignment]
        return m

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "version": self.version,
                "nonfinite_skips": self.nonfinite_skips}

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.version, self.nonfinite_skips = state["version"], state["nonfinite_skips"]
