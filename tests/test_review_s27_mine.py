"""Session 27 review fixes made outside the helpers' files."""

from __future__ import annotations

import os

import pytest

from elastic_moe.async_rl.controller import RunConfig
from elastic_moe.errors import UserError


@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("threads", [-1, 0])
def test_async_rl_thread_count_below_one_gets_one_message_that_names_the_allowed_range(backend, threads):
    # it used to say "must be in [0, ...] (0: torch's default)" for -1 and then "threads >= 1" for 0
    with pytest.raises(UserError) as e:
        RunConfig(backend=backend, threads=threads).validate()
    msg = str(e.value)
    assert f"run.threads = {threads}" in msg and "torch's default" not in msg
    assert (f"[1, {4 * (os.cpu_count() or 1)}]" if backend == "local" else ">= 1") in msg
    RunConfig(backend=backend, threads=1).validate()


@pytest.mark.parametrize("value", ["1e-7", "0", "-1"])
def test_a_tokenizer_sample_below_one_byte_is_refused_at_config_load(value):
    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import DEFAULT_CONFIG, TrainConfig

    # 1e-7 passed "> 0" and then read no text ("empty corpus"); inf is refused by the loader already
    with pytest.raises(UserError, match=r"data.tokenizer_sample_mb = .* at least 1e-06"):
        load_config(TrainConfig, DEFAULT_CONFIG, [f"data.tokenizer_sample_mb={value}"])
