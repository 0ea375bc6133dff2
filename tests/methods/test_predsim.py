import torch
import torch.nn.functional as F
from methods_util import tiny_batch, tiny_model

from locallearn.engine.sequential import train_step
from locallearn.methods.predsim import pooled_size, similarity_matrix


def test_label_similarity_matrix_by_hand():
    y = torch.tensor([0, 1, 0])
    r = similarity_matrix(F.one_hot(y, 3).float())
    # centred one-hot rows: same class -> 1, different -> (0 - 1/3 - 1/3 + 1/3) / (2/3) = -1/2
    expected = torch.tensor([[1.0, -0.5, 1.0], [-0.5, 1.0, -0.5], [1.0, -0.5, 1.0]])
    assert torch.allclose(r, expected, atol=1e-6)


def test_feature_similarity_uses_per_channel_spatial_std():
    x = torch.randn(3, 5, 4, 4)
    std = x.flatten(2).std(dim=2)  # (B, C): per-channel std over space
    c = std - std.mean(dim=1, keepdim=True)
    n = c / c.norm(dim=1, keepdim=True)
    assert torch.allclose(similarity_matrix(x), n @ n.T, atol=1e-6)
    # 3 channels or fewer (or one row): no std reduction, the flattened map is used
    y = torch.randn(3, 3, 4, 4)
    f = y.flatten(1) - y.flatten(1).mean(dim=1, keepdim=True)
    f = f / f.norm(dim=1, keepdim=True)
    assert torch.allclose(similarity_matrix(y), f @ f.T, atol=1e-6)


def test_pool_size_follows_the_official_loop():
    assert pooled_size(16, 32, 2048) == (8, 16)  # 16*32*32 -> halve h, w alternately until <= 2048
    assert pooled_size(64, 8, 2048) == (4, 8)
    assert pooled_size(64, 8, 512) == (2, 4)
    assert pooled_size(64, 2, 4096) == (2, 2)


def test_pred_weights_start_at_zero_and_losses_combine():
    model, optimizers, _ = tiny_model("predsim")
    for aux in list(model.auxes)[:-1]:
        assert torch.count_nonzero(aux.pred.weight) == 0
    batch = tiny_batch()
    bias = model.auxes[0].pred.bias.detach().clone()  # zero weights: logits = bias for every image
    expected_pred = F.cross_entropy(bias.expand(len(batch), -1), batch.y)
    o = train_step(model, batch, optimizers)[0]
    assert torch.allclose(o["pred"], expected_pred, atol=1e-6)
    assert torch.allclose(o["loss"], 0.01 * o["pred"] + 0.99 * o["sim"])
    assert torch.count_nonzero(model.auxes[0].pred.weight) > 0  # the step moved them


def test_auglocal_baseline_config_keeps_the_default_pred_init():
    from pathlib import Path

    from locallearn.build import build_model
    from locallearn.config import load_config
    from locallearn.types import InputInfo

    config = Path(__file__).resolve().parents[2] / "configs" / "predsim_resnet32_k16_cifar10.yaml"
    cfg = load_config(config, ["data.name=digits", "model.backbone=resnet20", "model.num_blocks=4",
                               "model.split=even"])  # fmt: skip
    model, _, _ = build_model(cfg, InputInfo(3, 8, (0.5,) * 3, (0.25,) * 3), 10)
    assert all(a.pred.weight.abs().sum() > 0 for a in list(model.auxes)[:-1])  # AugLocal: nn.Linear's init
