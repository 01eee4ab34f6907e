"""Sub-model family: space, parameter counts, Pareto frontiers, measurement, search, cache, outputs and the command."""

import dataclasses
import json
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import FAST, family_inputs, tiny_model

from elastic_moe import cli, family, measure
from elastic_moe.errors import UserError
from elastic_moe.family import Cache, Space, enumerate_space, load_inputs, run_family, standalone
from elastic_moe.hf import extract, sub_config
from elastic_moe.measure import MeasureConfig, peak_memory_mb, quantile
from elastic_moe.pareto import nondominated_rank, pareto_front
from elastic_moe.spec import SubModelSpec, param_counts

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ pure parts


def test_space_dedupes_and_counts_params():
    model = tiny_model()  # 4 layers (dense first), 8 experts, k 2
    cands = enumerate_space(model, Space(layers=[2, 4], experts=[1, 4, 8], top_k=[1, 2]))
    assert len(cands) == 2 * (1 + 2 + 2)  # experts=1 allows only k=1
    assert cands[-1].name == "full" and cands[0].name == "L2-E1-k1"
    per_layer = enumerate_space(model, Space(layers=[4], experts=[8], top_k=[1, 2], per_layer_top_k=True))
    assert len(per_layer) == 2 + (2**3 - 2)  # 3 MoE layers
    # tuples differing only in dropped layers resolve alike and appear once
    three = enumerate_space(model, Space(layers=[3], experts=[8], top_k=[1, 2], per_layer_top_k=True))
    assert three[0].rs.layers == (0, 2, 3) and len({c.key for c in three}) == len(three) == 4
    for c in cands:
        total, active = param_counts(model.cfg, c.rs)
        cfg = sub_config(model.cfg, c.rs)
        assert total == cfg.num_params() and active == cfg.num_params(active=True)
        assert active <= total
    mixed = next(c for c in per_layer if isinstance(c.spec.top_k, tuple))
    sub, sspec = standalone(model, mixed.rs)
    x = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        assert (sub(x, sspec).logits - model(x, mixed.rs).logits).abs().max() < 1e-4


def test_pareto_front_and_ranks():
    rows = [{"c": 1.0, "loss": 3.0}, {"c": 2.0, "loss": 2.0}, {"c": 2.0, "loss": 2.5}, {"c": 3.0, "loss": 2.2},
            {"c": 4.0, "loss": 1.0}, {"c": float("nan"), "loss": 0.1}]
    assert pareto_front(rows, "c") == [0, 1, 4]
    acc = [dict(r, accuracy=a) for r, a in zip(rows, [0.1, 0.1, 0.2, 0.3, 0.0, 1.0])]
    assert pareto_front(acc, "c", "accuracy") == [0, 2, 3]
    assert nondominated_rank([(1, 1), (2, 2), (0, 3), (3, 3)]) == [0, 1, 0, 2]


def test_peak_memory_grows_with_batch():
    model = tiny_model()
    mc = MeasureConfig(**FAST)
    sub, _ = standalone(model, model.resolve(SubModelSpec(layers=2)))
    m1, m4 = peak_memory_mb(sub, None, 1, mc), peak_memory_mb(sub, None, 4, mc)
    weights = sum(t.numel() * t.element_size() for t in [*sub.parameters(), *sub.buffers()]) / 2**20
    assert weights < m1 < m4


# ---------------------------------------------------------------------------------------------- measured runs


def test_family_writes_table_plots_and_reuses_cache(inputs, tmp_path, monkeypatch):
    # timings are keyed by a hash of the inference code; others editing it mid-test must not look like a cache miss
    monkeypatch.setattr(measure, "inference_code_version", lambda: "test")
    space = Space(layers=[2, 4], experts=[4], top_k=[1, 2])
    mc = MeasureConfig(**FAST)
    res = run_family(inputs, tmp_path, space, mc, progress=False, log=lambda _: None)
    assert len(res.rows) == 4 and res.meta["search"]["mode"] == "grid"
    for name in ("family.csv", "family.jsonl", "family_meta.json", "quality_vs_active.png", "quality_vs_latency.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "quality_vs_latency.png").stat().st_size > 10_000
    r = res.rows[0]
    for col in ("loss", "total_params", "active_params", "prefill_ms_b1", "decode_ms_b1", "memory_mb_b1",
                "decode_ms_b1_wall_p50", "front_decode_ms_b1", "front_active_params"):
        assert col in r, col
    assert res.meta["speed_settings"]["clock"] == "cpu" and res.meta["anchor"]["1"]["decode_ms"] > 0
    front = [x for x in res.rows if x["front_decode_ms_b1"]]
    assert front and all(not any(o["decode_ms_b1"] <= f["decode_ms_b1"] and o["loss"] < f["loss"] for o in res.rows)
                         for f in front)
    # 2 layers cost less per token than 4: the measurement sees the model size
    two = min(x["decode_ms_b1"] for x in res.rows if x["layers"] == 2)
    four = max(x["decode_ms_b1"] for x in res.rows if x["layers"] == 4)
    assert two < four
    header = (tmp_path / "family.csv").read_text().splitlines()[0]
    assert header.startswith("name,layers,layer_ids,experts,top_k,total_params,active_params")
    import csv

    ids = [r["layer_ids"] for r in csv.DictReader((tmp_path / "family.csv").open())]
    assert all(len(x.split()) in (2, 4) for x in ids)  # "0 3": not a number a spreadsheet would read as 0.3

    again = run_family(inputs, tmp_path, space, mc, progress=False, log=lambda _: None)
    assert again.meta["cache"] == {"hits": 8, "new": 0}  # 4 losses + 4 speed records
    assert [x["decode_ms_b1"] for x in again.rows] == [x["decode_ms_b1"] for x in res.rows]
    assert again.meta["anchor"] == res.meta["anchor"]
    assert Cache(tmp_path / "cache.jsonl").data  # on disk


def test_successive_halving_measures_only_survivors(inputs, tmp_path):
    space = Space(layers=[1, 2, 3, 4], experts=[2, 4], top_k=[1, 2])
    res = run_family(inputs, tmp_path, space, MeasureConfig(**FAST), max_measured=3, progress=False,
                     log=lambda _: None)
    s = res.meta["search"]
    assert s["mode"] == "halving" and s["space_size"] == 16 and s["measured"] == len(res.rows) == 3
    assert s["rungs"][0] == {"rung": 0, "batches": 1, "candidates": 16, "kept": 8}
    assert s["rungs"][-1]["kept"] == 3
    assert all("decode_ms_b1" in r for r in res.rows)


def test_family_command(micro_run, tmp_path, capsys):
    out = tmp_path / "fam"
    argv = ["family", str(micro_run), "--out", str(out), "--layers", "2,4", "--experts", "4", "--top-k", "1",
            "--batch-sizes", "1,2", "--prompt-len", "6", "--decode-tokens", "2", "--repeats", "2",
            "--eval-batches", "2", "--eval-batch-size", "4", "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "frontier (loss vs decode_ms_b1)" in text
    rows = [json.loads(line) for line in (out / "family.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("decode_ms_b2" in r and "memory_mb_b2" in r for r in rows)
    assert cli.main(["family", str(micro_run), "--out", str(out), "--layers", "9", "--no-progress"]) == 2
    assert "layers [9] outside 1..4" in capsys.readouterr().err


def test_family_command_refuses_outputs_that_are_not_a_family_folder(micro_run, tmp_path, capsys):
    # before: written inside the corpus (the next pre-training resume read cache.jsonl as text and failed), into
    # another command's run folder, and beside unrelated files
    corpus = micro_run.parent / "corpus"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    base = ["family", str(micro_run), "--layers", "2", "--experts", "4", "--top-k", "1", "--repeats", "2",
            "--no-progress"]
    for out, words in ((corpus / "fam", "is inside the corpus"), (micro_run, "holds a run of another command"),
                       (tmp_path / "other", "holds no family table (it has notes.txt)")):
        before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
        assert cli.main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
        assert (sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None) == before
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_task_accuracy_as_the_objective(inputs, tmp_path):
    mc = MeasureConfig(**dict(FAST, tasks="reasoning", num_tasks=2, task_tokens=4))
    res = run_family(inputs, tmp_path, Space(layers=[2, 4], experts=[4], top_k=[1]), mc, objective="accuracy",
                     progress=False, log=lambda _: None)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res.rows)
    assert res.meta["objective"] == "accuracy" and any(r["front_decode_ms_b1"] for r in res.rows)


def test_unknown_task_domain_is_refused_before_measuring():
    from elastic_moe.errors import UserError

    with pytest.raises(UserError, match="unknown task domain 'cooking'"):
        MeasureConfig(**FAST, tasks="cooking").validate()
    MeasureConfig(**FAST, tasks="reasoning").validate()


def test_cache_after_a_torn_last_line_keeps_new_measurements(tmp_path):
    from elastic_moe.family import Cache

    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "value": 1}\n{"key": "b", "val')  # killed mid-write
    c = Cache(path)
    assert c.data == {"a": 1}
    c.put("c", 3)
    assert Cache(path).data == {"a": 1, "c": 3}


def test_a_sub_model_of_dense_layers_only_is_extractable_and_equals_the_elastic_forward():
    from elastic_moe.config import ModelConfig
    from elastic_moe.family import extractable
    from elastic_moe.hf import moe_pattern

    model = tiny_model()  # layer 0 dense, layers 1-3 MoE
    rs = model.resolve(SubModelSpec(layers=(0,)))
    cfg = sub_config(model.cfg, rs)
    assert extractable(model.cfg, rs) and not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    for flags in ([False], [False, False, False]):
        start, end, interval = moe_pattern(flags)
        c = ModelConfig(num_hidden_layers=len(flags), moe_layer_start_index=start, moe_layer_end_index=end,
                        moe_layer_interval=interval)
        c.validate()
        assert [c.is_moe_layer(i) for i in range(len(flags))] == flags
    sub, _ = standalone(model, rs)
    x = torch.randint(3, model.cfg.vocab_size, (1, 8))
    torch.testing.assert_close(sub(x).logits, model(x, SubModelSpec(layers=(0,))).logits)


def test_held_out_windows_fit_a_short_context(micro_run, tmp_path):
    # a checkpoint outside any run, measured on --data: the held-out windows defaulted to 128 tokens, which the micro
    # model's 64-token context cannot take ("position 127 exceeds max_position_embeddings=64")
    from elastic_moe.checkpoint import load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(micro_run)
    assert model.cfg.max_position_embeddings == 64
    ck = save_checkpoint(tmp_path / "alone", model, tokenizer_dir=micro_run / "tokenizer")
    inp = load_inputs(ck, data=str(micro_run.parent / "corpus"), device="cpu", eval_batch_size=4, eval_batches=2,
                      log=lambda _: None)
    assert max(b[0].shape[1] for b in inp.batches) == 64
    assert torch.isfinite(torch.tensor(measure.heldout_loss(inp.model, None, inp.batches)))


def test_a_stopped_family_run_says_its_measurements_are_kept(inputs, tmp_path, monkeypatch):
    import signal

    from elastic_moe.errors import Interrupted
    from elastic_moe.family import Cache

    put, calls = Cache.put, []

    def put_then_stop(self, key, value):
        put(self, key, value)
        calls.append(key)
        if len(calls) == 2:
            raise Interrupted(signum=signal.SIGTERM)

    monkeypatch.setattr(Cache, "put", put_then_stop)
    space = Space(layers=[2, 4], experts=[4], top_k=[1, 2])
    with pytest.raises(Interrupted) as stopped:
        run_family(inputs, tmp_path, space, MeasureConfig(**FAST), progress=False, log=lambda _: None)
    assert stopped.value.signum == signal.SIGTERM
    assert str(tmp_path / "cache.jsonl") in str(stopped.value) and "run the same command again" in str(stopped.value)
    assert len(Cache(tmp_path / "cache.jsonl").data) == 2
    monkeypatch.setattr(Cache, "put", put)
    again = run_family(inputs, tmp_path, space, MeasureConfig(**FAST), progress=False, log=lambda _: None)
    assert again.meta["cache"]["hits"] == 2


def test_param_counts_equal_a_direct_count_of_the_standalone_model_with_biases():
    for kw in (dict(use_bias=True), dict(use_bias=True, tie_word_embeddings=False), {}):
        model = tiny_model(**kw)
        for spec in (None, SubModelSpec(layers=2, experts=4, top_k=1), SubModelSpec(layers=(0,))):
            rs = model.resolve(spec)
            sub = extract(model, rs)
            # the selection bias is a buffer here and a parameter in transformers' model: counted
            direct = sub.num_params() + sum(sub.moe(i).bias.numel() for i in sub.moe_layers)
            assert param_counts(model.cfg, rs)[0] == direct, (kw, spec)


def test_quantile_median_of_an_even_count_is_the_middle():
    assert quantile([1.0, 2.0], 0.5) == 1.5  # was the smaller one: with --repeats 2 the "median" was the min
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0], 0.0) == 1.0 and quantile([1.0, 2.0, 3.0], 1.0) == 3.0


def test_pareto_front_skips_rows_without_a_finite_accuracy_and_keeps_exact_ties():
    rows = [{"c": 1.0, "loss": 3.0, "accuracy": float("nan")}, {"c": 2.0, "loss": 2.0, "accuracy": 0.5},
            {"c": 2.0, "loss": 2.0, "accuracy": 0.5}, {"c": 3.0, "loss": 1.0}, {"c": 4.0, "loss": 1.0, "accuracy": 0.6}]
    assert pareto_front(rows, "c", "accuracy") == [1, 2, 4]
    # two sub-models of the same cost and the same loss: neither dominates the other
    assert pareto_front(rows, "c") == [0, 1, 2, 3]


def test_cached_losses_are_keyed_by_the_inference_code(tmp_path, monkeypatch):
    model = tiny_model()
    inp = family_inputs(model)
    space, mc = Space(layers=[1], experts=[8], top_k=[2]), MeasureConfig(**dict(FAST, eval_batches=1))
    monkeypatch.setattr(family, "plot_family", lambda *a: [])
    monkeypatch.setattr(measure, "inference_code_version", lambda: "a")
    run_family(inp, tmp_path, space, mc, progress=False, log=lambda _: None)
    again = run_family(inp, tmp_path, space, mc, progress=False, log=lambda _: None)
    assert again.meta["cache"] == {"hits": 2, "new": 0}
    # a fixed forward changes the loss as much as the latency: nothing measured with the old code is reused
    monkeypatch.setattr(measure, "inference_code_version", lambda: "b")
    fixed = run_family(inp, tmp_path, space, mc, progress=False, log=lambda _: None)
    assert fixed.meta["cache"] == {"hits": 0, "new": 2}


def test_halving_ranks_sub_models_with_a_non_finite_loss_last(monkeypatch):
    model = tiny_model()
    cands = family.enumerate_space(model, Space(layers=[1, 2, 3, 4], experts=[8], top_k=[2]))
    smallest = min(cands, key=lambda c: param_counts(model.cfg, c.rs)[0])
    losses = {c.key: (float("nan") if c is smallest else 3.0 - 0.1 * len(c.rs.layers)) for c in cands}
    kept = family.survivors(model.cfg, cands, losses, 2)
    assert smallest not in kept and len(kept) == 2
    assert [len(c.rs.layers) for c in kept] == [3, 4]


def test_per_layer_top_k_over_many_moe_layers_is_refused_not_enumerated():
    # 13 MoE layers and top-k 1, 2: 8192 mixes (27 layers, as ERNIE-4.5-21B has: 134 million, which hung)
    model = tiny_model(num_hidden_layers=13, moe_layer_start_index=0)
    with pytest.raises(UserError, match="top-k mixes"):
        family.enumerate_space(model, Space(layers=[13], experts=[8], top_k=[1, 2], per_layer_top_k=True))
    assert len(family.enumerate_space(model, Space(layers=[13], experts=[8], top_k=[1, 2]))) == 2


def _rows():
    return [{"name": "full", "spec": {}, "loss": 2.0, "extractable": True, "total_params": 10},
            {"name": "L2", "spec": {"layers": 2}, "loss": 3.0, "extractable": True, "total_params": 5}]


def test_a_family_table_whose_meta_is_of_another_write_is_not_read_as_one(tmp_path):
    # write_table replaces family.jsonl, family.csv and family_meta.json one after another: a kill between them
    # left a new table beside the old meta (or the reverse), read back as one consistent table
    from elastic_moe.family import META, TABLE, load_table, write_table

    write_table(_rows(), {"objective": "loss", "fingerprint": "old"}, tmp_path)
    old_meta = (tmp_path / META).read_text()
    rows, meta = load_table(tmp_path)
    assert [r["name"] for r in rows] == ["full", "L2"] and meta["fingerprint"] == "old"
    write_table(_rows()[:1], {"objective": "loss", "fingerprint": "new"}, tmp_path)
    assert load_table(tmp_path)[1]["fingerprint"] == "new"
    (tmp_path / META).write_text(old_meta)  # killed before the new meta was put in place
    assert load_table(tmp_path) is None
    # a table written before the tables carried their checksum is still read
    meta = json.loads(old_meta)
    meta.pop("files")
    (tmp_path / META).write_text(json.dumps(meta))
    assert load_table(tmp_path) is not None
    assert (tmp_path / TABLE).is_file() and (tmp_path / "family.csv").is_file()


@pytest.mark.parametrize("command", [["family", "CKPT"], ["extract", "CKPT", "OUT", "--max-total-params", "1M"],
                                     ["pretrain", "--out", "RUN"]])
def test_an_empty_data_flag_is_a_one_line_error_before_any_work(command, micro_run, tmp_path, monkeypatch, capsys):
    # the current folder was read as the corpus: "empty corpus: no usable text in ." (or its files as text)
    from elastic_moe import cli

    monkeypatch.chdir(tmp_path)
    argv = [{"CKPT": str(micro_run)}.get(a, str(tmp_path / a.lower()) if a in ("OUT", "RUN") else a) for a in command]
    assert cli.main([*argv, "--data", ""]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "empty" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made


def test_remeasuring_builds_only_the_standalone_models_it_times(monkeypatch):
    # the company of the re-timed model (chunk - 1 family members) was sliced after building a standalone copy of
    # every extractable row: a table of 64 rows held 64 model copies in memory at once

    from helpers import tiny_model

    import elastic_moe.extract as ex
    from elastic_moe.measure import MeasureConfig

    model = tiny_model()
    built = []
    monkeypatch.setattr(ex, "standalone", lambda m, rs: built.append(rs) or (m, None))
    monkeypatch.setattr(ex, "time_models", lambda models, b, mc: [{"decode_ms": 1.0, "prefill_ms": 1.0}
                                                                  for _ in models])
    monkeypatch.setattr(ex, "peak_memory_mb", lambda *a: 1.0)
    mc = MeasureConfig(chunk=3)
    rows = [{"name": f"r{i}", "spec": {"layers": 1 + i % 4}, "extractable": True} for i in range(20)]
    meta = {"measure": dataclasses.asdict(mc), "speed_settings": {}}
    ex.remeasure_row(model, model, ex.Budget("latency_ms", 5.0), meta, rows, lambda _: None)
    assert len(built) == 1 + (mc.chunk - 1)  # the full model (the anchor) and its company


@pytest.mark.parametrize("text", [",", " , ", ""])
def test_an_integer_list_with_no_integer_is_refused(text):
    from elastic_moe.commands.family import int_list

    with pytest.raises(UserError, match="comma-separated integers"):
        int_list(text)
    assert int_list("2, 4,") == [2, 4]


@pytest.mark.parametrize("text", ["[1, 2]", "3", "null", '"x"'])
def test_a_run_config_that_is_not_an_object_is_read_as_no_config(tmp_path, text):
    from elastic_moe.family import _pretraining_config, _run_config

    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(text)
    assert _run_config(ckpt) is None
    assert _pretraining_config(ckpt, {}) is None


def test_nondominated_rank_matches_the_definition_with_ties_and_infinities():
    """The chunked peel (was a quadratic scan per front in Python) against the definition, on points with many
    ties, repeated points and infinite losses, across chunk boundaries."""
    import math
    import random

    from elastic_moe.pareto import nondominated_rank

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    def reference(pts):
        rank, left, r = [0] * len(pts), set(range(len(pts))), 0
        while left:
            front = {i for i in left if not any(dominates(pts[j], pts[i]) for j in left if j != i)}
            for i in front:
                rank[i] = r
            left -= front
            r += 1
        return rank

    rng = random.Random(0)
    for n, dims in [(1, 2), (7, 2), (60, 3), (150, 3)]:
        pts = [tuple(rng.choice([0, 1, 2, 3, math.inf]) if d == 0 else rng.randint(0, 4) for d in range(dims))
               for _ in range(n)]
        pts += pts[: n // 5]  # repeated points share a front
        assert nondominated_rank(pts, chunk=16) == reference(pts)
    assert nondominated_rank([]) == []
    assert nondominated_rank([(1, 1), (2, 2), (0, 3), (3, 3)]) == [0, 1, 0, 2]


def _fake_speed(monkeypatch, anchors=None):
    """run_family's timing and memory replaced: chunk c's anchor (the full model) takes anchors[c] ms per token and
    every candidate of that chunk 10x its anchor (as if the machine ran at another speed for each chunk)."""
    chunks = []

    def time_models(models, b, mc, tick=lambda: None):
        a = (anchors or [1.0] * 100)[len(chunks)]
        chunks.append(len(models) - 1)
        rec = lambda ms: {"prefill_ms": ms, "decode_ms": ms, "clock": "cpu",  # noqa: E731
                          "prefill_ms_wall_p50": ms, "decode_ms_wall_p50": ms}
        return [rec(10 * a) for _ in models[:-1]] + [rec(a)]

    monkeypatch.setattr(family, "time_models", time_models)
    monkeypatch.setattr(family, "peak_memory_mb", lambda *a: 1.0)
    return chunks


def test_halving_keeps_non_dominated_sub_models_before_dominated_ones_of_lower_loss():
    """Successive halving keeps survivors by non-dominated rank over (loss, active, total params) first and loss
    second: a cheap sub-model of higher loss that nothing dominates survives before a costlier one that a cheaper
    and better sub-model dominates."""
    model = tiny_model()
    cands = family.enumerate_space(model, Space(layers=[1, 2, 3, 4], experts=[8], top_k=[2]))
    by_layers = {len(c.rs.layers): c for c in cands}
    # 2 layers dominates 3 (fewer params, lower loss); 1 layer is cheapest: rank 0 with 2 layers
    losses = {by_layers[1].key: 3.0, by_layers[2].key: 2.0, by_layers[3].key: 2.5, by_layers[4].key: 2.6}
    kept = family.survivors(model.cfg, cands, losses, 2)
    assert sorted(len(c.rs.layers) for c in kept) == [1, 2]


def test_measured_rows_report_the_loss_on_all_eval_batches_after_halving(monkeypatch):
    """After halving on fewer batches, each measured row's loss is the held-out loss over all eval batches (the
    one-batch rung's cached loss is not taken for it)."""
    model = tiny_model()
    inp = family_inputs(model, sizes=(2, 3))
    _fake_speed(monkeypatch)
    mc = MeasureConfig(**dict(FAST, eval_batches=2))
    res = run_family(inp, None, Space(layers=[1, 2, 3, 4], experts=[8], top_k=[2]), mc, max_measured=2,
                     progress=False, log=lambda _: None)
    assert res.meta["search"]["mode"] == "halving" and res.meta["search"]["rungs"][0]["batches"] == 1
    assert len(res.rows) == 2
    for r in res.rows:
        rs = model.resolve(family.SubModelSpec.from_dict(r["spec"]))
        full = measure.heldout_loss(model, rs, inp.batches, 2)
        assert full != measure.heldout_loss(model, rs, inp.batches, 1)  # the two differ: the check means something
        assert r["loss"] == pytest.approx(full, rel=1e-12)


def test_latencies_of_each_chunk_are_scaled_to_the_median_anchor(monkeypatch):
    """Chunks are timed at different times: each chunk's latencies are multiplied by (median anchor over the
    table / that chunk's anchor), the raw figures kept in *_raw, the median recorded in meta["anchor"]."""
    model = tiny_model()
    chunks = _fake_speed(monkeypatch, anchors=[1.0, 2.0, 6.0])
    mc = MeasureConfig(**dict(FAST, chunk=1))
    res = run_family(family_inputs(model, sizes=(2, 3)), None, Space(layers=[1, 2, 4], experts=[8], top_k=[2]), mc,
                     progress=False, log=lambda _: None)
    assert chunks == [1, 1, 1]
    assert res.meta["anchor"]["1"] == {"prefill_ms": 2.0, "decode_ms": 2.0}
    for r in res.rows:  # every candidate took 10x its chunk's anchor: 20 ms at the median anchor
        assert r["decode_ms_b1"] == pytest.approx(20.0) and r["prefill_ms_b1"] == pytest.approx(20.0)
    assert sorted(r["decode_ms_b1_raw"] for r in res.rows) == [10.0, 20.0, 60.0]


def test_time_models_drops_the_warm_up_uses_the_clock_and_keeps_each_models_times(monkeypatch):
    """time_models: the first (warm-up) generation of each model is not counted, the quantile is taken of the
    chosen clock's samples (the wall clock only in *_wall_p50), and each model gets its own samples although the
    round-robin start rotates."""
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    base = {id(a): (0.001, 0.002), id(b): (0.003, 0.004)}  # CPU-time prefill, decode step (s); wall time is 10x
    seen = []

    def fake(sub, spec, prompts, n, device):
        first = id(sub) not in seen
        seen.append(id(sub))
        pre, dec = (1.0, 1.0) if first else base[id(sub)]
        return {"wall": (10 * pre, [10 * dec] * n), "cpu": (pre, [dec] * n)}

    monkeypatch.setattr(measure, "_profiled_generate", fake)
    mc = MeasureConfig(**dict(FAST, repeats=2, clock="cpu"))
    ta, tb = measure.time_models([(a, None), (b, None)], 1, mc)
    assert ta["clock"] == "cpu"
    assert (ta["prefill_ms"], ta["decode_ms"]) == pytest.approx((1.0, 2.0))
    assert (tb["prefill_ms"], tb["decode_ms"]) == pytest.approx((3.0, 4.0))
    assert (ta["prefill_ms_wall_p50"], ta["decode_ms_wall_p50"]) == pytest.approx((10.0, 20.0))
    assert (tb["prefill_ms_wall_p50"], tb["decode_ms_wall_p50"]) == pytest.approx((30.0, 40.0))


def test_peak_memory_adds_the_kv_cache_of_the_decode_tokens_not_run():
    """On the CPU the op-level count runs 2 new tokens; the KV cache of the other decode tokens (K and V, every
    layer, batch, KV heads, head dim, element size) is added: going from 1 to 5 decode tokens adds exactly that."""
    model = tiny_model()
    sub, _ = family.standalone(model, model.resolve(None))
    cfg, batch = sub.cfg, 3
    mb = {d: measure.peak_memory_mb(sub, None, batch, MeasureConfig(**dict(FAST, decode_tokens=d))) for d in (1, 5)}
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cfg.dim_head * 4 * 4  # 4 tokens, float32
    assert (mb[5] - mb[1]) * 2**20 == pytest.approx(kv, abs=1e-3)


def test_heldout_loss_is_the_mean_token_cross_entropy():
    """heldout_loss: the cross-entropy averaged over every token of the first n batches (batches of unequal size
    weigh by their token counts)."""
    model = tiny_model()
    inp = family_inputs(model, sizes=(1, 4, 2))
    rs = model.resolve(family.SubModelSpec(layers=2, experts=4, top_k=1))
    with torch.no_grad():
        logits = torch.cat([model(x, rs).logits.flatten(0, 1) for x, _ in inp.batches[:2]])
        want = float(F.cross_entropy(logits.float(), torch.cat([y.flatten() for _, y in inp.batches[:2]])))
    assert measure.heldout_loss(model, rs, inp.batches, 2) == pytest.approx(want, rel=1e-5)


def test_task_accuracy_counts_prompts_that_do_not_fit_as_wrong(monkeypatch):
    """A task whose prompt does not fit the context with max_tokens new tokens counts as wrong: the accuracy is
    over all tasks, not only the ones that were run."""
    import elastic_moe.tasks

    run = []
    monkeypatch.setattr(measure, "generate", lambda model, prompts, sp, spec, eos_id: run.extend(prompts) or
                        [types.SimpleNamespace(tokens=[5]) for _ in prompts])
    monkeypatch.setattr(elastic_moe.tasks, "verify", lambda t, text: types.SimpleNamespace(correct=True))
    tok = types.SimpleNamespace(eos_id=0, encode_chat=lambda m, add_generation_prompt: [1] * m,
                                decode=lambda ids, skip_special_tokens: "answer")
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_position_embeddings=20))
    tasks = [types.SimpleNamespace(messages=n) for n in (5, 5, 50, 50)]  # prompt lengths; 10 fit with 10 new tokens
    assert measure.task_accuracy(model, None, tasks, tok, max_tokens=10) == 0.5
    assert len(run) == 2
