"""Sub-model family: space, parameter counts, Pareto frontiers, measurement, search, cache, outputs and the command."""

import json

import pytest
import torch
from helpers import FAST, tiny_model

from elastic_moe import cli, measure
from elastic_moe.family import Cache, Space, enumerate_space, load_inputs, run_family, standalone
from elastic_moe.hf import sub_config
from elastic_moe.measure import MeasureConfig, peak_memory_mb
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
