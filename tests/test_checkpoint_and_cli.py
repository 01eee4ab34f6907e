"""Checkpoint format, interop commands and their bad-input errors: one line, nothing on disk lost."""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import small_tokenizer, tiny_config, tiny_model

from elastic_moe import cli
from elastic_moe.atomic import atomic_dir, atomic_write_text
from elastic_moe.checkpoint import load_checkpoint, save_checkpoint
from elastic_moe.cli import main
from elastic_moe.commands import arg_types
from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.tomlconfig import load_config


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(tmp_path / "ckpt", tiny_model())


def test_roundtrip_is_exact(ckpt):
    model, meta = load_checkpoint(ckpt)
    x = torch.randint(3, 101, (1, 8))
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, tiny_model()(x).logits)
    assert meta["format"] == "elastic-moe/1"


def test_truncated_checkpoint_is_rejected(ckpt):
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt: checksum mismatch on model.safetensors"):
        load_checkpoint(ckpt)


def test_flipped_byte_and_broken_config_are_rejected(ckpt):
    w = ckpt / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is corrupt"):
        load_checkpoint(ckpt)


def test_incompatible_config_is_named(ckpt):
    with pytest.raises(UserError, match="incompatible model config .*hidden_size"):
        load_checkpoint(ckpt, expect=tiny_config(hidden_size=64))


def test_config_unknown_key_and_impossible_sizes(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text("hidden_size = 32\nnum_experts = 8\n")
    with pytest.raises(UserError, match="unknown config key.*num_experts"):
        load_config(ModelConfig, bad)
    bad.write_text("moe_num_experts = 4\nmoe_k = 6\n")
    with pytest.raises(UserError, match="moe_k=6 exceeds moe_num_experts=4"):
        load_config(ModelConfig, bad)
    bad.write_text("hidden_size = 30\nnum_attention_heads = 4\n")
    with pytest.raises(UserError, match="not divisible"):
        load_config(ModelConfig, bad)
    bad.write_text("hidden_size = [")
    with pytest.raises(UserError, match="malformed config"):
        load_config(ModelConfig, bad)


def test_failed_save_leaves_previous_checkpoint_intact(ckpt):
    before = (ckpt / "model.safetensors").read_bytes()

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(ckpt, tiny_model(seed=1), extra={"optimizer.pt": boom})
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]  # no temporary folder left


def test_export_and_import_commands(tmp_path, capsys, ckpt, monkeypatch):
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    old_mask = os.umask(0o022)
    try:
        code, out, _ = run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"), "--layers", "3", "--experts", "4",
                               "--top-k", "1")
    finally:
        os.umask(old_mask)
    assert code == 0 and "exported" in out
    # readable by others (a serving container), as any new file under umask 022: temporary files are made 0600
    for p in [tmp_path / "hf", *(tmp_path / "hf").rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "ernie4_5_moe" and cfg["num_hidden_layers"] == 3 and cfg["moe_num_experts"] == 4
    # refuses to overwrite, and the existing export is untouched
    stamp = (tmp_path / "hf" / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"))
    assert code == 2 and "not empty" in err and err.count("\n") == 1
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == stamp
    code, _, _ = run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"), "--force")
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").read_bytes() != stamp
    code, out, _ = run_cli(capsys, "import-hf", str(tmp_path / "hf"), str(tmp_path / "back"))
    assert code == 0
    back, _ = load_checkpoint(tmp_path / "back")
    x = torch.randint(3, 101, (1, 8))
    with torch.no_grad():
        assert torch.allclose(back.eval()(x).logits, tiny_model()(x).logits, atol=1e-5)
    # with a tokenizer, which import-hf copies through a temporary folder: nothing of it is left behind
    tok = small_tokenizer()
    tok.save(tmp_path / "tok")
    save_checkpoint(tmp_path / "with_tok", tiny_model(vocab_size=tok.vocab_size), tokenizer_dir=tmp_path / "tok")
    assert run_cli(capsys, "export", str(tmp_path / "with_tok"), str(tmp_path / "hf_tok"))[0] == 0
    assert run_cli(capsys, "import-hf", str(tmp_path / "hf_tok"), str(tmp_path / "back_tok"))[0] == 0
    assert (tmp_path / "back_tok" / "tokenizer" / "tokenizer.json").is_file()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_an_output_over_its_own_input_is_refused_even_with_force(tmp_path, capsys, ckpt):
    """--force replaces an occupied output; not when that output is the input, or a folder holding it."""
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for argv, words in ((["export", str(ckpt), str(ckpt)], f"{ckpt} is the input"),
                        (["export", str(ckpt), str(tmp_path)], f"{tmp_path} holds the input {ckpt}"),
                        (["import-hf", str(ckpt), str(ckpt)], f"{ckpt} is the input")):
        code, _, err = run_cli(capsys, *argv, "--force")
        assert code == 2 and words in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def test_import_refuses_other_model_type(tmp_path, capsys, ckpt):
    run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "import-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert code == 2 and "model_type is 'llama', expected 'ernie4_5_moe'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_malformed_tokenizer_and_a_file_as_output(tmp_path, capsys, ckpt):
    run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"))
    (tmp_path / "hf" / "tokenizer.json").write_text("garbage")
    code, _, err = run_cli(capsys, "import-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert code == 2 and "malformed tokenizer" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("keep")
    code, _, err = run_cli(capsys, "import-hf", str(tmp_path / "hf"), str(tmp_path / "afile"))
    assert code == 2 and "exists and is not a folder" in err and (tmp_path / "afile").read_text() == "keep"


def test_export_of_corrupt_checkpoint_and_impossible_spec(tmp_path, capsys, ckpt):
    code, _, err = run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"), "--top-k", "5", "--experts", "3")
    assert code == 2 and "top_k=5 exceeds the 3 experts" in err
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    code, _, err = run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"))
    assert code == 2 and "corrupt" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc: a folder where nothing can be created")
def test_unwritable_output_is_a_one_line_error_naming_it(tmp_path, capsys, ckpt):
    # even as root (permission bits are no obstacle to root), nothing can be created in /proc
    with pytest.raises(OSError) as e:
        atomic_write_text("/proc/elastic-moe-test.txt", "x")
    assert e.value.filename == "/proc/elastic-moe-test.txt"  # not the temporary file's name
    with pytest.raises(OSError) as e, atomic_dir("/proc/elastic-moe-test"):
        pass
    assert e.value.filename == "/proc/elastic-moe-test"
    code, _, err = run_cli(capsys, "export", str(ckpt), "/proc/elastic-moe-test")
    assert code == 2 and err.startswith("elastic-moe export: error: /proc/elastic-moe-test: ") and err.count("\n") == 1


def test_export_refuses_a_malformed_tokenizer(tmp_path, capsys, ckpt):
    (ckpt / "tokenizer").mkdir()
    (ckpt / "tokenizer" / "tokenizer.json").write_text("garbage")
    code, _, err = run_cli(capsys, "export", str(ckpt), str(tmp_path / "hf"))
    assert code == 2 and "malformed tokenizer" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_checkpoint_without_layer_order_flag_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = save_checkpoint(tmp_path / "old", tiny_model())
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["layer_order_set"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "config.json").read_text())
    from elastic_moe.checkpoint import sha256_file

    meta["sha256"]["model.safetensors"] = sha256_file(ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps(meta))
    model, _ = load_checkpoint(ckpt)
    assert not bool(model.layer_order_set)


@pytest.mark.parametrize("flag, value", [("--active-frac", "0"), ("--active-frac", "1.5"), ("--max-steps", "-1")])
def test_quickstart_checks_its_flags_before_training(tmp_path, capsys, flag, value):
    code, _, err = run_cli(capsys, "quickstart", "--out", str(tmp_path / "q"), flag, value)
    assert code == 2 and err.startswith(f"elastic-moe quickstart: error: {flag} ") and err.count("\n") == 1
    assert "must be" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_quickstart_end_to_end_and_resume_ci_sample(tmp_path, capsys, monkeypatch):
    """The README's main command, shortened: pre-train, family slice, extraction (+ HF folder), report; a second
    call skips every finished stage."""
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--max-steps", "3", "--skip-posttrain"]) == 0
    report = (out / "report.md").read_text()
    assert "Elastic pre-training" in report and "Extracted under a budget" in report
    # tables read from the stages' outputs: held-out losses, the family's frontier, extracted against full, samples
    assert "| full | " in report and "| sub-model | active params (M) |" in report
    assert "| active params (M) |" in report and "extracted / full" in report and "Greedy completions" in report
    assert (out / "extracted-hf" / "config.json").is_file() and (out / "family" / "family.csv").is_file()
    capsys.readouterr()
    assert main(["quickstart", "--out", str(out), "--max-steps", "3", "--skip-posttrain"]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 3
    monkeypatch.chdir(tmp_path)  # the same folder spelled another way is the same run
    assert main(["quickstart", "--out", "./qs/../qs", "--max-steps", "3", "--skip-posttrain"]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 3
    (out / "sub").mkdir()
    monkeypatch.chdir(out / "sub")  # from inside --out: the markers' paths are relative to --out, not to here
    assert main(["quickstart", "--out", "..", "--max-steps", "3", "--skip-posttrain"]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 3
    monkeypatch.chdir(tmp_path)
    # another budget re-runs the extraction (and the report follows it); another --max-steps is refused, since
    # every later stage was built on the pre-trained checkpoint
    assert main(["quickstart", "--out", str(out), "--max-steps", "3", "--skip-posttrain", "--active-frac", "0.72"]) == 0
    assert "extract: arguments changed, run again" in capsys.readouterr().out
    budget = json.loads((out / "extracted" / "config.json").read_text())["extract"]["budget"]["limit"]
    assert f"at most {budget / 1e6:.3f} M active" in (out / "report.md").read_text()
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    code, _, err = run_cli(capsys, "quickstart", "--out", str(out), "--max-steps", "4", "--skip-posttrain")
    assert code == 2 and "was made with pretrain --max-steps 3" in err and err.count("\n") == 1
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_changed_settings_compares_leaves_as_json_has_them(tmp_path):
    from elastic_moe.tomlconfig import changed_settings, note_changed_settings

    old = {"init": "a", "optim": {"lr": 0.1, "betas": [0.9, 0.95]}, "data": {"domains": ["code"]}}
    same = {"init": "b", "optim": {"lr": 0.1, "betas": (0.9, 0.95)}, "data": {"domains": ("code",)}}
    assert changed_settings(old, same, skip=("init",)) == []
    assert changed_settings(old, same) == ["init a -> b"]
    new = {"optim": {"lr": 0.2, "betas": [0.9, 0.95]}, "data": {"domains": ["code"], "seed": 1}}
    assert changed_settings(old, new, skip=("init",)) == ["data.seed None -> 1", "optim.lr 0.1 -> 0.2"]
    said = []
    note_changed_settings(tmp_path, new, said.append)  # no config.json yet: nothing to compare
    (tmp_path / "config.json").write_text(json.dumps(old))
    note_changed_settings(tmp_path, {**new, "init": "a"}, said.append)
    assert said == ["note: settings changed since the last session: data.seed None -> 1; optim.lr 0.1 -> 0.2"]
    (tmp_path / "config.json").write_bytes(b"\xff{")
    with pytest.raises(UserError, match="config.json is corrupt"):
        note_changed_settings(tmp_path, new, said.append)


def test_version_flag(capsys):
    from elastic_moe import __version__

    for argv in (["--version"], ["--version", "pretrain"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and capsys.readouterr().out.strip() == f"elastic-moe {__version__}"


def test_a_run_folder_of_another_command_is_named_as_such(tmp_path, capsys):
    from elastic_moe.train import DEFAULT_CONFIG

    run = tmp_path / "pretrain_run"
    run.mkdir()
    (run / "config.toml").write_text(Path(DEFAULT_CONFIG).read_text())
    from elastic_moe.posttrain import DEFAULT_CONFIG as PIPELINE
    from elastic_moe.sft import DEFAULT_CONFIG as SFT

    attempts = [["sft", "--out", str(run), "--max-steps", "1"], ["rl", "--out", str(run), "--max-steps", "1"],
                ["sft", str(SFT), "--out", str(run)],  # a config of its own does not make the folder its own
                ["posttrain", "--out", str(run), "--init", str(run), "--quick"],
                ["quickstart", "--out", str(run)], ["async-rl", "--out", str(run)]]
    for argv in attempts:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and f"{run} holds a run of another command" in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]
    # a post-training pipeline's folder, and a quickstart's, are named by the file each leaves
    for owner, sign in (("posttrain", "pipeline.json"), ("quickstart", ".stages")):
        other = tmp_path / owner
        other.mkdir()
        (other / sign).write_text("{}")
        argvs = [["sft", str(SFT), "--out", str(other)], ["pretrain", "--out", str(other), "--max-steps", "1"],
                 ["posttrain", str(PIPELINE), "--out", str(other), "--quick"], ["quickstart", "--out", str(other)]]
        for argv in argvs:
            if argv[0] == owner:
                continue
            code, _, err = run_cli(capsys, *argv)
            assert code == 2 and f"holds a run of `elastic-moe {owner}` ({sign})" in err, (argv, err)
        assert sorted(p.name for p in other.iterdir()) == [sign]
    (run / "config.toml").write_text("[train\n")  # a damaged file of the same command is named as damaged
    code, _, err = run_cli(capsys, "sft", "--out", str(run), "--max-steps", "1")
    assert code == 2 and f"malformed config {run / 'config.toml'}" in err and "another command" not in err, err


def test_a_hugging_face_folder_given_as_checkpoint_points_to_import_hf(tmp_path, capsys, ckpt):
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "generate", str(tmp_path / "hf"), "--prompt", "x")
    assert code == 2 and "not an elastic-moe checkpoint" in err and "elastic-moe import-hf" in err
    assert err.count("\n") == 1


def test_sigterm_unwinds_like_ctrl_c_with_its_own_exit_code(tmp_path, capsys, monkeypatch):
    """SIGTERM outside a training loop raises through every `finally` (temporary outputs are removed) and the
    command exits 143 with one line; a stage that stopped on a signal stops the quickstart the same way."""
    import os
    import signal

    from elastic_moe.commands import export, quickstart
    from elastic_moe.errors import Interrupted

    def run(args):
        with atomic_dir(tmp_path / "out"):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(export, "run", run)
    handler = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(capsys, "export", "a", "b")
    assert code == 143 and err.strip() == "elastic-moe export: interrupted by SIGTERM"
    assert list(tmp_path.iterdir()) == []  # the temporary folder went with the interruption
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handler is back after the command

    monkeypatch.setattr(cli, "main", lambda argv: 130)
    with pytest.raises(Interrupted, match="stage `elastic-moe pretrain`") as e:
        quickstart._cli("pretrain", "--out", "x")
    assert e.value.signum == signal.SIGINT


def test_atomic_savefig_and_stale_replaced_folders(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elastic_moe.atomic import atomic_savefig

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_savefig(fig, tmp_path / "a.png")
    plt.close(fig)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]

    # a folder replaced by a process killed before it could remove the old copy: removed by the next replacement,
    # but only once the new folder is in place (until then the old one is the only copy)
    out = tmp_path / "out"
    atomic_write_text(out / "f", "new")
    stale = tmp_path / ".out.old.999999999"
    atomic_write_text(stale / "f", "old")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "f").write_text("newer")
    assert not stale.exists() and (out / "f").read_text() == "newer"
    missing = tmp_path / "gone"
    kept = tmp_path / ".gone.old.999999999"
    atomic_write_text(kept / "f", "only copy")
    with atomic_dir(missing) as tmp:
        (tmp / "f").write_text("x")
    assert kept.exists()


@pytest.mark.parametrize("argv, words", [
    (["generate", "{ck}", "--prompt", "x", "--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
    (["generate", "{ck}", "--prompt", "x", "--seed", "99999999999999999999999"], "is too large"),
    (["generate", "{ck}", "--prompt", "x", "--device", "foo"], "argument --device: 'foo' is not a device"),
    (["generate", "{ck}", "--prompt", "\udcff\udcfe"], "--prompt is not valid UTF-8 text"),
    (["generate", "{ck}", "--prompt", "x", "--stop", ""], "--stop '' would stop before the first token"),
    (["family", "{ck}", "--threads", "-1"], "argument --threads: -1 must be >= 0"),
    (["family", "{ck}", "--max-measured", "0"], "argument --max-measured: 0 must be >= 1"),
    (["extract", "{ck}", "{tmp}/x", "--max-total-params", "inf"], "expected a parameter count"),
    (["extract", "{ck}", "{tmp}/x", "--max-active-params", "1M", "--heal", "-5"], "argument --heal: -5 must be >= 0"),
    (["sandbox", "{ck}/config.json", "--timeout", "inf"], "argument --timeout: 'inf' is not a finite number"),
    (["extract", "{ck}", "{tmp}/x", "--max-latency-ms", "5", "--batch-size", "0"], "--batch-size: 0 must be >= 1"),
    (["extract", "{ck}", "{tmp}/x", "--max-active-params", "1M", "--heal", "100", "--heal-lr", "-1"],
     "argument --heal-lr: '-1' must be > 0"),
    (["extract", "{ck}", "{tmp}/x", "--max-active-params", "1M", "--heal-lr", "1e-3"], "pass --heal TOKENS too"),
    (["extract", "{ck}", "{tmp}/x", "--max-active-params", "1M", "--objective", "accuracy"],
     "`elastic-moe family CKPT --objective accuracy --tasks DOMAIN` first"),
])
def test_bad_flag_values_are_one_line_errors_before_any_work(tmp_path, capsys, ckpt, argv, words):
    argv = [a.format(ck=ckpt, tmp=tmp_path) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses a value of the wrong type
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"elastic-moe {argv[0]}: error: " in err and words in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(hidden_size="128"), "hidden_size = '128' is not a valid int"),
    (lambda d: d.update(hidden_size=128.5), "hidden_size = 128.5 is not a valid int"),
    (lambda d: d.update(num_attention_heads=0, head_dim=None), "malformed value (ZeroDivisionError"),
    (lambda d: d.update(eos_token_id=[]), "malformed value (IndexError"),
    (lambda d: d.update(rope_parameters="x"), "malformed value (AttributeError"),
    (lambda d: d.update(rms_norm_eps=-1.0), "rms_norm_eps must be > 0"),
    ([1], "config.json is corrupt (not a JSON object)"),
])
def test_import_hf_refuses_malformed_configs_in_one_line(tmp_path, capsys, ckpt, edit, words):
    hf = tmp_path / "hf"
    assert main(["export", str(ckpt), str(hf)]) == 0
    d = json.loads((hf / "config.json").read_text())
    if callable(edit):
        edit(d)
    else:
        d = edit
    (hf / "config.json").write_text(json.dumps(d))
    code, _, err = run_cli(capsys, "import-hf", str(hf), str(tmp_path / "out"))
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_import_hf_refuses_a_corrupt_index_and_mismatched_shapes(tmp_path, capsys, ckpt):
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    assert main(["export", str(ckpt), str(hf)]) == 0
    tensors = load_file(str(hf / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("self_attn.q_proj.weight"))
    tensors[name] = tensors[name][:, :-2].contiguous()
    save_file(tensors, str(hf / "model.safetensors"))
    code, _, err = run_cli(capsys, "import-hf", str(hf), str(tmp_path / "out"))
    assert code == 2 and "tensor shapes do not fit config.json" in err, err
    (hf / "model.safetensors.index.json").write_text("{not json")
    code, _, err = run_cli(capsys, "import-hf", str(hf), str(tmp_path / "out"))
    assert code == 2 and "model.safetensors.index.json is corrupt" in err, err


def test_a_checkpoint_config_without_its_model_or_checksums_is_corrupt(ckpt):
    path = ckpt / "config.json"
    d = json.loads(path.read_text())
    for broken in ({k: v for k, v in d.items() if k != "model"}, {**d, "sha256": ["x"]}):
        path.write_text(json.dumps(broken))
        with pytest.raises(UserError, match="config.json is corrupt"):
            load_checkpoint(ckpt)


def test_read_json_and_read_metrics_survive_damaged_files(tmp_path):
    from elastic_moe.atomic import read_json
    from elastic_moe.metrics import read_metrics

    (tmp_path / "a.json").write_bytes(b"{broken")
    with pytest.raises(UserError, match="a.json is corrupt"):
        read_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[1]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_json(tmp_path / "b.json")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\n[2]\n{"step": 2}\n{"step": ')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


def test_a_second_command_on_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two commands writing one run folder at once would interleave checkpoints and metrics."""
    import os

    from elastic_moe.atomic import run_lock

    run = tmp_path / "run"
    with run_lock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        for argv in (["pretrain", "--out", str(run), "--max-steps", "1"], ["async-rl", "--out", str(run)],
                     ["quickstart", "--out", str(run)]):
            code, _, err = run_cli(capsys, *argv)
            assert code == 2 and f"{run} is in use by another process (pid {os.getpid()})" in err, err
    assert not run.exists()  # made by the lock, left empty: removed with it
    run.mkdir()
    (run / "keep").write_text("x")
    with run_lock(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["keep"]


def test_a_checkpoint_folder_reaches_the_disk_before_it_is_put_in_place(tmp_path, monkeypatch):
    # every file of the temporary folder is fsynced before the rename (shards, tokenizer and checkpoints are written
    # with plain writes inside atomic_dir); a power cut then cannot leave a checkpoint in place with empty files
    import elastic_moe.atomic as atomic

    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or
                        real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: renamed.append((str(a), sorted(synced))) or
                        real_replace(a, b))
    ck = save_checkpoint(tmp_path / "ck", tiny_model(), meta={"step": 1})
    tmp, synced_then = renamed[-1]
    files = [str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file()]
    assert files and all(any(s == f"{tmp}/{f}" for s in synced_then) for f in files), (files, synced_then)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("text", ["meta", "mps", "cpu:1"])
def test_device_argument_refuses_devices_the_commands_cannot_run_on(text):
    # before: accepted; loading a checkpoint then failed with a traceback (mps) or called it corrupt (meta, cpu:1)
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        arg_types.device(text)
    assert arg_types.device("cpu") == "cpu"
