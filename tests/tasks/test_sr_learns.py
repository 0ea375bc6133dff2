"""Learning proof (issue 19): every method the super-resolution configs ship beats bicubic on a photo
it never saw.

Scaling against the shipped configs (``configs/super_resolution/``): same optimizer kind (AdamW,
betas 0.9 / 0.999, no weight decay), PyTorch's default init (EDSR's), same method options (``slm``:
bank on, own head, so the aux fuses the LR image from the bank); EDSR-tiny (4 units x 16) instead of
EDSR, K = 2 instead of 4, 24 px LR patches instead of 48, lr 2e-3 instead of 1e-4 with a cosine decay
to 0 over 800 steps instead of 300k steps. Train on scikit-image's astronaut / coffee / chelsea,
score PSNR (Y, 2 px border, EDSR's benchmark protocol) on rocket against PIL bicubic.

Issue 27: two seeds per method (the init and the patch draws), and for every local method a control, the
same run with ``model.frozen_blocks=1`` (block 0 and its aux at init), whose gain over bicubic must stay
``MARGIN`` dB below the trained run's: on this data the last block alone on random early features still
beats bicubic, so the bar alone cannot tell them apart. Block 0's own PSNR (its aux's image, where it
predicts one) must rise ``EARLY_GAIN`` dB above its value at init. Rocket is the held-out image: the only
photo set that ships offline is scikit-image's handful (docs/super_resolution.md). Each case prints a
``PROOF`` line (tests/proof_report.py) that ``benchmarks/proof_tables.py`` turns into the docs' table.

Why the smoke recipe used to lose to bicubic (30.0 dB vs 32.3 dB after 25 epochs): 3 photos x 16
patches / batch 16 = 3 optimizer steps per epoch, so 25 epochs are 75 steps. EDSR has no image-level
skip (its global skip is in feature space), so it learns interpolation itself; at Adam lr 5e-4 the
tiny model crosses bicubic only after about 600 steps, at 2e-3 after about 225 (measured, see
docs/super_resolution.md). Nothing was wrong with the model, the mean shift or the scoring.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import evaluate, train_step
from locallearn.tasks.super_resolution import psnr, quantize
from locallearn.types import InputInfo
from tests.proof_report import report

STEPS, LR, PATCH = 800, 2e-3, 24
BAR = 0.3  # dB over bicubic on the held-out photo
MARGIN = 0.15  # dB of gain the frozen-blocks control must stay below the trained run
EARLY_GAIN = 1.0  # dB of block 0's own PSNR above its value at init


def bicubic_psnr(test) -> float:
    """PSNR of PIL bicubic up-scaling of the test set's own LR images (the floor to beat)."""
    out = []
    for i in range(test.images):
        lr, hr = test.pair(i)
        img = Image.fromarray(lr.permute(1, 2, 0).numpy())
        up = np.asarray(img.resize((hr.shape[2], hr.shape[1]), Image.BICUBIC))
        up_t = torch.from_numpy(up.copy()).permute(2, 0, 1)[None].float() / 255
        out.append(psnr(quantize(up_t), hr[None].float() / 255, test.scale).item())
    return float(np.mean(out))


def train_and_score(
    method: str, k: int, tmp_path, seed: int = 0, frozen: int = 0, scale: int = 2, **options
) -> dict:
    """Train ``STEPS`` steps; held-out PSNR (``psnr``), bicubic's (``bicubic``), per-block PSNR at init and
    after training (``blocks_init``, ``blocks``; None where an aux predicts no image) and the losses."""
    from locallearn.data.super_resolution import SRLoader, skimage_photos

    args = [
        f"method.name={method}", "model.backbone=edsr_tiny", f"model.num_blocks={k}", "model.split=even",
        "task.name=super_resolution", f"task.super_resolution.scale={scale}", "data.name=skimage_photos",
        "optim.name=adamw", f"optim.lr={LR}", "optim.betas=[0.9,0.999]", "optim.weight_decay=0",
        "optim.schedule=constant", "optim.warmup_epochs=0", f"model.frozen_blocks={frozen}",
    ]  # fmt: skip
    args += [f"{key}={value}" for key, value in options.items()]
    cfg = load_config(None, args)
    train, test = skimage_photos(str(tmp_path), False, scale)
    train.patch = PATCH
    torch.manual_seed(seed)
    model, _, task = build_model(cfg, InputInfo(3, PATCH, (0.0,) * 3, (1.0,) * 3), 3)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    cpu = torch.device("cpu")
    at_init = evaluate(model, SRLoader(test, 1, False), task, cpu)
    loader, step, epoch, losses = SRLoader(train, 16, True, seed=seed), 0, 0, []
    model.train()
    while step < STEPS:
        loader.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            for opt in optimizers:  # cosine to 0 over the run (the configs' schedule is constant)
                for group in opt.param_groups:
                    group["lr"] = 0.5 * LR * (1 + math.cos(math.pi * step / STEPS))
            outs = train_step(model, batch, optimizers)
            losses.append(max(o["loss"].item() for o in outs))
            step += 1
            if step == STEPS:
                break
    got = evaluate(model, SRLoader(test, 1, False), task, cpu)
    keys = [f"block{b}_psnr" for b in range(k)]
    return {
        "psnr": got["psnr"], "bicubic": bicubic_psnr(test), "losses": losses,
        "blocks": [got.get(key) for key in keys], "blocks_init": [at_init.get(key) for key in keys],
    }  # fmt: skip


CASES = {
    "bp": (1, {}),
    "dgl": (2, {}),
    "slm": (2, {"method.slm.bank": "true", "method.slm.share_head": "false"}),
    "slm+manpp": (2, {"method.slm.bank": "true", "method.slm.share_head": "false"}),
}


def shown(values: list[float | None]) -> str:
    return " ".join("-" if v is None else f"{v:.2f}" for v in values)


def prove(method: str, seed: int, tmp_path) -> list[str]:
    """Train ``method`` (and, when local, its frozen control); print the PROOF line; the failures."""
    k, options = CASES[method]
    normal = train_and_score(method, k, tmp_path, seed, **options)
    frozen = train_and_score(method, k, tmp_path, seed, frozen=1, **options) if k > 1 else None
    gain = normal["psnr"] - normal["bicubic"]
    frozen_gain = frozen["psnr"] - frozen["bicubic"] if frozen else None
    report("super_resolution", method, seed, "PSNR gain over bicubic, dB", gain, BAR,
           frozen=frozen_gain, margin=MARGIN if frozen else None, steps=STEPS,
           psnr=normal["psnr"], bicubic=normal["bicubic"], blocks=shown(normal["blocks"]),
           blocks_at_init=shown(normal["blocks_init"]))  # fmt: skip
    bad = [] if all(math.isfinite(x) for x in normal["losses"]) else ["a loss is not finite"]
    if not gain >= BAR:
        bad.append(f"gain {gain:+.2f} dB is below the bar {BAR}")
    if frozen is not None:
        if not gain >= frozen_gain + MARGIN:
            bad.append(f"gain {gain:+.2f} dB is not {MARGIN} above the frozen control's {frozen_gain:+.2f}")
        first, init = normal["blocks"][0], normal["blocks_init"][0]
        if first is not None and not first >= init + EARLY_GAIN:
            bad.append(f"block 0 PSNR {first:.2f} is not {EARLY_GAIN} dB above its init {init:.2f}")
    return bad


# Cases measured to fail the proof, each with its reason; strict: the day one passes, its test says so.
FROZEN_CLOSE = (
    "the frozen control comes within MARGIN (docs/super_resolution.md): the last block alone on a random "
    "block 0 nearly matches the trained run, though block 0's own PSNR shows it learned"
)
KNOWN_FAILURES = dict.fromkeys(
    [("dgl", 0), ("dgl", 1), ("slm", 0), ("slm", 1), ("slm+manpp", 1)], FROZEN_CLOSE
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,seed",
    [
        pytest.param(m, s, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[m, s])])
        if (m, s) in KNOWN_FAILURES
        else (m, s)
        for m in sorted(CASES)
        for s in (0, 1)
    ],
)
def test_every_sr_method_beats_bicubic_on_a_held_out_photo(method, seed, tmp_path):
    torch.set_num_threads(1)
    assert prove(method, seed, tmp_path) == []


if __name__ == "__main__":
    # one case (trained run, frozen control, PROOF line): python -m tests.tasks.test_sr_learns METHOD SEED
    # one run: python -m tests.tasks.test_sr_learns METHOD SEED K FROZEN [steps=N] [scale=S] [CONFIG_KEY=VALUE ...],
    # e.g. ... slm 0 2 1 model.split=cuts model.cuts=[5] (the last block = EDSR's closing conv)
    import sys
    import tempfile
    from pathlib import Path

    torch.set_num_threads(1)
    if len(sys.argv) != 3 and len(sys.argv) < 5:
        sys.exit(
            "usage: python -m tests.tasks.test_sr_learns METHOD SEED [K FROZEN [steps=N] [KEY=VALUE ...]]"
        )
    method, seed = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as root:
        if len(sys.argv) == 3:
            print(prove(method, seed, Path(root)) or "the proof holds")
            sys.exit()
        k, frozen = int(sys.argv[3]), int(sys.argv[4])
        extra = dict(item.split("=", 1) for item in sys.argv[5:])
        STEPS = int(extra.pop("steps", STEPS))
        scale = int(extra.pop("scale", 2))
        r = train_and_score(method, k, root, seed, frozen, scale, **{**CASES[method][1], **extra})
    print(
        f"{method} seed {seed} K={k} frozen_blocks={frozen} {' '.join(sys.argv[5:])}: gain over bicubic "
        f"{r['psnr'] - r['bicubic']:+.3f} dB (PSNR {r['psnr']:.2f}, bicubic {r['bicubic']:.2f}); per block "
        f"{shown(r['blocks'])} (at init {shown(r['blocks_init'])})"
    )
