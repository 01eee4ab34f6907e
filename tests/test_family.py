"""Sub-model family: space, parameter counts, Pareto frontiers, measurement, search, cache, outputs and the command."""

import json

import pytest
import torch
from helpers import FAST, tiny_model

from elastic_moe import cli, family, measure
from elastic_moe.errors import UserError
from elastic_moe.family import Cache, FamilyInputs, Space, enumerate_space, load_inputs, run_family, standalone
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


def _inputs(model, n_batches=2):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(3, model.cfg.vocab_size, (2, 8), generator=g),
                torch.randint(3, model.cfg.vocab_size, (2, 8), generator=g)) for _ in range(n_batches)]
    return FamilyInputs(model, "weights-sha", batches, "data")


def test_cached_losses_are_keyed_by_the_inference_code(tmp_path, monkeypatch):
    model = tiny_model()
    inp = _inputs(model)
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
    import dataclasses

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
