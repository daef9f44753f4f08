"""What every method must leave as it found: hooks, modes, requires_grad flags, memory; and the
model shapes it must accept: tuple/dict outputs, logistic (B, 1) heads, DataParallel wrappers."""

import gc

import pytest
import torch
import torch.nn.modules.module as module_globals
from torch import nn

from icnn.attribution import (
    ActivationMaximization,
    ActMaxConfig,
    AttributionError,
    Deconvnet,
    GradCAM,
    GuidedBackprop,
    Saliency,
)

from .nets import DictOut, SmallCNN, TupleOut

METHODS = {
    "saliency": lambda m, prefix="": Saliency(m),
    "guided": lambda m, prefix="": GuidedBackprop(m),
    "guided_override": lambda m, prefix="": GuidedBackprop(m, engine="override"),
    "deconvnet": lambda m, prefix="": Deconvnet(m),
    "gradcam": lambda m, prefix="": GradCAM(m, prefix + "features.4"),
}
ACTMAX_CFG = ActMaxConfig(image_size=(16, 16), steps=1)


def hook_count(model: nn.Module) -> int:
    local = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    kinds = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
    return local + sum(len(getattr(module_globals, f"_global_{k}")) for k in kinds)


def state(model: nn.Module):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def run_once(name, model, images):
    if name == "actmax":
        return ActivationMaximization(model, "features.4", config=ACTMAX_CFG)([0, 3]).image
    with METHODS[name](model) as method:
        return method(images)


ALL = [*METHODS, "actmax"]


@pytest.mark.parametrize("name", ALL)
def test_no_hooks_and_no_memory_growth_after_100_calls(name, images):
    model = SmallCNN().train()  # training mode on purpose: must come back as it was
    model.classifier.weight.requires_grad_(False)
    before = state(model)
    run_once(name, model, images[:1])  # warm-up (lazy imports, caches)
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(100):
        run_once(name, model, images[:1])
    gc.collect()
    assert hook_count(model) == 0
    assert state(model) == before
    assert len(gc.get_objects()) - objects < 50  # nothing accumulates per call


class Exploding(SmallCNN):
    def forward(self, x):
        self.features(x)
        raise RuntimeError("boom")


@pytest.mark.parametrize("name", ALL)
def test_state_restored_when_the_model_raises(name, images):
    model = Exploding().train()
    model.features[0].bias.requires_grad_(False)
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"):
        run_once(name if name != "actmax" else "saliency", model, images)
    if name == "actmax":  # the layer hook stops the forward before the raise: raise in the layer
        model.features[4].register_forward_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run_once("actmax", model, images)
        model.features[4]._forward_hooks.clear()
    assert hook_count(model) == 0
    assert state(model) == before


@pytest.mark.parametrize("name", list(METHODS))
def test_input_flags_untouched(name, images):
    x = images.clone()
    y = images.clone().requires_grad_(True)
    for inp in (x, y):
        flag = inp.requires_grad
        METHODS[name](SmallCNN().eval())(inp)
        assert inp.requires_grad == flag and inp.grad is None


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("wrap", [TupleOut, DictOut, nn.DataParallel])
def test_wrapped_models_give_the_plain_answer(name, wrap, images):
    net = SmallCNN().eval()
    expected = METHODS[name](net)(images, target=2)
    prefix = "" if wrap is nn.DataParallel else "net."  # our wrappers add a level of names
    torch.testing.assert_close(METHODS[name](wrap(net), prefix)(images, target=2), expected, rtol=0, atol=0)


def test_dataparallel_layer_names_may_keep_the_module_prefix(images):
    net = SmallCNN().eval()
    wrapped = GradCAM(nn.DataParallel(net), "module.features.4")(images)
    torch.testing.assert_close(wrapped, GradCAM(net, "features.4")(images))


def test_output_selector_key_index_and_callable(images):
    net = SmallCNN().eval()
    expected = Saliency(net)(images)
    assert torch.equal(Saliency(TupleOut(net), output_selector=1)(images), expected)
    assert torch.equal(Saliency(DictOut(net), output_selector="logits")(images), expected)
    assert torch.equal(Saliency(DictOut(net), output_selector=lambda o: o["logits"])(images), expected)
    with pytest.raises(AttributionError, match="output_selector: cannot find the logits"):
        Saliency(DictOut(net), output_selector=lambda o: None)(images)


class Logistic(nn.Module):
    """Single-category model: one logit per image, (B, 1)."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN(num_classes=1)

    def forward(self, x):
        return self.net(x)


def test_logistic_model_target_none_is_index_0(images):
    model = Logistic().eval()
    x = images.clone().requires_grad_(True)
    grad = torch.autograd.grad(model(x)[:, 0].sum(), x)[0]
    torch.testing.assert_close(Saliency(model)(images), grad.abs().amax(1))
    with pytest.raises(AttributionError, match="target: class index out of range for a model with 1 output"):
        Saliency(model)(images, target=1)


def test_release_and_context_manager(images):
    with GradCAM(SmallCNN().eval(), "features.4") as cam:
        assert cam(images).shape == (3, 8, 8)
    assert cam.model is None and cam.layer is None
    cam.release()  # idempotent
    with pytest.raises(AttributionError, match="GradCAM: used after release"):
        cam(images)


def test_works_under_no_grad(images):
    net = SmallCNN().eval()
    expected = GradCAM(net, "features.4")(images)
    with torch.no_grad():
        torch.testing.assert_close(GradCAM(net, "features.4")(images), expected)
