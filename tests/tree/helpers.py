"""Hand-made networks and feature sets for the decision-tree tests."""

import torch
from torch import nn

from icnn.mask import PartMask
from icnn.models import InterpretableLayer, InterpretableNet, Normalize
from icnn.tree import DecisionTree, Features

FC_WEIGHT = (2.0, -1.0, 0.5)  # the hand net's head: y = 2 m0 - m1 + 0.5 m2 + 0.25, m_d = mean_ij X_d
FC_BIAS = 0.25


def hand_net(mask: bool = False) -> InterpretableNet:
    """Identity stem, identity 1x1 convs + ReLU as "top" and "new" (maps = the image's channels,
    the "new" one masked when ``mask``), head GAP + fc(3 -> 1) with ``FC_WEIGHT``, ``FC_BIAS``."""

    def identity_layer(with_mask: bool) -> InterpretableLayer:
        conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3)[:, :, None, None])
            conv.bias.zero_()
        return InterpretableLayer(nn.Sequential(conv, nn.ReLU()), PartMask() if with_mask else None)

    fc = nn.Linear(3, 1)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([FC_WEIGHT]))
        fc.bias.fill_(FC_BIAS)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc)
    layers = nn.ModuleDict({"top": identity_layer(False), "new": identity_layer(mask)})
    return InterpretableNet(Normalize((0, 0, 0), (1, 1, 1)), nn.Identity(), layers, head, num_classes=1, image_size=(2, 2))


def constant_images(*channels) -> torch.Tensor:
    """``(B, 3, 2, 2)`` images, each channel constant: ``channels[b] = (c0, c1, c2)``."""
    return torch.tensor(channels, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 2, 2).clone()


def features(x, g, y, b, positive=None) -> Features:
    """A ``Features`` from rows (``g`` normalised here; ``positive`` default all)."""
    x, g = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(g, dtype=torch.float64)
    g = g / g.norm(dim=1, keepdim=True)
    n = len(x)
    pos = torch.ones(n, dtype=torch.bool) if positive is None else torch.as_tensor(positive, dtype=torch.bool)
    return Features(x, g, torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                    torch.ones(n, dtype=torch.float64), pos, torch.ones(x.shape[1], dtype=torch.float64), torch.arange(n))


def random_features(n: int, d: int, seed: int = 0, modes: int = 3) -> Features:
    """Rationales around a few modes, ReLU-like pooled features, ``y = g . x + b``."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(modes, d, generator=gen, dtype=torch.float64).abs()
    g = centres[torch.randint(modes, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    g = g / g.norm(dim=1, keepdim=True)
    x = torch.relu(torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5) * 4
    b = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return features(x, g, (g * x).sum(1) + b, b)


def toy_tree() -> DecisionTree:
    """Two filters; leaves 0: g = (1, 0), 1: (0.8, 0.6), 2: (0, 1); node 3 merges 0 and 1 with
    g_3 = normalise((1.8, 0.6)) = (3, 1) / sqrt 10; the root 4 has children 3 and 2."""
    r10 = 10**0.5
    direction = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [3 / r10, 1 / r10], [0.0, 0.0]], dtype=torch.float64)
    alpha = torch.ones(5, 2, dtype=torch.float64)
    alpha[4] = 0
    bias = torch.tensor([0.5, 0.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    parent = torch.tensor([3, 3, 4, 4, -1])
    gain = torch.tensor([0.0, 0.0, 0.0, 1.5, 0.0], dtype=torch.float64)
    return DecisionTree(direction, alpha, bias, parent, gain, 0.5, {"beta": 1.0})
