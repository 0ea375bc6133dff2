"""InfoPro: lambda schedule by block index, decoder target, SupCon against a reference computation."""

import pytest
import torch
import torch.nn.functional as F

from locallearn.methods.infopro import InfoProConfig, lambdas, supcon_loss
from tests.helpers import make_batch, make_model


def test_lambda_is_interpolated_by_block_index():
    cfg = InfoProConfig(ixx_1=5, ixy_1=0.05, ixx_2=0.2, ixy_2=0.5)
    k_total = 16
    got = [lambdas(cfg, k, k_total) for k in range(k_total - 1)]
    assert got[0] == (5, 0.05)
    assert got[-1] == pytest.approx((0.2, 0.5))
    assert got[7] == pytest.approx((5 + (0.2 - 5) * 0.5, 0.05 + (0.5 - 0.05) * 0.5))
    # every cut gets its own value (the MAN/MAN++ stage-index bug gives only 3 distinct values)
    assert len({round(a, 9) for a, _ in got}) == k_total - 1
    assert lambdas(cfg, 0, 2) == (5, 0.05)


def test_model_aux_uses_the_schedule_and_skips_zero_terms():
    model, *_ = make_model("infopro", "resnet20", 4, **{"method.infopro.ixy_1": 0})
    first, last = model.auxes[0], model.auxes[2]
    assert first.classifier is None and first.decoder is not None  # ixy_1 = 0: reconstruction only
    assert (last.lambda1, last.lambda2) == pytest.approx((0.2, 0.5))


def test_decoder_target_is_the_unnormalised_image():
    model, *_ = make_model("infopro", "resnet20", 4)
    aux = model.auxes[0]
    batch = make_batch(4)
    raw = (batch.x * batch.std + batch.mean).clamp(0, 1)
    h = torch.randn(4, 16, 8, 8)
    out = aux(h, batch)
    expected = F.binary_cross_entropy(torch.sigmoid(aux.decoder(h)), raw)
    torch.testing.assert_close(out["recon"], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(batch.image, batch.x * batch.std + batch.mean)


def reference_supcon(features, labels, temperature=0.07):
    """Khosla et al.'s SupConLoss (contrast_mode 'all', one view) with InfoPro's mask_sum fix, in loops."""
    n = features.shape[0]
    sim = features @ features.T / temperature
    losses = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        log_denominator = torch.logsumexp(sim[i, others], dim=0)
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            losses.append(torch.tensor(0.0))
            continue
        losses.append(-sum(sim[i, p] - log_denominator for p in positives) / len(positives))
    return torch.stack(losses).mean()


def test_supcon_matches_reference():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(9, 16, generator=g), dim=1)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1])  # class 3 has no positive: contributes 0
    torch.testing.assert_close(supcon_loss(z, y, 0.07), reference_supcon(z, y), rtol=1e-5, atol=1e-5)


def test_aux_classifier_shapes_follow_prior_art():
    model, *_ = make_model("infopro", "resnet32", 3, **{"method.infopro.loss": "cross_entropy"})
    n_params = sum(p.numel() for p in model.auxes[0].classifier.parameters())
    assert n_params == 10_186  # PRIOR_ART §12: 1c2f CE on C=16
    decoder = sum(p.numel() for p in model.auxes[0].decoder.parameters())
    assert decoder == 2_091


def test_contrast_head_param_count():
    model, *_ = make_model("infopro", "resnet32", 3)
    assert sum(p.numel() for p in model.auxes[0].classifier.parameters()) == 25_408
