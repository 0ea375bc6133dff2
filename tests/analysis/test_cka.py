"""Linear CKA: the invariances that define it, and agreement with Kornblith et al.'s Gram-matrix
formulation computed in float64 on one whole matrix."""

import numpy as np
import pytest
import torch

from locallearn.analysis.cka import LinearCKA, linear_cka


def reference_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Kornblith et al. 2019's ``cka(gram_linear(x), gram_linear(y), debiased)``: n x n Grams, float64."""

    def center(gram):
        gram = gram.astype(np.float64).copy()
        n = len(gram)
        if debiased:
            np.fill_diagonal(gram, 0)
            means = gram.sum(0) / (n - 2)
            means -= means.sum() / (2 * (n - 1))
            gram -= means[:, None] + means[None, :]
            np.fill_diagonal(gram, 0)
        else:
            means = gram.mean(0)
            means -= means.mean() / 2
            gram -= means[:, None] + means[None, :]
        return gram

    gx, gy = center(x @ x.T), center(y @ y.T)
    return float(gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def features(n=300, p=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, p, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, p, dtype=torch.float64)
        + 4
    )


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_with_itself_is_one(debiased):
    x = features()
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_transforms_and_scale(debiased):
    x = features()
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert linear_cka(x, 3.5 * x @ q + 7, debiased) == pytest.approx(1.0, abs=1e-10)
    # but not to an arbitrary linear map (the check can fail)
    assert linear_cka(x, x @ torch.diag(torch.logspace(1, -1, 12, dtype=torch.float64)), debiased) < 0.95


def test_cka_with_independent_noise_is_near_zero():
    x, noise = features(n=4000, seed=1), features(n=4000, seed=2)
    assert linear_cka(x, noise) < 0.01
    assert abs(linear_cka(x, noise, debiased=True)) < 0.005


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_cka_matches_the_gram_reference(debiased):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(97, 7, generator=g) * 2 + 5
    y = torch.relu(x @ torch.randn(7, 9, generator=g) + torch.randn(97, 9, generator=g))
    acc = LinearCKA()
    for i in range(0, 97, 16):  # uneven last batch
        acc.update(x[i : i + 16], y[i : i + 16])
    expected = reference_cka(x.double().numpy(), y.double().numpy(), debiased)
    assert acc.n == 97
    assert acc.value(debiased) == pytest.approx(expected, abs=1e-6)
    assert 0.1 < expected < 0.99  # a value strictly inside (0, 1): the check is not trivial


def test_cka_accepts_maps_and_needs_enough_images():
    x = torch.randn(5, 2, 3, 3)
    assert linear_cka(x, x) == pytest.approx(1.0)
    acc = LinearCKA()
    acc.update(x[:3], x[:3])
    with pytest.raises(ValueError, match="at least 4"):
        acc.value(debiased=True)
