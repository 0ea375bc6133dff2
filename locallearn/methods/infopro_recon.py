"""InfoPro's reconstruction target at the decoder's resolution (``recon_at: feature``), one per batch.

The papers' decoders upsample every cut's feature map to the full image and reconstruct there; with
``recon_at: feature`` the decoder stays at the map's own resolution and the target is the image
downsampled to it instead. The downsample is an area average (``adaptive_avg_pool2d``): each target
pixel is the mean of the image pixels its feature cell covers, the low-pass image a map at that stride
can hold at all; it stays in [0, 1] (a valid BCE target) and does not alias, where bilinear resizing
by a factor above 2 reads 4 pixels of every r x r cell and drops the rest.

K blocks whose maps share a resolution share one downsample: ``ReconTargets`` keeps the targets of the
current batch by size. The key is the batch's image tensor itself (held by a weak reference, so the
cache never keeps a batch alive) and its in-place version counter; a new image empties the cache, and
the targets are computed without autograd, so no graph is ever held.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from locallearn.types import Batch


class ReconTargets:
    """The un-normalised [0, 1] image of the current batch, area-downsampled to each size asked for."""

    def __init__(self) -> None:
        self._versions: tuple = ()
        self._refs: tuple = ()
        self._targets: dict[tuple[int, int], torch.Tensor] = {}
        self.computed = 0  # downsamples run (tests count them)

    def _same_batch(self, parts: tuple, versions: tuple) -> bool:
        return (
            versions == self._versions
            and len(self._refs) == len(parts)
            and all(
                (r is None and t is None) or (r is not None and r() is t) for r, t in zip(self._refs, parts)
            )
        )

    @torch.compiler.disable  # weak references and a dict: plain Python, run eagerly in a compiled aux
    def get(self, batch: Batch, size: tuple[int, int]) -> torch.Tensor:
        size = (int(size[0]), int(size[1]))
        parts = (batch.x, batch.mean, batch.std)
        if torch.is_inference_mode_enabled() or any(t is not None and t.is_inference() for t in parts):
            return self._compute(batch, size)  # inference tensors keep no version counter: no cache
        versions = tuple(t._version for t in parts if t is not None)  # in-place edits of the image
        if not self._same_batch(parts, versions):
            self._versions = versions
            self._targets = targets = {}
            # drop this batch's targets as soon as its image dies, not at the next batch
            self._refs = tuple(
                None if t is None else weakref.ref(t, lambda _r, d=targets: d.clear()) for t in parts
            )
        target = self._targets.get(size)
        if target is None:
            self._targets[size] = target = self._compute(batch, size)
        return target

    def _compute(self, batch: Batch, size: tuple[int, int]) -> torch.Tensor:
        self.computed += 1
        with torch.no_grad():
            image = batch.image.clamp(0, 1)
            return image if tuple(image.shape[-2:]) == size else F.adaptive_avg_pool2d(image, size)

    # A model may be deep-copied or pickled (checkpoints, the pipeline's ranks): the copy starts empty.
    def __deepcopy__(self, memo: dict) -> ReconTargets:
        return type(self)()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
