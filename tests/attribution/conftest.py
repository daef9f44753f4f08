"""Fixtures shared by the attribution tests."""

import pytest
import torch

from .nets import SmallCNN


@pytest.fixture
def cnn():
    return SmallCNN().eval()


@pytest.fixture
def images():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
