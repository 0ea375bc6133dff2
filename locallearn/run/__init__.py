"""A training run, in every engine mode: the data, a ``Trainer`` over the built model, the run directory
(``config.yaml``, ``metrics.csv``, ``summary.json``, checkpoints, the lock), resume and the epoch loop's
logs. One file per thing a mode adds:

- ``single.py``: ``Run``, one process (``engine.mode=sequential``); every other mode builds on it.
- ``distributed.py``: what every rank of a torchrun job shares (process group, rank 0 owns the directory).
- ``ddp.py``: ``engine.mode=ddp``, each rank trains the whole model on its shard of every batch.
- ``pipeline.py``: ``engine.mode=pipeline``, each rank trains its block group and checkpoints its part.
- ``launch.py``: start, resume or evaluate a run of any mode (what the CLI and ``locallearn.make_run``
  call); how the torchrun modes divide the work and their checkpoints.

The engine arithmetic of each mode stays in ``locallearn/engine/`` (``sequential.py``, ``ddp.py``,
``pipeline.py``, ``distributed.py``); the files here hold what a run keeps around it.
"""

from locallearn.run.single import Run

__all__ = ["Run"]
