"""Golden 5-step loss trajectories per method on a fixed tiny batch (tests/golden/<method>.json).

Refresh after an intended change with ``LOCALLEARN_REFRESH_GOLDEN=1 python -m pytest tests/methods/test_golden.py``.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from methods_util import tiny_batch, tiny_model

from locallearn.engine.sequential import train_step

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
REFRESH = os.environ.get("LOCALLEARN_REFRESH_GOLDEN") == "1"
METHODS = ["predsim", "auglocal", "mlaan", "slm", "predsim+manpp", "auglocal+manpp", "slm+manpp"]


def trajectory(method: str) -> list[list[float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in a fixed order
    try:
        model, optimizers, _ = tiny_model(method, k=3, seed=0)
        batch = tiny_batch(8, seed=1)
        return [[round(o["loss"].item(), 6) for o in train_step(model, batch, optimizers)] for _ in range(5)]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", METHODS)
def test_golden_trajectory(method):
    path = GOLDEN / f"{method.replace('+', '_')}.json"
    got = trajectory(method)
    if REFRESH or not path.exists():
        if not REFRESH:
            pytest.fail(f"{path} is missing; create it with LOCALLEARN_REFRESH_GOLDEN=1")
        path.write_text(json.dumps({"method": method, "setting": "resnet20 8x8, K=3, batch 8, SGD lr 0.05",
                                    "losses": got}, indent=1) + "\n")  # fmt: skip
        pytest.skip(f"refreshed {path.name}")
    want = json.loads(path.read_text())["losses"]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-5), (got, want)
