"""Review session 27: family table consistency, empty data paths, tiny tokenizer samples, damaged shard caches,
site-packages in user corpora, split sizes."""

import json
import types

import pytest

from elastic_moe.errors import UserError

# ------------------------------------------------------------------------------------------ the family table


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


# ------------------------------------------------------------------------------------------ empty data paths


@pytest.mark.parametrize("path", ["", [""], ["a", ""]])
def test_an_empty_data_path_is_refused_not_read_as_the_current_folder(path, tmp_path, monkeypatch):
    from elastic_moe.corpus import Corpus

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_text("some text\n")
    with pytest.raises(UserError, match="empty"):
        Corpus(path)


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


# ------------------------------------------------------------------------------------------ tokenizer sample


def test_a_tokenizer_sample_of_less_than_a_byte_is_named_not_called_an_empty_corpus(tmp_path):
    from elastic_moe.shards import prepare_data

    (tmp_path / "c.txt").write_text("plenty of text here\n" * 100)
    with pytest.raises(UserError, match=r"tokenizer_sample_mb = 1e-07"):
        prepare_data(tmp_path / "c.txt", None, vocab_size=300, seq_len=8, tokenizer_sample_mb=1e-7,
                     cache_dir=tmp_path / "cache", progress=False, log=lambda _: None)


# ------------------------------------------------------------------------------------------ damaged shard cache


@pytest.mark.parametrize("damage", ["documents", "corpus_stats"])
def test_a_shard_cache_meta_without_a_field_is_a_one_line_corrupt_cache_error(tmp_path, damage):
    from elastic_moe.shards import prepare_data

    (tmp_path / "c.txt").write_text("".join(f"document line {i}\n" for i in range(200)))
    kw = dict(vocab_size=300, seq_len=8, cache_dir=tmp_path / "cache", progress=False, log=lambda _: None)
    data = prepare_data(tmp_path / "c.txt", None, **kw)
    meta_path = data.shards_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "documents":
        del meta["splits"]["heldout"]["documents"]
    else:
        del meta["corpus_stats"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="is damaged"):
        prepare_data(tmp_path / "c.txt", None, **kw)


# ------------------------------------------------------------------------------------------ corpus walk


def test_a_user_corpus_keeps_its_site_packages_folder(tmp_path):
    from elastic_moe.corpus import Corpus, default_corpus_root

    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "notes.txt").write_text("kept\n")
    (tmp_path / "top.txt").write_text("top\n")
    assert [f.name for f in Corpus(tmp_path).files] == ["notes.txt", "top.txt"]
    assert all("site-packages" not in f.relative_to(default_corpus_root()).parts for f in Corpus(None).files)


@pytest.mark.parametrize("max_chars", [0, -1])
def test_splitting_into_pieces_of_no_characters_is_refused_at_once(max_chars):
    from elastic_moe.corpus import split_text
    from elastic_moe.shards import split_document

    with pytest.raises(ValueError, match="max_chars"):
        split_text(["abc\ndef\n"], max_chars)
    with pytest.raises(ValueError, match="max_chars"):
        split_document("abc\ndef\n", max_chars)


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
