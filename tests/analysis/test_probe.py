"""The closed-form linear probe: ~100% on linearly separable features, chance on noise."""

import torch

from locallearn.analysis.probe import RidgeProbe


def clusters(n, num_classes=5, p=16, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, p, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(n) % num_classes
    return centres[labels] + spread * torch.randn(n, p, generator=g) + 10, labels


def accuracy(probe, x, y):
    return (probe.predict(x) == y).float().mean().item()


def test_probe_separates_linearly_separable_features():
    x, y = clusters(500)
    probe = RidgeProbe(5)
    for i in range(0, 500, 64):  # streamed in batches
        probe.update(x[i : i + 64], y[i : i + 64])
    probe.fit()
    xt, yt = clusters(300, seed=1)
    assert accuracy(probe, xt, yt) > 0.99


def test_probe_on_noise_is_at_chance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 16, generator=g), torch.randint(0, 5, (400,), generator=g)
    probe = RidgeProbe(5)
    probe.update(x, y)
    probe.fit()
    xt, yt = torch.randn(2000, 16, generator=g), torch.randint(0, 5, (2000,), generator=g)
    assert 0.12 < accuracy(probe, xt, yt) < 0.30


def test_probe_does_not_depend_on_feature_scale():
    x, y = clusters(200)
    a, b = RidgeProbe(5), RidgeProbe(5)
    a.update(x, y)
    b.update(1e4 * x, y)
    xt, _ = clusters(100, seed=2)
    assert torch.equal(a.fit().predict(xt), b.fit().predict(1e4 * xt))
