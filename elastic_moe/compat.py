"""The torch version, for the few places that behave differently across the torch releases we support (2.6+).

Where a feature can be probed directly, the code probes it (`ops.grouped_mm_available`); this is for the cases
where an older release has the feature but it fails or gives wrong results (docs/benchmarks/torch_compat.md).
"""

import torch


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch: (2, 13) for "2.13.0+cpu"."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)
