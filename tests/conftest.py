import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """A slow test whose name contains `ci_sample` is one of the few end-to-end checks CI runs (marker ci_sample)."""
    import pytest

    for item in items:
        if "ci_sample" in item.name:
            item.add_marker(pytest.mark.ci_sample)
