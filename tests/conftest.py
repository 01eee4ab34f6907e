import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """A slow test whose name contains `ci_sample` is one of the few end-to-end checks CI runs (marker ci_sample)."""
    import pytest

    for item in items:
        if "ci_sample" in item.name:
            item.add_marker(pytest.mark.ci_sample)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """A short elastic pre-training run (synthetic corpus) with a tokenizer, held-out data and importance orders."""
    from helpers import MICRO

    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import TrainConfig, train

    root = tmp_path_factory.mktemp("family_run")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return class".split()
    for i in range(60):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(5, 30))]
        (corpus / f"doc{i:03d}.txt").write_text(f"document {i}\n" + "\n".join(lines) + "\n")
    toml = root / "micro.toml"
    toml.write_text(MICRO.replace("[data]\n", f"[data]\npath = {json.dumps(str(corpus))}\n"
                                              f"cache_dir = {json.dumps(str(root / 'cache'))}\n"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(load_config(TrainConfig, toml), root / "run", log=lambda _: None)
    torch.set_num_threads(n)
    return root / "run"
