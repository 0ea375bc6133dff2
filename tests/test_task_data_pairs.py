"""Issue 22.1: a task that does not fit the dataset is refused with one line naming both and what would
fit, exit 2, before any data is read or any run directory exists. Every (task, dataset) pair."""

from __future__ import annotations

import pytest

from locallearn.build import TASK_TARGETS, TASKS, check_config
from locallearn.config import load_config
from locallearn.data.datasets import DATASETS, TARGETS
from tests import helpers

PAIRS = [(task, data) for task in TASKS for data in DATASETS]


def test_every_dataset_and_task_says_its_targets() -> None:
    assert set(TARGETS) == set(DATASETS) and set(TASK_TARGETS) == set(TASKS)
    assert set().union(*TARGETS.values()) == set(TASK_TARGETS.values())  # every dataset fits some task
    assert all(held and set(held) <= set(TASK_TARGETS.values()) for held in TARGETS.values())


@pytest.mark.parametrize("task, data", PAIRS)
def test_task_and_data_pair(tmp_path, capsys, task, data) -> None:
    fits = TASK_TARGETS[task] in TARGETS[data]
    args = [f"task.name={task}", f"data.name={data}", f"data.root={tmp_path / 'nothing'}"]
    if fits:
        check_config(load_config(None, args))  # accepted: the data's own checks come next
        return
    out = tmp_path / "runs"
    code, _, err = helpers.run_cli(["train", *args, f"out_dir={out}"], capsys, lines=True)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    line = err[0]
    assert line.startswith(f"locallearn: error: task.name={task} does not fit data.name={data}")
    assert all(held in line for held in TARGETS[data]) and TASK_TARGETS[task] in line  # held, needed
    assert all(
        f"task.name={t}" in line or f" or {t}" in line for t in TASKS if TASK_TARGETS[t] in TARGETS[data]
    )
    assert not out.exists()
