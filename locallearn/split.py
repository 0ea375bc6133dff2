"""Cut a backbone's layer list into K gradient-isolated blocks.

A *cut* is the index of the first layer of a block; K blocks have K-1 cuts, strictly increasing in
``1 .. num_layers-1``. K counts every block, the last one (trained by the task head) included.

Modes: explicit ``cuts``; ``even`` (equal layers per block, the first blocks take the remainder);
or a paper table. Paper tables are written as the official code writes them, ``[stage, block]``
pairs ("cut after unit ``block`` of stage ``stage``", stage 0 = the stem), and converted to cut
indices here through the backbone's ``stage_block_to_layer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from locallearn.metrics.memory import ActivationMeter

# InfoPro-Pytorch "Experiments on CIFAR-SVHN-STL10/networks/configs.py" (PRIOR_ART §2.1); K-1 entries,
# each "cut after [stage, block]". ResNet-110 K=32 comes from the MLAAN/MAN lists (config2.py / config.py,
# the entries below minus their end marker), so the stem trains with the first block there, as in those
# repos. ResNet-110 K=55 is AugLocal's per-K table "55:" (networks/configs.py, PRIOR_ART §4.1): a cut
# after every layer but the last, the stem alone in block 0 (MAN++'s "K=55" is the same 55 blocks).
_R110_32 = [
    [1, 1], [1, 2], [1, 4], [1, 5], [1, 7], [1, 9], [1, 11], [1, 13], [1, 14], [1, 16], [1, 17],
    [2, 1], [2, 2], [2, 4], [2, 5], [2, 7], [2, 9], [2, 11], [2, 13], [2, 14], [2, 16], [2, 17],
    [3, 1], [3, 3], [3, 4], [3, 6], [3, 7], [3, 9], [3, 11], [3, 13], [3, 15], [3, 17],
]  # fmt: skip
_EVERY_110 = [[s, b] for s in (1, 2, 3) for b in range(18)]
_EVERY_32 = [[s, b] for s in (1, 2, 3) for b in range(5)]

INFOPRO = {
    "resnet32": {
        2: [[2, 1]],
        3: [[1, 4], [2, 4]],
        4: [[1, 2], [2, 1], [3, 0]],
        8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: [[0, 0]] + _EVERY_32[:-1],
    },
    "resnet110": {
        2: [[2, 8]],
        3: [[1, 17], [2, 17]],
        4: [[1, 11], [2, 7], [3, 3]],
        8: [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        16: [
            [1, 1],
            [1, 4],
            [1, 7],
            [1, 10],
            [1, 13],
            [1, 16],
            [2, 1],
            [2, 4],
            [2, 7],
            [2, 11],
            [2, 15],
            [3, 1],
            [3, 5],
            [3, 9],
            [3, 13],
        ],  # fmt: skip
        32: _R110_32[:-1],
        55: [[0, 0]] + _EVERY_110[:-1],
    },
}

# InfoPro* "balanced memory" (InfoPro_balanced_memory in the same file): fewer layers in the early,
# activation-heavy blocks. Only ResNet-110 on CIFAR-10 (STL-10's 3-block entry differs: [[1, 8], [2, 1]]).
INFOPRO_BALANCED = {
    "resnet110": {
        2: [[1, 14]],
        3: [[1, 9], [2, 2]],
        4: [[1, 6], [1, 14], [2, 8]],
    },
}

# MAN++ (MAN_PlusPlus "Exp_on_CIFAR-SVHN-STL/networks/config.py", PRIOR_ART §6.3): the repo lists segment
# *ends* and adds an explicit stem block in front, so its "K" label counts one block fewer than ours
# whenever the list does not already start at the stem. Keys here are our K (true block count):
# ResNet-32 paper "K=8" -> 9 blocks, "K=16" -> 16; ResNet-110 "K=32" -> 33, "K=55" -> 55.
MANPP = {
    "resnet32": {
        9: [[0, 0], [1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: [[0, 0]] + _EVERY_32[:-1],
    },
    "resnet110": {
        33: [[0, 0]] + _R110_32[:-1],
        55: [[0, 0]] + _EVERY_110[:-1],
    },
}

# ImageNet tables. Same notation: [stage, block] = "cut after unit `block` of torchvision `layer{stage}`"
# (ViT: stage 1 = the encoder, block b = encoder block b; VGG: stage s = the convs before the s-th pool).
# InfoPro ImageNet K=2 (InfoPro-Pytorch "Experiments on ImageNet", k2_infopro, PRIOR_ART §2.7).
INFOPRO.update(
    {
        "resnet101": {2: [[2, 0]]},
        "resnet152": {2: [[2, 5]]},
        "resnext101_32x8d": {2: [[2, 2]]},
    }
)
# MAN++ ImageNet (MAN_PlusPlus Exp_on_ImageNet/networks/configs.py, PRIOR_ART §6.3; the trailing end
# marker [4, 2] dropped). ViT (vit_man.py): K=4 groups of 3 encoder blocks, the embedding in group 0;
# K=6 (groups of 2) is the paper's other setting, not in the code. VGG-13 K=10 (DGL + MAN++): one conv
# per block.
_R101_MANPP = {2: [[2, 0]], 4: [[2, 2], [3, 8], [3, 16]]}
_VIT_MANPP = {4: [[1, 2], [1, 5], [1, 8]], 6: [[1, 1], [1, 3], [1, 5], [1, 7], [1, 9]]}
_VGG13_MANPP = {10: [[s, b] for s in range(1, 6) for b in range(2)][:-1]}
MANPP.update(
    {
        "resnet34": {2: [[2, 0]]},  # configs.py resnet34 2: [[2, 0], [4, 2]]
        "resnet101": _R101_MANPP,
        "resnext101_32x8d": _R101_MANPP,
        "resnet152": {2: [[2, 5]], 4: [[2, 6], [3, 13], [3, 25]]},
        "vgg13": _VGG13_MANPP,
        "vgg13_bn": _VGG13_MANPP,
        **{vit: _VIT_MANPP for vit in ("vit_tiny", "vit_small", "vit_base")},
    }
)
# HPFF ImageNet K=4 (Zeudfish/HPFF "Exp on Imagenet" config, PRIOR_ART §9; end marker dropped).
_R101_HPFF = {4: [[3, 0], [3, 9], [3, 17]]}
HPFF = {
    "resnet34": {4: [[2, 0], [3, 0], [3, 5]]},
    "resnet101": _R101_HPFF,
    "resnet152": _R101_HPFF,
    "resnext101_32x8d": _R101_HPFF,
}

TABLES: dict[str, dict[str, dict[int, list[list[int]]]]] = {
    "infopro": INFOPRO,
    "infopro_balanced": INFOPRO_BALANCED,
    "manpp": MANPP,
    "hpff": HPFF,
}
MODES = ("even", "cuts", "balanced", *TABLES)


def even_cuts(num_layers: int, num_blocks: int) -> list[int]:
    """Equal layers per block; the first ``num_layers % num_blocks`` blocks get one layer more."""
    check_num_blocks(num_layers, num_blocks)
    base, extra = divmod(num_layers, num_blocks)
    cuts, start = [], 0
    for k in range(num_blocks - 1):
        start += base + (1 if k < extra else 0)
        cuts.append(start)
    return cuts


def check_num_blocks(num_layers: int, num_blocks: int) -> None:
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks (K) must be an integer >= 1, got {num_blocks!r}")
    if num_blocks > num_layers:
        raise ValueError(
            f"num_blocks (K) = {num_blocks} is impossible: the backbone has only {num_layers} layers "
            f"(valid K: 1..{num_layers})"
        )


def check_cuts(cuts: Sequence[int], num_layers: int) -> list[int]:
    cuts = list(cuts)
    if any(not isinstance(c, int) for c in cuts):
        raise ValueError(f"cuts must be integers, got {cuts}")
    if any(c < 1 or c > num_layers - 1 for c in cuts):
        raise ValueError(
            f"cuts must lie in 1..{num_layers - 1} (layer indices; 0 is the first layer), got {cuts}"
        )
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cuts must be strictly increasing, got {cuts}")
    return cuts


def table_cuts(
    table: str, arch: str, num_blocks: int, num_layers: int, to_layer: Callable[[int, int], int] | None
) -> list[int]:
    if table not in TABLES:
        raise ValueError(f"unknown split table {table!r}; choose from {sorted(TABLES)}")
    by_arch = TABLES[table]
    if arch not in by_arch:
        raise ValueError(
            f"split table {table!r} has no entry for backbone {arch!r}; it covers {sorted(by_arch)}"
        )
    if num_blocks == 1:
        return []
    if num_blocks not in by_arch[arch]:
        raise ValueError(
            f"split table {table!r} has no K={num_blocks} for {arch}; valid K: {[1, *sorted(by_arch[arch])]}"
        )
    if to_layer is None:
        raise ValueError(f"backbone {arch!r} cannot convert [stage, block] pairs into layer indices")
    return check_cuts([to_layer(s, b) + 1 for s, b in by_arch[arch][num_blocks]], num_layers)


def resolve_cuts(
    num_layers: int,
    num_blocks: int,
    split: str = "even",
    cuts: Sequence[int] | None = None,
    arch: str = "",
    to_layer: Callable[[int, int], int] | None = None,
    costs: Callable[[], Sequence[float]] | None = None,
) -> list[int]:
    """Return the K-1 cut indices for a backbone of ``num_layers`` layers.

    ``costs`` (for ``balanced``) returns one cost per layer, e.g. ``layer_activation_bytes``."""
    check_num_blocks(num_layers, num_blocks)
    if cuts is not None and split not in ("cuts", "even"):
        raise ValueError(f"give either explicit cuts or split={split!r}, not both")
    if cuts is not None or split == "cuts":
        if cuts is None:
            raise ValueError("split='cuts' needs model.cuts=[...]")
        cuts = check_cuts(cuts, num_layers)
        if len(cuts) != num_blocks - 1:
            raise ValueError(
                f"{len(cuts)} cuts make {len(cuts) + 1} blocks, but num_blocks (K) = {num_blocks}"
            )
        return cuts
    if split == "even":
        return even_cuts(num_layers, num_blocks)
    if split == "balanced":
        if costs is None:
            raise ValueError("split='balanced' needs per-layer costs (the backbone and a dummy batch)")
        return balanced_cuts(costs(), num_blocks)
    if split in TABLES:
        return table_cuts(split, arch, num_blocks, num_layers, to_layer)
    raise ValueError(f"unknown split {split!r}; choose from {list(MODES)}")


def blocks_from_cuts(cuts: Sequence[int], num_layers: int) -> list[range]:
    """Layer index ranges of each block."""
    bounds = [0, *cuts, num_layers]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def balanced_cuts(costs: Sequence[float], num_blocks: int) -> list[int]:
    """Cuts that minimise the largest block cost (sum of its layers' costs); ties go to later cuts.

    With activation bytes as costs this is InfoPro*'s idea ("balanced memory", fewer layers in the
    early, high-resolution blocks) for any backbone: peak training memory is the largest block's.
    """
    n = len(costs)
    check_num_blocks(n, num_blocks)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest max-cost splitting layers[:i] into k blocks; arg[k][i]: the last cut.
    best = [[inf] * (n + 1) for _ in range(num_blocks + 1)]
    arg = [[0] * (n + 1) for _ in range(num_blocks + 1)]
    best[0][0] = 0.0
    for k in range(1, num_blocks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value <= best[k][i]:
                    best[k][i], arg[k][i] = value, j
    cuts, i = [], n
    for k in range(num_blocks, 1, -1):
        i = arg[k][i]
        cuts.append(i)
    return sorted(cuts)


def layer_activation_bytes(
    backbone, channels: int, size: int, batch: int = 2, example: torch.Tensor | None = None
) -> list[int]:
    """Bytes each layer saves for backward on a dummy ``batch`` of ``size``x``size`` images, or on
    ``example`` (an input batch on the backbone's device) when given (the memory meter's count; linear in
    the batch size, so the split does not depend on it). Runs in training mode; BN running statistics
    are restored afterwards."""
    meter = ActivationMeter(backbone)
    was_training = backbone.training
    buffers = [b.detach().clone() for b in backbone.buffers()]
    backbone.train()
    h = torch.zeros(batch, channels, size, size) if example is None else example
    for layer in backbone.layers:
        with meter.track():
            h = layer(h.detach().requires_grad_())
    with torch.no_grad():
        for b, saved in zip(backbone.buffers(), buffers):
            b.copy_(saved)
    backbone.train(was_training)
    return meter.block_bytes
