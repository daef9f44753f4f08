"""Tiny nets for the attribution tests: hand-weighted ones with exact answers, and a small
torchvision-like CNN (conv-BN-ReLU(inplace)-maxpool features, avgpool, linear classifier)."""

import torch
import torch.nn.functional as F
from torch import nn


class HandNet(nn.Module):
    """conv1x1 (3 -> 2, fixed) -> ReLU -> global average pool -> linear (2 -> 2, fixed).

    conv rows: A = c0 - c2, B = 2 c1; linear rows: logit0 = A - B, logit1 = 0.5 A + B.
    """

    def __init__(self, relu: str = "module"):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU(inplace=relu == "inplace")
        self.fc = nn.Linear(2, 2, bias=False)
        self.functional = relu == "functional"
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 1.0]]))

    def forward(self, x):
        z = self.conv(x)
        a = F.relu(z) if self.functional else self.relu(z)
        return self.fc(a.mean(dim=(2, 3)))


# One 2x2 image: A_pre = [[-1,-1],[1,-2]], B_pre = [[-2,2],[2,-1]] -> GAP A = 0.25, B = 1,
# logits = (-0.75, 1.125): predicted class 1.
HAND_IMAGE = torch.tensor(
    [[[[1.0, 0.0], [2.0, 1.0]], [[-1.0, 1.0], [1.0, -0.5]], [[2.0, 1.0], [1.0, 3.0]]]]
)  # (1, 3, 2, 2)


class SmallCNN(nn.Module):
    """torchvision-like: ``features`` / ``avgpool`` / ``classifier``; ReLUs as modules or functional."""

    def __init__(self, num_classes: int = 5, functional: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.functional = functional
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
        )
        if functional:  # same weights, ReLUs called as functions instead
            self.features = nn.Sequential(*[m for m in self.features if not isinstance(m, nn.ReLU)])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)
        with torch.no_grad():  # non-trivial BN statistics
            self.features[1].running_mean.uniform_(-0.2, 0.2)
            self.features[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        if self.functional:
            c1, bn, pool, c2 = self.features
            x = F.relu(c2(pool(F.relu(bn(c1(x))))))
        else:
            x = self.features(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


class TupleOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return ("not a tensor", self.net(x), torch.zeros(1))


class DictOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"features": torch.zeros(1), "logits": self.net(x)}
