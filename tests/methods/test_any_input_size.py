"""Every method trains at any input size (issue 20, item 7): a non-square batch of a size other than
the one the model was built for. InfoPro's decoders reconstruct the batch's own image (classification
and dense), where they once decoded to the build-time square and the loss raised a ValueError."""

import pytest
import torch
from methods_util import tiny_model

from locallearn.build import build_model, method_names
from locallearn.config import load_config
from locallearn.engine.sequential import train_step
from locallearn.types import Batch, InputInfo

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch_of(h: int, w: int, y: torch.Tensor, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, h, w, generator=g)
    return Batch(x, y, torch.tensor(MEAN).view(-1, 1, 1), torch.tensor(STD).view(-1, 1, 1))


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_on_a_non_square_batch_of_another_size(method):
    k = 1 if method == "bp" else 3
    model, optimizers, _ = tiny_model(method, k=k)  # built for 8x8
    batch = batch_of(12, 10, torch.arange(8) % 10)
    losses = torch.stack([o["loss"].detach() for o in train_step(model, batch, optimizers)])
    assert torch.isfinite(losses).all()


def recon_shapes(model, batch) -> list[tuple[int, int]]:
    """The size of every InfoPro decoder's output on ``batch`` (forward hooks)."""
    shapes: list[tuple[int, int]] = []
    decoders = [aux.decoder for aux in model.auxes[:-1] if getattr(aux, "decoder", None) is not None]
    hooks = [d.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[-2:]))) for d in decoders]
    try:
        h = batch.x
        with torch.no_grad():
            for k in range(model.num_blocks - 1):
                h = model.body(k)(h, batch.bank)
                model.auxes[k](h, batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(shapes) == len(decoders) > 0
    return shapes


@pytest.mark.parametrize("backbone", ["resnet20", "resnet18"])  # the CIFAR and the ImageNet decoder
def test_infopro_decoder_reconstructs_the_batch_image(backbone):
    model, optimizers, _ = tiny_model("infopro", k=3, backbone=backbone, **{"method.infopro.heads": "auto"})
    wide = backbone == "resnet18"
    assert any(
        type(aux.decoder).__name__ == ("ImageNetDecoder" if wide else "Decoder") for aux in model.auxes[:-1]
    )
    for h, w in [(12, 10), (16, 16)] if not wide else [(96, 80), (40, 48)]:
        batch = batch_of(h, w, torch.arange(8) % 10)
        assert set(recon_shapes(model, batch)) == {(h, w)}
        losses = torch.stack([o["loss"].detach() for o in train_step(model, batch, optimizers)])
        assert torch.isfinite(losses).all()


def test_infopro_dense_reconstructs_the_batch_image():
    args = ["method.name=infopro", "method.infopro.loss=cross_entropy", "model.backbone=resnet18",
            "model.num_blocks=2", "model.cuts=[5]", "task.name=segmentation"]  # fmt: skip
    torch.manual_seed(0)
    model, _, _ = build_model(load_config(None, args), InputInfo(3, 64, MEAN, STD), 3)
    labels = torch.randint(0, 3, (2, 96, 80))
    batch = batch_of(96, 80, labels, n=2)
    model.train()
    assert recon_shapes(model, batch) == [(96, 80)]
    h = model.body(0)(batch.x, batch.bank)
    out = model.auxes[0](h, batch)
    assert torch.isfinite(out["loss"]) and out["recon"] > 0
