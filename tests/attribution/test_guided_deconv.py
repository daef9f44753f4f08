"""Guided backprop and deconvnet follow their definitions (survey §3.1, Fig. 2).

At a ReLU with forward input z and incoming gradient g: guided passes g [z > 0] [g > 0],
deconvnet passes g [g > 0]. The reference below backpropagates layer by layer with exactly
those rules; Captum is checked against it and our adapter against Captum.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum import attr as captum
from torch import nn

from icnn.attribution import AttributionError, Deconvnet, GuidedBackprop

from .nets import HAND_IMAGE, HandNet, SmallCNN


class ReluChain(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> GAP -> linear, with ReLUs of one kind."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.r1, self.r2 = nn.ReLU(inplace=kind == "inplace"), nn.ReLU(inplace=kind == "inplace")

    def relu(self, z, module):
        return {"functional": F.relu, "tensor_method": torch.Tensor.relu, "inplace_functional": F.relu_,
                "reused": self.r1}.get(self.kind, module)(z)

    def forward(self, x):
        return self.fc(self.relu(self.c2(self.relu(self.c1(x), self.r1)), self.r2).mean(dim=(2, 3)))


def reference(net: ReluChain, x: torch.Tensor, target: torch.Tensor, guided: bool) -> torch.Tensor:
    """Backpropagation by hand through the chain, with the rectified ReLU rule."""

    def vjp(f, inp, g):
        inp = inp.detach().requires_grad_(True)
        return torch.autograd.grad(f(inp), inp, g)[0]

    def relu_rule(g, z):
        return g * (g > 0) * (z > 0) if guided else g * (g > 0)

    z1 = net.c1(x).detach()
    z2 = net.c2(z1.relu()).detach()
    g = vjp(lambda a: net.fc(a.mean(dim=(2, 3))), z2.relu(), F.one_hot(target, 4).float())
    g = vjp(net.c2, z1.relu(), relu_rule(g, z2))
    return vjp(net.c1, x, relu_rule(g, z1))


KINDS = ["module", "inplace", "reused", "functional", "tensor_method", "inplace_functional"]
TARGET = torch.tensor([0, 1, 3])
CAPTUM_PAIRS = [(GuidedBackprop, captum.GuidedBackprop), (Deconvnet, captum.Deconvolution)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, guided", [(GuidedBackprop, True), (Deconvnet, False)])
def test_follows_the_definition_for_every_kind_of_relu(kind, method, guided, images):
    net = ReluChain(kind).eval()
    ours = method(net)(images, target=TARGET)
    ref = reference(net, images, TARGET, guided)
    torch.testing.assert_close(ours, ref)
    assert ours.shape == images.shape
    plain = captum.Saliency(net).attribute(images.clone().requires_grad_(), target=TARGET, abs=False)
    assert not torch.allclose(ours, plain)  # the rule changes the gradient


@pytest.mark.parametrize("kind", ["module", "inplace", "reused"])
@pytest.mark.parametrize("method, captum_cls", CAPTUM_PAIRS)
def test_equals_captum_where_captum_is_the_engine(kind, method, captum_cls, images):
    net = ReluChain(kind).eval()
    m = method(net)
    ours = m(images, target=TARGET)
    assert m.engine == "captum"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_cls(net).attribute(images.clone().requires_grad_(), target=TARGET)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("method, captum_cls", CAPTUM_PAIRS)
def test_captum_ignores_functional_relu_so_we_override(method, captum_cls, images):
    """The evidence for the fallback: Captum returns the plain gradient through F.relu."""
    net = ReluChain("functional").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum_out = captum_cls(net).attribute(images.clone().requires_grad_(), target=TARGET)
    plain = captum.Saliency(net).attribute(images.clone().requires_grad_(), target=TARGET, abs=False)
    torch.testing.assert_close(captum_out, plain)
    m = method(net)
    torch.testing.assert_close(m(images, target=TARGET), reference(net, images, TARGET, method is GuidedBackprop))
    assert m.engine == "override"


@pytest.mark.parametrize("method", [GuidedBackprop, Deconvnet])
def test_both_engines_agree_on_a_torchvision_like_cnn(method, images):
    net = SmallCNN().eval()  # BN, in-place ReLUs, max-pool switches
    torch.testing.assert_close(method(net, engine="override")(images), method(net, engine="captum")(images))
    functional = SmallCNN(functional=True).eval()  # same weights, F.relu
    torch.testing.assert_close(method(functional)(images), method(net)(images))


def test_hand_values():
    # class 0 = A - B: g_A = 1/4 > 0 everywhere, g_B = -1/4 < 0 -> B is cut by both methods.
    # guided keeps A only where A_pre > 0 (pixel (1,0)): dI = 1/4 (1, 0, -1) there;
    # deconvnet ignores the forward mask: dI = 1/4 (1, 0, -1) at every pixel.
    g = GuidedBackprop(HandNet())(HAND_IMAGE, target=0)[0]  # (3, 2, 2)
    d = Deconvnet(HandNet())(HAND_IMAGE, target=0)[0]
    row = torch.tensor([0.25, 0.0, -0.25])[:, None, None]
    torch.testing.assert_close(g, row * torch.tensor([[0.0, 0.0], [1.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(d, row.expand(3, 2, 2), rtol=0, atol=0)


def test_unknown_engine():
    with pytest.raises(AttributionError, match="engine: expected one of"):
        GuidedBackprop(HandNet(), engine="fast")


class PreReluSkip(nn.Module):
    """z = conv1(x) feeds both a ReLU branch and a skip: logits = fc(mean(conv2(relu(z)) + z))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.r, self.fc = nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        z = self.c1(x)
        return self.fc((self.c2(self.r(z)) + z).mean(dim=(2, 3)))


@pytest.mark.parametrize("method, guided", [(GuidedBackprop, True), (Deconvnet, False)])
def test_override_engine_rectifies_only_the_relu_branch(method, guided, images):
    """Captum rectifies the whole gradient of the ReLU's input tensor, skip branch included;
    the override applies the rule to the ReLU's own gradient only, as the definition says."""
    net, t = PreReluSkip().eval(), torch.tensor([1, 1, 2])
    z = net.c1(images).detach().requires_grad_(True)
    a = z.relu().detach().requires_grad_(True)
    head = lambda a_, z_: net.fc((net.c2(a_) + z_).mean(dim=(2, 3))).gather(1, t[:, None]).sum()  # noqa: E731
    g_relu, g_skip = torch.autograd.grad(head(a, z), (a, z))
    g_z = (g_relu * (g_relu > 0) * (z > 0) if guided else g_relu * (g_relu > 0)) + g_skip
    x = images.clone().requires_grad_(True)
    ref = torch.autograd.grad(net.c1(x), x, g_z)[0]
    torch.testing.assert_close(method(net, engine="override")(images, target=t), ref)
    assert not torch.allclose(method(net, engine="captum")(images, target=t), ref)
