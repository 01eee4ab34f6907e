"""extract: the best measured sub-model under each budget kind, checks, re-balancing, healing, HF parity, errors."""

import copy
import dataclasses
import json
import types

import pytest
import torch
from helpers import FAST, family_inputs, tiny_model

from elastic_moe import cli, family
from elastic_moe.checkpoint import load_checkpoint
from elastic_moe.errors import Interrupted, UserError
from elastic_moe.extract import Budget, choose, extract_under_budget, on_frontier, parse_count, rebalance
from elastic_moe.family import Space, load_inputs, run_family
from elastic_moe.hf import extract
from elastic_moe.measure import MeasureConfig
from elastic_moe.metrics import read_metrics
from elastic_moe.spec import SubModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fam")
    torch.set_num_threads(1)
    res = run_family(inputs, out, Space(layers=[2, 4], experts=[2, 4], top_k=[1]), MeasureConfig(**FAST),
                     progress=False, log=lambda _: None)
    return out, res.rows


def test_parse_count():
    assert [parse_count(t) for t in ("1.5M", "300k", "2e6", "1_200", "7")] == [1_500_000, 300_000, 2_000_000, 1200, 7]


@pytest.mark.parametrize("kind", ["total_params", "active_params", "latency_ms", "memory_mb"])
def test_extract_meets_budget_on_frontier_and_matches_transformers(inputs, table, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    folder, rows = table
    col = Budget(kind, 1.0).column
    values = sorted(r[col] for r in rows)
    limit = values[len(values) // 2]  # some sub-models fit, some do not
    budget = Budget(kind, limit)
    rebalance_batches = 0 if kind == "total_params" else 2
    rep = extract_under_budget(inputs, tmp_path / "sub", budget, family_dir=folder, hf_dir=tmp_path / "hf",
                               rebalance_batches=rebalance_batches, progress=False, say=lambda _: None)
    row = rep["family_row"]
    assert row[col] <= limit and rep["on_frontier"] and on_frontier(rows, row, col)
    assert row["loss"] == min(r["loss"] for r in rows if r[col] <= limit)
    assert rep["elastic_max_abs_diff"] < 1e-4
    if budget.measured:
        assert rep["remeasured"]["value"] > 0 and "rel_error" in rep["remeasured"]
    sub, meta = load_checkpoint(tmp_path / "sub")
    assert meta["extract"]["name"] == row["name"] and (tmp_path / "sub" / "tokenizer" / "tokenizer.json").is_file()
    assert all(float(sub.moe(i).load.abs().sum()) == 0 for i in sub.moe_layers)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = inputs.batches[0][0]
    spec = SubModelSpec.from_dict(row["spec"])
    with torch.no_grad():
        ours = sub.eval()(x).logits
        assert (hf(x).logits - ours).abs().max().item() < 1e-4
        if not rebalance_batches:  # untouched router bias: the export equals the elastic forward at the spec
            assert (hf(x).logits - inputs.model(x, spec).logits).abs().max().item() < 1e-4


def test_no_sub_model_meets_the_budget(micro_run, table, tmp_path, capsys):
    folder, rows = table
    argv = ["extract", str(micro_run), str(tmp_path / "x"), "--family", str(folder), "--max-active-params", "1k"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("elastic-moe extract: error: no measured sub-model has active params")
    smallest = sorted(rows, key=lambda r: r["active_params"])[:3]
    assert "closest: " in err and all(r["name"] in err for r in smallest)
    assert not (tmp_path / "x").exists()
    with pytest.raises(Exception, match="closest"):
        choose(rows, Budget("latency_ms", 1e-6))


def test_extract_command_and_reuse(micro_run, table, tmp_path, capsys):
    folder, rows = table
    argv = ["extract", str(micro_run), str(tmp_path / "x"), "--family", str(folder), "--max-total-params", "1M",
            "--rebalance-batches", "0", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    best = min(rows, key=lambda r: r["loss"])["name"]
    assert "using the family table" in out and f"chose {best} " in out and "load counters reset" in out
    assert cli.main(argv) == 2 and "not empty" in capsys.readouterr().err
    # an occupied --hf folder is refused before anything is written, so OUT is not left without its HF twin
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    argv[2] = str(tmp_path / "y")
    assert cli.main(argv + ["--hf", str(tmp_path / "hf")]) == 2
    assert "hf exists and is not empty" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and (tmp_path / "hf" / "keep.txt").read_text() == "mine"

    # its own input (the run folder holds the checkpoint) or one folder for both outputs: refused, --force or not
    code = cli.main([*argv[:2], str(micro_run), *argv[3:], "--force"])
    assert code == 2 and f"{micro_run} holds the input" in capsys.readouterr().err
    assert cli.main([*argv[:2], str(tmp_path / "z"), *argv[3:], "--hf", str(tmp_path / "z")]) == 2
    assert "would both be" in capsys.readouterr().err and not (tmp_path / "z").exists()
    assert cli.main([*argv[:2], str(tmp_path / "z"), *argv[3:], "--hf-dtype", "bfloat16"]) == 2
    assert "pass --hf HF_DIR too" in capsys.readouterr().err and not (tmp_path / "z").exists()

    # the extracted model is measured on the held-out text of the run it was cut from, with no --data
    sub = load_inputs(tmp_path / "x", device="cpu", eval_batch_size=4, eval_batches=2, log=lambda _: None)
    assert [b[0].tolist() for b in sub.batches] == [b[0].tolist() for b in load_inputs(
        micro_run, device="cpu", eval_batch_size=4, eval_batches=2, log=lambda _: None).batches]


def test_rebalance_moves_bias_toward_balance(inputs):
    model = inputs.model
    sub = extract(model, SubModelSpec(layers=2, experts=3, top_k=1)).eval()
    stream = inputs.data.train_stream(4, seed=1)
    batches = [stream.next_batch() for _ in range(2)]
    rb = rebalance(sub, batches, inputs.batches, rate=0.05, rounds=4, tolerance=1e9)
    assert rb["max_over_mean_after"] <= rb["max_over_mean_before"]
    if rb["rounds"]:
        assert rb["max_bias_shift"] > 0
    strict = extract(model, SubModelSpec(layers=2, experts=3, top_k=1)).eval()
    rb2 = rebalance(strict, batches, inputs.batches, rate=0.05, rounds=4, tolerance=-1.0)  # nothing may pass but the start
    assert rb2["rounds"] == 0 and rb2["heldout_loss_after"] == rb2["heldout_loss_before"]
    assert torch.equal(strict.moe(strict.moe_layers[0]).bias, extract(model, SubModelSpec(layers=2, experts=3, top_k=1)).moe(1).bias)


def test_heal_runs_the_pretraining_loop(inputs, table, tmp_path):
    folder, _ = table
    rep = extract_under_budget(inputs, tmp_path / "healed", Budget("active_params", 10**9), family_dir=folder,
                               heal_tokens=2 * 8 * 16, rebalance_batches=0, progress=False, say=lambda _: None)
    h = rep["heal"]
    assert h["steps"] == 2 and h["tokens"] == 256
    assert h["heldout_loss_before"] > 0 and h["heldout_loss_after"] > 0
    run = tmp_path / "healed.heal"
    assert (run / "checkpoints" / "step_00000002").is_dir() and (run / "metrics.jsonl").is_file()
    assert json.loads((run / "config.json").read_text())["elastic"]["depth"]["p_full"] == 1.0
    healed, meta = load_checkpoint(tmp_path / "healed")
    ref, _ = load_checkpoint(run)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, healed.state_dict()[k]), k
    # the same extraction again (--force): the finished heal is reused, not refused
    again = extract_under_budget(inputs, tmp_path / "healed", Budget("active_params", 10**9), family_dir=folder,
                                 heal_tokens=2 * 8 * 16, rebalance_batches=0, force=True, progress=False,
                                 say=lambda _: None)
    assert again["heal"]["heldout_loss_after"] == h["heldout_loss_after"]
    # another token count over the same heal folder is refused in one line
    with pytest.raises(UserError, match="holds the healing of another cut"):
        extract_under_budget(inputs, tmp_path / "healed", Budget("active_params", 10**9), family_dir=folder,
                             heal_tokens=4 * 8 * 16, rebalance_batches=0, force=True, progress=False,
                             say=lambda _: None)


def test_an_interrupted_heal_writes_nothing_and_resumes(inputs, table, tmp_path, monkeypatch):
    import elastic_moe.train as train_mod

    folder, _ = table
    real = train_mod.train

    def stopped(cfg, run_dir, log=None):  # a signal during the first step: checkpoint, then stop
        cfg.train.max_steps = 1
        return {**real(cfg, run_dir, log=log), "interrupted": True}

    monkeypatch.setattr(train_mod, "train", stopped)
    args = (inputs, tmp_path / "out", Budget("active_params", 10**9))
    kw = dict(family_dir=folder, heal_tokens=2 * 8 * 16, rebalance_batches=0, progress=False, say=lambda _: None,
              hf_dir=tmp_path / "out-hf", hf_dtype="bfloat16")
    with pytest.raises(Interrupted, match="healing stopped"):
        extract_under_budget(*args, **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-hf").exists()
    monkeypatch.setattr(train_mod, "train", real)
    rep = extract_under_budget(*args, **kw)  # the same call resumes the heal from its step-1 checkpoint
    assert rep["heal"]["steps"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "out.heal")] == [1, 2]
    assert (tmp_path / "out").is_dir() and rep["hf_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out-hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_checkpoint_is_not_written_without_its_hf_folder(inputs, table, tmp_path, monkeypatch):
    import elastic_moe.hf as hf

    def broken(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "hf"))

    monkeypatch.setattr(hf, "export_hf", broken)
    with pytest.raises(OSError):
        extract_under_budget(inputs, tmp_path / "out", Budget("active_params", 10**9), family_dir=table[0],
                             hf_dir=tmp_path / "hf", rebalance_batches=0, progress=False, say=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("hf_in_out", [True, False])
def test_one_output_inside_the_other_is_refused_before_any_work(inputs, table, tmp_path, hf_in_out):
    # the second folder put in place would replace the first one's parent (or be lost with it)
    out, hf = (tmp_path / "o", tmp_path / "o" / "hf") if hf_in_out else (tmp_path / "o" / "ck", tmp_path / "o")
    with pytest.raises(UserError, match="one inside the other"):
        extract_under_budget(inputs, out, Budget("active_params", 10**9), family_dir=table[0], hf_dir=hf,
                             rebalance_batches=0, remeasure=False, progress=False, say=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_measured_layer_order_is_carried(inputs, tmp_path):
    model = copy.deepcopy(inputs.model)
    model.set_layer_order([2, 0, 3, 1])
    inp = dataclasses.replace(inputs, model=model, fingerprint="reordered")
    run_family(inp, tmp_path / "fam", Space(layers=[2], experts=[4], top_k=[1]), MeasureConfig(**FAST),
               progress=False, log=lambda _: None)
    rep = extract_under_budget(inp, tmp_path / "sub", Budget("total_params", 1e9), family_dir=tmp_path / "fam",
                               rebalance_batches=0, progress=False, say=lambda _: None)
    assert rep["name"] == "L2-k1"
    sub, _ = load_checkpoint(tmp_path / "sub")
    assert bool(sub.layer_order_set) and sub.layer_order.tolist() == [1, 0]  # kept layers 0, 2; layer 2 first
    assert sub.resolve(SubModelSpec(layers=1)).layers == (1,)


def test_rebalancing_starts_from_the_family_tables_loss(micro_run, table, tmp_path, capsys):
    import re

    folder, rows = table  # measured on 2 held-out batches of 4, not the command's default 8 of 8
    argv = ["extract", str(micro_run), str(tmp_path / "x"), "--family", str(folder), "--max-total-params", "1M",
            "--rebalance-batches", "2", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    chosen = re.search(r"chose (\S+) ", out).group(1)
    before = float(re.search(r"held-out loss (\d+\.\d+) ->", out).group(1))
    assert before == round(next(r["loss"] for r in rows if r["name"] == chosen), 4)


def test_a_post_training_checkpoint_is_measured_on_its_pretraining_corpus(micro_run, tmp_path):
    from elastic_moe.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(micro_run)
    pre = find_checkpoint(micro_run)
    # a stage checkpoint outside any pre-training run: its meta names the checkpoint it started from
    stage = save_checkpoint(tmp_path / "opd" / "checkpoints" / "step_00000001", model,
                            meta={"stage": "opd", "init": str(pre)}, tokenizer_dir=pre / "tokenizer")
    kw = dict(device="cpu", eval_batch_size=4, eval_batches=2, log=lambda _: None)
    got = load_inputs(stage, **kw)
    assert [b[0].tolist() for b in got.batches] == [b[0].tolist() for b in load_inputs(micro_run, **kw).batches]


@pytest.mark.parametrize("damage", ["meta_not_an_object", "row_not_an_object", "meta_without_settings",
                                    "row_without_name", "row_spec_not_an_object", "row_loss_not_a_number"])
def test_a_family_table_damaged_into_other_json_is_measured_again(inputs, table, tmp_path, damage, monkeypatch):
    import shutil
    import types

    import elastic_moe.extract as ex
    from elastic_moe.family import META, TABLE, load_table

    rows, meta = load_table(table[0])
    measured = []  # the measuring itself is the family's (tested there): here, that it is asked for, in one line
    monkeypatch.setattr(ex, "run_family", lambda *a, **k: measured.append(a) or types.SimpleNamespace(rows=rows, meta=meta))
    folder = tmp_path / "fam"
    shutil.copytree(table[0], folder)
    if damage == "meta_not_an_object":
        (folder / META).write_text("[]")
    elif damage == "row_not_an_object":
        (folder / TABLE).write_text((folder / TABLE).read_text() + "1\n")
    elif damage.startswith("row_"):  # a hand-edited row: the first one, which every budget here admits
        lines = (folder / TABLE).read_text().splitlines()
        row = json.loads(lines[0])
        if damage == "row_without_name":
            del row["name"]
        elif damage == "row_spec_not_an_object":
            row["spec"] = "L2"
        else:
            row["loss"] = "low"
        (folder / TABLE).write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    else:
        meta = json.loads((folder / META).read_text())
        (folder / META).write_text(json.dumps({k: v for k, v in meta.items() if k not in ("search", "objective")}))
    said = []
    rep = extract_under_budget(inputs, tmp_path / "sub", Budget("total_params", 10**9), family_dir=folder,
                               rebalance_batches=0, remeasure=False, progress=False, say=said.append)
    assert measured and any("measuring" in s for s in said) and (tmp_path / "sub" / "config.json").is_file()
    assert rep["family_row"]["total_params"] <= 10**9


def test_extract_refuses_an_output_inside_the_corpus(inputs, micro_run):
    # the run's next resume would read the extracted checkpoint's config.json and tokenizer as training text
    corpus = micro_run.parent / "corpus"
    before = sorted(p.name for p in corpus.iterdir())
    for kw in ({}, {"hf_dir": corpus / "hf"}):
        out = corpus / "sub" if not kw else micro_run.parent / "sub_ok"
        with pytest.raises(UserError, match="is inside the corpus"):
            extract_under_budget(inputs, out, Budget("total_params", 10**9), progress=False, say=lambda _: None, **kw)
    assert sorted(p.name for p in corpus.iterdir()) == before and not (micro_run.parent / "sub_ok").exists()


def test_extract_with_a_reused_table_whose_meta_lacks_its_settings_measures_again(inputs, tmp_path, monkeypatch):
    # a table with the budget's column and objective was reused as is, and then meta["measure"] raised KeyError
    import elastic_moe.extract as ex
    from elastic_moe.family import META, write_table

    rows = [{"name": "full", "spec": {}, "loss": 2.0, "extractable": True, "total_params": 10, "active_params": 5}]
    write_table(rows, {"objective": "loss", "fingerprint": inputs.fingerprint}, tmp_path / "fam")
    assert "measure" not in json.loads((tmp_path / "fam" / META).read_text())
    measured = []
    good = {"objective": "loss", "fingerprint": inputs.fingerprint, "measure": {"eval_batch_size": 4}}
    monkeypatch.setattr(ex, "run_family", lambda *a, **k: measured.append(a) or types.SimpleNamespace(rows=rows,
                                                                                                       meta=good))
    said = []
    ex.family_table(inputs, ex.Budget("total_params", 100), tmp_path / "fam", "loss", False, said.append)
    assert measured and any("measuring" in s for s in said)


@pytest.mark.parametrize("argv", [["extract", "CKPT", "", "--max-total-params", "1M"],
                                  ["extract", "CKPT", "OUT", "--hf", "", "--max-total-params", "1M"]])
def test_an_empty_extract_output_is_refused_not_taken_for_the_current_folder(argv, micro_run, tmp_path, monkeypatch,
                                                                             capsys):
    # OUT "" was the current folder: refused, after the table and data were read, as "not empty (use --force to
    # replace it)"
    from elastic_moe import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    argv = [{"CKPT": str(micro_run), "OUT": str(tmp_path / "out")}.get(a, a) for a in argv] + ["--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and "--force" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_extracting_a_sub_model_without_a_moe_layer_reports_no_rebalancing(inputs, tmp_path):
    # with a layer order that ranks the dense first layer first, L1 keeps no MoE layer: rebalance() returned its
    # "no MoE layer" record, and the report line then read its missing load figures (KeyError)
    import copy
    import dataclasses

    from elastic_moe.extract import Budget, extract_under_budget
    from elastic_moe.family import Space, write_table
    from elastic_moe.measure import MeasureConfig
    from elastic_moe.spec import SubModelSpec

    model = copy.deepcopy(inputs.model)
    model.set_layer_order(list(range(model.cfg.num_hidden_layers)))
    assert model.resolve(SubModelSpec(layers=1)).layers == (0,) and 0 not in model.cfg.moe_layers
    inp = dataclasses.replace(inputs, model=model)
    rows = [{"name": "L1", "spec": {"layers": 1}, "loss": 5.0, "extractable": True, "total_params": 1,
             "active_params": 1}]
    meta = {"objective": "loss", "fingerprint": inp.fingerprint, "measure": dataclasses.asdict(MeasureConfig()),
            "space": dataclasses.asdict(Space()), "search": {"mode": "grid", "measured": 1}}
    write_table(rows, meta, tmp_path / "fam")
    said = []
    rep = extract_under_budget(inp, tmp_path / "sub", Budget("total_params", 10), family_dir=tmp_path / "fam",
                               remeasure=False, progress=False, say=said.append)
    assert rep["name"] == "L1" and "no MoE layer" in rep["rebalance"]["action"]
    assert (tmp_path / "sub" / "config.json").is_file()


def test_a_budget_equal_to_a_sub_models_cost_admits_it():
    """The budget is an upper bound that includes its limit: a sub-model costing exactly the limit fits."""
    from elastic_moe.extract import Budget, choose

    rows = [{"name": n, "extractable": True, "total_params": p, "loss": loss, "spec": {}}
            for n, p, loss in (("small", 5, 3.0), ("mid", 10, 2.0), ("big", 20, 1.0))]
    best, fits = choose(rows, Budget("total_params", 10))
    assert best["name"] == "mid" and {r["name"] for r in fits} == {"small", "mid"}


def test_a_loss_table_is_not_reused_for_the_accuracy_objective(tmp_path, monkeypatch):
    """extract's family table is reused as is only when it was measured for the same objective: a loss-only table
    (no accuracy column) is measured again for --objective accuracy."""
    import elastic_moe.extract as ex

    model = tiny_model()
    inp = family_inputs(model, sizes=(2, 3))
    rows = [{"name": "full", "spec": {}, "loss": 2.0, "extractable": True, "total_params": 10}]
    meta = {"fingerprint": inp.fingerprint, "objective": "loss", "measure": dataclasses.asdict(MeasureConfig()),
            "space": dataclasses.asdict(Space()), "search": {"mode": "grid", "measured": 1}}
    family.write_table(rows, meta, tmp_path)
    calls = []

    def fake_run_family(inp, folder, space, mc, search, max_measured, objective, **kw):
        calls.append(objective)
        return family.FamilyResult([dict(rows[0], accuracy=0.5)], dict(meta, objective=objective))

    monkeypatch.setattr(ex, "run_family", fake_run_family)
    budget = ex.Budget("total_params", 100)
    ex.family_table(inp, budget, tmp_path, "loss", False, lambda _: None)
    assert calls == []  # same objective: reused
    got, _ = ex.family_table(inp, budget, tmp_path, "accuracy", False, lambda _: None)
    assert calls == ["accuracy"] and "accuracy" in got[0]


def test_rebalance_keeps_the_best_balanced_round_within_tolerance(monkeypatch):
    """Of the router biases after each round, rebalance keeps the best balanced one whose held-out loss is within
    the tolerance, not merely the last round within it."""
    import elastic_moe.extract as ex

    imb = iter([2.0, 1.2, 1.5, 1.05])  # start, then rounds 1..3 (round 3 reaches the target of 1.1)
    loss = iter([1.0, 1.0, 1.0, 2.0])  # round 3 is 1 nat worse: out of tolerance
    monkeypatch.setattr(ex, "expert_loads", lambda sub, batches: {})
    monkeypatch.setattr(ex, "imbalance", lambda loads: next(imb))
    monkeypatch.setattr(ex, "heldout_loss", lambda sub, spec, batches: next(loss))
    sub = tiny_model()
    x = torch.randint(3, 100, (2, 6))
    rb = ex.rebalance(sub, [(x, x)], [], rate=0.01, rounds=6, target=1.1, tolerance=0.01)
    assert rb["path"] == [(2.0, 1.0), (1.2, 1.0), (1.5, 1.0), (1.05, 2.0)]
    assert rb["rounds"] == 1 and rb["max_over_mean_after"] == 1.2
