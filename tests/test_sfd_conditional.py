"""Class-conditional MLP denoisers and their DSM training with label dropout (classifier-free guidance)."""

from __future__ import annotations

import pytest
import torch

import kdistpp
from kdistpp.sfd import MLPDenoiser, train_dsm


def test_the_null_label_is_none_or_minus_one_and_labels_matter():
    torch.manual_seed(0)
    net = MLPDenoiser(3, hidden=16, n_classes=4)
    x, sigma = torch.randn(5, 3), torch.full((5,), 0.7)
    assert torch.equal(net(x, sigma), net(x, sigma, label=torch.full((5,), -1)))
    assert not torch.allclose(net(x, sigma, label=torch.zeros(5, dtype=torch.long)),
                              net(x, sigma, label=torch.ones(5, dtype=torch.long)))
    mixed = net(x, sigma, label=torch.tensor([0, -1, 2, 3, 1]))
    assert torch.allclose(mixed[1], net(x[1:2], sigma[1:2])[0], atol=1e-6)  # per sample: row 1 takes the null row
    with pytest.raises(ValueError, match="label must lie"):
        net(x, sigma, label=torch.full((5,), 4))
    with pytest.raises(TypeError, match="n_classes"):
        MLPDenoiser(3, hidden=16)(x, sigma, label=torch.zeros(5, dtype=torch.long))


def test_label_dropout_trains_both_branches_of_cfg():
    # two classes at (-1, -1) and (1, 1): at x = 0 the conditional estimates point to their class,
    # the unconditional one sits between them
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (4000,), generator=g)
    data = (labels.float() * 2 - 1)[:, None].expand(-1, 2) + 0.05 * torch.randn(4000, 2, generator=g)
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=64, depth=2, sigma_data=1.0, n_classes=2)
    train_dsm(net, data, 600, batch_size=256, lr=3e-3, labels=labels, label_dropout=0.3)
    x, sigma = torch.zeros(3, 2), torch.full((3,), 0.8)
    with torch.no_grad():
        out = net(x, sigma, label=torch.tensor([0, 1, -1]))
    assert torch.allclose(out[0], torch.tensor([-1.0, -1.0]), atol=0.25)
    assert torch.allclose(out[1], torch.tensor([1.0, 1.0]), atol=0.25)
    assert out[2].abs().max() < 0.3
    # and guidance through kdistpp's CFG pushes past the conditional estimate, away from the unconditional
    cfg = kdistpp.CFGDenoiser(net, cond=torch.tensor([1, 1, 1]), uncond=torch.full((3,), -1), cond_scale=2.0,
                              cond_key="label")
    with torch.no_grad():
        guided = cfg(x, sigma)
    assert torch.allclose(guided[0], 2 * out[1] - out[2], atol=1e-5)


def test_dsm_label_arguments_are_checked():
    net = MLPDenoiser(2, hidden=8, n_classes=2)
    with pytest.raises(ValueError, match="one class per data row"):
        train_dsm(net, torch.zeros(10, 2), 1, labels=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="label_dropout"):
        train_dsm(net, torch.zeros(10, 2), 1, labels=torch.zeros(10, dtype=torch.long), label_dropout=1.0)
