"""The CPU thread count of a run: ``engine.threads``, or a default that suits the data (issue 28)."""

from __future__ import annotations

import torch

# Images this small (8x8 digits) give kernels too short for intra-op threads to pay off: the quick start's
# step took 187 ms on a quiet 2-core machine, and with two busy programs beside it 722 ms at the
# default (2) threads vs 292 ms at 1 (issue 28). Larger images keep torch's default (one thread per core).
ONE_THREAD_UP_TO_PX = 16


_TORCH_THREADS = torch.get_num_threads()  # torch's default, before any run of this process set its own


def set_threads(threads: int | None, image_size: int, device: torch.device) -> str:
    """Set ``engine.threads``, or the default for the data (1 thread for images up to 16 px on a CPU,
    else torch's own); returns the line the run logs (the count changes speed, and float sums' last bits)."""
    if threads:
        why = "engine.threads"
    elif device.type == "cpu" and image_size <= ONE_THREAD_UP_TO_PX:
        threads, why = 1, f"{image_size}x{image_size} images gain nothing from more; set engine.threads=N"
    else:
        threads, why = _TORCH_THREADS, "torch's default, one per core; set engine.threads=N"
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} ({why})"
