"""engine.mode=ddp: per-block all-reduce equals single-process training on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from dist_helpers import launch, run_function, tiny_config
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.engine import ddp
from locallearn.engine.sequential import train_epoch
from locallearn.model import LocalModel
from locallearn.types import Batch, FeatureInfo


class Aux(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Linear(channels, 10)

    def forward(self, h, batch):
        return {"loss": F.cross_entropy(self.head(h.mean((2, 3))), batch.y)}


def bn_free_model() -> LocalModel:
    """Two blocks of conv + ReLU, no batch statistics: DDP must equal the concatenated batch."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()) for _ in range(1)]
    layers += [nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Tanh()) for _ in range(2)]
    info = [FeatureInfo(6, 1)] * 3
    return LocalModel(Backbone(layers, info, 1), [1], [Aux(6), Aux(6)])


class Batches:
    """Four global batches of 10 random 8x8 images (uneven shards for 3 ranks: 3/3/4)."""

    data = range(40)
    batch_size = 10

    def __iter__(self):
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            yield Batch(torch.randn(10, 1, 8, 8, generator=gen), torch.randint(0, 10, (10,), generator=gen))

    def __len__(self):
        return 4

    def set_epoch(self, epoch):
        pass


class NoSchedule:
    lr = 0.1

    def step(self):
        pass


def optimizers(model):
    return [torch.optim.SGD(model.block_parameters(k), lr=0.1, momentum=0.9) for k in range(model.num_blocks)]


def _ddp_train(ctx, out: str) -> None:
    model = bn_free_model()
    share = ddp.Share()
    opts = [ddp.GradAllReduce(o, ctx, share) for o in optimizers(model)]
    train_epoch(model, ddp.Shards(Batches(), ctx, share, model), opts, NoSchedule(), ctx.device)
    torch.save(model.state_dict(), Path(out, f"ddp.rank{ctx.rank}.pt"))


def test_ddp_equals_single_process_on_the_concatenated_batch(tmp_path):
    run_function(3, _ddp_train, str(tmp_path))
    model = bn_free_model()
    train_epoch(model, Batches(), optimizers(model), NoSchedule(), torch.device("cpu"))
    reference = model.state_dict()
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt") for r in range(3)]
    for key, value in reference.items():
        assert not torch.equal(value, bn_free_model().state_dict()[key])  # it trained
        for state in ranks:
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
            assert torch.equal(state[key], ranks[0][key])  # ranks stay identical


def test_ddp_run_keeps_ranks_identical_and_resumes(tmp_path):
    """resnet20 + InfoPro through the CLI's run: BN statistics averaged, so both ranks hold the same
    weights and buffers; rank 0's checkpoint.pt resumes both ranks."""
    cfg = tiny_config(tmp_path / "ddp", mode="ddp")
    launch(2, tmp_path, cfg, stop_after=1)
    launch(2, tmp_path, resume=tmp_path / "ddp" / "run")
    a, b = (torch.load(tmp_path / f"state.rank{r}.pt") for r in range(2))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "ddp" / "run" / "summary.json").exists()
