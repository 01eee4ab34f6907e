import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """A slow test whose name contains `ci_sample` is one of the few end-to-end checks CI runs (marker ci_sample);
    a `gpu` test is skipped where there is no CUDA, whatever `-m` selects."""
    no_cuda = pytest.mark.skip(reason="gpu test: no CUDA here")
    for item in items:
        if "ci_sample" in item.name:
            item.add_marker(pytest.mark.ci_sample)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ray_cluster():
    """A local Ray cluster of 2 CPUs of this test's own, shut down after it: none left running into later tests,
    and none from an earlier test reused with other resources."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """A short elastic pre-training run (synthetic corpus) with a tokenizer, held-out data and importance orders."""
    from helpers import MICRO, write_micro_toml, write_synthetic_corpus

    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import TrainConfig, train

    root = tmp_path_factory.mktemp("family_run")
    corpus = write_synthetic_corpus(root / "corpus", docs=60, max_lines=30)
    toml = write_micro_toml(root / "micro.toml", MICRO, corpus, root / "cache")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(load_config(TrainConfig, toml), root / "run", log=lambda _: None)
    torch.set_num_threads(n)
    return root / "run"


@pytest.fixture(scope="module")
def inputs(micro_run):
    """The family / extract inputs of `micro_run` (model, held-out batches), made again for each test module."""
    from elastic_moe.family import load_inputs

    return load_inputs(micro_run, device="cpu", eval_batch_size=4, eval_batches=2, log=lambda _: None)


@pytest.fixture(scope="module")
def short_context_ckpt(tmp_path_factory):
    """A tiny policy with its tokenizer and a context of 160 tokens (shorter than many demonstrations)."""
    from helpers import small_tokenizer, tiny_config

    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.model import ElasticMoE

    root = tmp_path_factory.mktemp("short_ctx")
    tok = small_tokenizer()
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=160))
    return save_checkpoint(root / "init", model, meta={"step": 0}, tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def arith_task():
    """A task of the reasoning suite's `arith` family."""
    from elastic_moe.tasks import get_suite

    return next(t for t in get_suite("reasoning", "train", 20, 0, 1) if t.metadata["family"] == "arith")
