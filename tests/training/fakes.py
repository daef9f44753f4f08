"""Tiny networks and datasets that keep the contracts of docs/DESIGN.md, for fast engine tests.

The network is a real ``InterpretableNet`` (``assemble``) on a two-conv stem; the
dataset returns the DESIGN sample dicts with a learnable signal (a bright square on targets).
"""

from __future__ import annotations

import torch
from torch import nn

from icnn.models.net import linear_head, assemble


def tiny_net(*, num_classes: int = 1, interpretable: bool = True, image_size: int = 16, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())  # (B, 4, 8, 8)
    top = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())  # (B, 4, 8, 8)
    return assemble(
        stem, top, linear_head(dropout=dropout), num_classes=num_classes, interpretable=interpretable, image_size=image_size, arch="tiny"
    )


class TinyParts(torch.utils.data.Dataset):
    """``n`` images ``(3, size, size)``; label ``i % num_classes``; class ``c > 0`` has a bright
    square whose corner depends on ``c`` and a random offset."""

    def __init__(self, n: int = 18, *, num_classes: int = 2, size: int = 16, seed: int = 0, augment: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.3
        self.labels = torch.arange(n) % num_classes
        for i in range(n):
            c = int(self.labels[i])
            if c:
                o = int(torch.randint(0, size // 2, (1,), generator=g))
                self.images[i, c % 3, o : o + size // 2, o : o + size // 2] += 0.7
        self.classes = ["negative", "target"] if num_classes == 2 else [f"class{c}" for c in range(num_classes)]
        self.landmark_names, self.part_names = [], []
        self.image_size = (size, size)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        if self.augment and torch.rand(()) < 0.5:  # global RNG, as real datasets do in the main process
            image = image.flip(-1)
        return {
            "image": image,
            "label": self.labels[i],
            "box": torch.full((4,), float("nan")),
            "landmarks": torch.zeros(0, 2),
            "index": torch.tensor(i),
        }
