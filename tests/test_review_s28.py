"""Session 28 fixes: each test failed before its fix."""

import pytest

from elastic_moe.errors import UserError


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
