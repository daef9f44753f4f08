"""The explainer network (Zhang et al., "Unsupervised Learning of Neural Networks to Explain
Neural Networks", paper 003 §3.1, Fig. 2) attached to a frozen performer.

Data flow (shapes for VGG-16 at 224 px; ``L`` = the map side of the layer read)::

    image -> performer.normalize -> performer.stem [-> performer.layers up to ``layer``]
          = x_read                                                       (B, D_in, L, L)
    interpretable track:
      conv-interp-1 (copy of the performer's next conv, BN folded) + ReLU -> mask      (B, D, L, L)
      conv-interp-2 (random) + ReLU -> mask -> norm -> pool                           (B, D, l, l)
    ordinary track:
      conv-ordin (random) + ReLU -> norm -> pool                                      (B, D, l, l)
    x_enc = p * x_interp + (1 - p) * x_ordin,   p = sigmoid(w_p)                      (B, D, l, l)
    decoder: flatten -> fc-dec-1 (copy of fc6) -> ReLU -> fc-dec-2 (copy of fc7)     (B, 4096)
    feedback: the performer's own modules after fc7 (relu7, drop7, fc8)  -> logits    (B, K)

"Pooling layers in the explainer were also parameterized considering the last pooling layer in
the performer" (§4): each track ends with a copy of the performer head's spatial pooling (pool5
for AlexNet/VGG, the global average pool of GAP heads). The norm-layers (§3.1) divide channel
``k`` by ``alpha_k = E_x[sum_ij max(x_ijk, 0)]`` of the ``L x L`` map; since the pool and a
positive per-channel scale commute, normalising before or after the pool is the same map, and
``alpha`` is measured on the ``L x L`` maps the paper defines it on.

GAP heads (small_cnn, ResNet, EfficientNet) have no fc6/fc7: the default reconstruction target
is then the pooled feature vector the final linear reads (the head's ``flatten`` output), with
one fresh ``fc-dec-1`` (``D -> D``, initialised to the identity). Any head module can be named
instead (``reconstruct=("fc6",)``, ...): a ``Linear`` is copied into the decoder, anything else
gets an identity-initialised fresh fc.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..mask import PartMask
from ..models.net import FeatureMaps, InterpretableLayer, chain_layers, eval_mode, he_init
from ..training.distributed import all_reduce_sum, world_size


class ExplainerError(ValueError):
    """A bad explainer argument (layer, reconstruction target, performer); one line."""


class ChannelNorm(nn.Module):
    """The paper's norm-layer (§3.1): ``x_hat[:, k] = x[:, k] / alpha_k``.

    ``alpha_k = E_x[sum_ij max(x_ijk, 0)]`` is a running mean over training batches (like batch
    norm's running statistics: the first batch sets it, then
    ``alpha <- (1 - momentum) alpha + momentum * batch mean``); evaluation uses it as it is.
    ``update=False`` (or a ``weight`` mask selecting no image) skips the update.

    Under ``torch.distributed`` (DDP, more than one process) the batch mean is taken over the
    global batch (per-process sums and image counts are all-reduced), so every process holds the
    same ``alpha``, equal to that of one process on the global batch.

    Shape: ``(B, C, h, w) -> (B, C, h, w)``.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.register_buffer("alpha", torch.ones(channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # batches seen

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        mags = x.detach().float().clamp_min(0).sum((-2, -1))  # (B, C)
        if world_size() > 1:
            # global batch: all-reduce the per-channel sums and the image count together
            total = all_reduce_sum(torch.cat((mags.sum(0), mags.new_tensor([mags.shape[0]]))))
            batch = total[:-1] / total[-1].clamp_min(1.0)
        else:
            batch = mags.mean(0)  # (C,)
        if self.count.item() == 0:
            self.alpha.copy_(batch)
        else:
            self.alpha.mul_(1 - self.momentum).add_(batch, alpha=self.momentum)
        self.count += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x)
        return x / self.alpha.clamp_min(self.eps).to(x.dtype)[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.alpha.numel()}, momentum={self.momentum}"


class ExplainerOutput(NamedTuple):
    """Everything one explainer forward computes (what the losses and the metrics read)."""

    relu: dict[str, torch.Tensor]  # {"interp1", "interp2"}: (B, D, L, L) after ReLU, before the mask
    masked: dict[str, torch.Tensor]  # same, after the mask
    ordin: torch.Tensor  # (B, D, L, L) conv-ordin after ReLU, before norm/pool
    ordin_hat: torch.Tensor  # (B, D, L, L) normalised ordinary map (x^ordin of Appendix)
    x_enc: torch.Tensor  # (B, D, l, l) p * x_interp + (1 - p) * x_ordin, pooled
    recon: list[torch.Tensor]  # per reconstruction target: (B, F_l) fc-dec-l output (before ReLU)
    logits: torch.Tensor  # (B, K) the performer's classifier on the reconstructed features
    p: torch.Tensor  # () sigmoid(w_p)


def _first_conv(module: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    """The first conv of ``module`` and the BatchNorm right after it (same container), if any."""
    mods = list(module.modules())
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            bn = next((n for n in mods[i + 1 : i + 2] if isinstance(n, nn.BatchNorm2d)), None)
            return m, bn
    raise ExplainerError(f"the performer layer above the one read has no Conv2d to initialise conv-interp-1 from ({type(module).__name__})")


@torch.no_grad()
def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """A biased copy of ``conv`` with an eval-mode ``bn`` folded in (same function, own weights)."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)  # fmt: skip
    w = conv.weight.detach().clone().float()
    b = conv.bias.detach().clone().float() if conv.bias is not None else torch.zeros(conv.out_channels)
    if bn is not None:
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / (bn.running_var + bn.eps).sqrt()
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        w = w * scale[:, None, None, None]
        b = b * scale + shift
    out.weight.copy_(w)
    out.bias.copy_(b)
    return out


def split_head(head: nn.Module, reconstruct: Sequence[str] | None):
    """Splits a performer head (``nn.Sequential`` of named modules) for the explainer.

    Returns ``(pool, flatten, targets, tail)``: the spatial pooling modules before the flatten,
    the flatten, the names of the modules whose outputs are reconstructed (default: every
    ``Linear`` but the last, i.e. fc6/fc7; for GAP heads the flatten), and the modules after
    the last target (relu7, drop7, fc8), which turn reconstructed features into logits.
    """
    if not isinstance(head, nn.Sequential):
        raise ExplainerError(f"the performer's head must be an nn.Sequential of named modules, got {type(head).__name__}")
    names = [n for n, _ in head.named_children()]
    mods = dict(head.named_children())
    flat = [n for n in names if isinstance(mods[n], nn.Flatten)]
    if not flat:
        raise ExplainerError(f"the performer's head has no Flatten module (modules: {', '.join(names)})")
    i_flat = names.index(flat[0])
    linears = [n for n in names[i_flat:] if isinstance(mods[n], nn.Linear)]
    if reconstruct is None or len(reconstruct) == 0:
        reconstruct = linears[:-1] or [flat[0]]
    reconstruct = list(reconstruct)
    for t in reconstruct:
        if t not in names or names.index(t) < i_flat:
            raise ExplainerError(
                f"reconstruct: {t!r} is not a module of the performer's head after its flatten "
                f"(choose from {', '.join(names[i_flat:])})"
            )
    pos = [names.index(t) for t in reconstruct]
    if pos != sorted(set(pos)):
        raise ExplainerError(f"reconstruct: targets must be distinct and in the head's order ({', '.join(names[i_flat:])})")
    pool = nn.Sequential(OrderedDict((n, mods[n]) for n in names[:i_flat]))
    tail = nn.Sequential(OrderedDict((n, mods[n]) for n in names[pos[-1] + 1 :]))
    return pool, mods[flat[0]], reconstruct, tail


class Explainer(nn.Module):
    """The explainer network of paper 003 (see the module docstring), without the performer.

    Built by :func:`build_explainer` from a performer; ``forward(x_read)`` takes the performer's
    feature map at the layer read and returns an :class:`ExplainerOutput`. The decoder's
    feedback modules (``tail``: relu7, drop7, fc8) are frozen copies of the performer's.

    Attributes:
        layers: ``{"interp1", "interp2"}`` ``InterpretableLayer``s (conv + ReLU, then the mask).
        ordin: conv-ordin + ReLU.  norm_interp / norm_ordin: :class:`ChannelNorm`.
        pool: copies of the performer head's pooling.  decoder: ``fc_dec_1, ...`` Linears.
        w_p: the scalar parameter of ``p = sigmoid(w_p)``.
        targets: names of the performer head modules reconstructed by the decoder layers.
    """

    def __init__(self, interp1: nn.Conv2d, interp2: nn.Conv2d, ordin: nn.Conv2d, pool: nn.Module,
                 flatten: nn.Module, decoder: Sequence[nn.Linear], tail: nn.Module, targets: Sequence[str],
                 *, mask: dict | None = None, norm_momentum: float = 0.1, w_p_init: float = 0.0):  # fmt: skip
        super().__init__()
        mask = dict(mask or {})
        self.layers = nn.ModuleDict(OrderedDict(
            interp1=InterpretableLayer(nn.Sequential(OrderedDict(conv=interp1, relu=nn.ReLU())), PartMask(**mask)),
            interp2=InterpretableLayer(nn.Sequential(OrderedDict(conv=interp2, relu=nn.ReLU())), PartMask(**mask)),
        ))  # fmt: skip
        self.ordin = nn.Sequential(OrderedDict(conv=ordin, relu=nn.ReLU()))
        d = interp2.out_channels
        self.norm_interp = ChannelNorm(d, norm_momentum)
        self.norm_ordin = ChannelNorm(d, norm_momentum)
        self.pool = pool
        self.flatten = flatten
        self.decoder = nn.ModuleDict(OrderedDict((f"fc_dec_{i + 1}", fc) for i, fc in enumerate(decoder)))
        self.tail = tail.requires_grad_(False)
        self.targets = list(targets)
        self.w_p = nn.Parameter(torch.tensor(float(w_p_init)))

    @property
    def p(self) -> torch.Tensor:
        return torch.sigmoid(self.w_p)

    def train(self, mode: bool = True) -> "Explainer":
        super().train(mode)
        self.tail.eval()  # the performer's dropout stays off: its fc8 is a fixed read-out
        return self

    def encode(self, x_read: torch.Tensor):
        relu, masked, _ = chain_layers(self.layers, x_read)  # (B, D, L, L) each
        ordin = self.ordin(x_read)  # (B, D, L, L)
        x_interp = self.norm_interp(masked["interp2"])
        ordin_hat = self.norm_ordin(ordin)
        p = self.p
        x_enc = p * self.pool(x_interp) + (1 - p) * self.pool(ordin_hat)  # (B, D, l, l)
        return relu, masked, ordin, ordin_hat, x_enc, p

    def decode(self, x_enc: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        a = self.flatten(x_enc)  # (B, D*l*l)
        recon = []
        for fc in self.decoder.values():
            z = fc(a)  # (B, F_l), compared with the performer's x*_l
            recon.append(z)
            a = torch.relu(z)
        return recon, self.tail(recon[-1])  # logits (B, K) through the performer's fc8

    def forward(self, x_read: torch.Tensor) -> ExplainerOutput:
        relu, masked, ordin, ordin_hat, x_enc, p = self.encode(x_read)
        recon, logits = self.decode(x_enc)
        return ExplainerOutput(relu, masked, ordin, ordin_hat, x_enc, recon, logits, p)


def next_layer(performer: nn.Module, layer: str) -> str:
    """The performer layer right above ``layer`` (``"stem"`` -> ``"top"``)."""
    names = ["stem", *performer.layer_names]
    if layer not in names[:-1]:
        raise ExplainerError(f"layer {layer!r}: the explainer reads one of {', '.join(names[:-1])} (a layer with a conv-layer above it)")
    return names[names.index(layer) + 1]


@torch.no_grad()
def build_explainer(performer: nn.Module, *, layer: str = "stem", reconstruct: Sequence[str] | None = None,
                    mask: dict | None = None, norm_momentum: float = 0.1, w_p_init: float = 0.0) -> Explainer:  # fmt: skip
    """An explainer for ``performer`` (an ``InterpretableNet``), which is only read, never changed.

    Args:
        layer: the performer feature map explained: ``"stem"`` (default: the output of the
            backbone below its top conv-layer, i.e. relu4 of AlexNet/VGG-M/VGG-S, relu5_2 of
            VGG-16, the third block of small_cnn) or a performer layer name (``"top"``).
        reconstruct: performer head modules to reconstruct (default fc6, fc7; GAP heads: the
            pooled features); each reads the output of the one before it, the first that of
            the flatten, so ``("fc7",)`` alone is an ``ExplainerError``.
        mask: ``PartMask`` keyword arguments of the explainer's mask layers.
        norm_momentum: running-mean momentum of the norm-layers.
        w_p_init: initial ``w_p`` (0: ``p = 0.5``).
    """
    above = next_layer(performer, layer)
    conv, bn = _first_conv(performer.layers[above].body)
    interp1 = folded_conv(conv, bn)  # conv-interp-1 = the performer's next conv (§4)
    d_in, d = conv.in_channels, conv.out_channels
    interp2 = he_init(nn.Conv2d(d, d, kernel_size=3, padding=1, bias=True))  # 3x3xD, bias, size kept (§4), random
    # conv-ordin: conv-interp-1's kernel, stride and padding (so the maps align), random, bias 0 (§4)
    ordin = he_init(nn.Conv2d(d_in, d, interp1.kernel_size, interp1.stride, interp1.padding, interp1.dilation, bias=True))
    pool, flatten, targets, tail = split_head(performer.head, reconstruct)
    head = dict(performer.head.named_children())
    flat = next(n for n, m in head.items() if m is flatten)
    # the width of the flatten and of each target, from one forward of a zero image
    feats = _head_widths(performer, [flat, *targets])
    decoder, width, source = [], feats[flat], flat  # fc-dec-1 reads the flatten, fc-dec-l+1 fc-dec-l
    for t in targets:
        m = head[t]
        if isinstance(m, nn.Linear):
            fc = copy.deepcopy(m).float().requires_grad_(True)  # fc-dec-l = the performer's fc_l (§4)
        else:
            f_in = feats[t] if not decoder else width
            fc = nn.Linear(f_in, feats[t])
            nn.init.eye_(fc.weight)
            nn.init.zeros_(fc.bias)
        if fc.in_features != width:  # e.g. fc7 alone: it reads fc6's output, not the flatten's
            raise ExplainerError(f"reconstruct: {t!r} takes {fc.in_features} features but would read the {width} of {source!r} "
                                 "(each target reads the output of the target before it, the first that of the flatten)")
        decoder.append(fc)
        width, source = fc.out_features, t
    return Explainer(
        interp1, interp2, ordin, copy.deepcopy(pool), copy.deepcopy(flatten), decoder, copy.deepcopy(tail), targets,
        mask=mask, norm_momentum=norm_momentum, w_p_init=w_p_init,
    )


def _head_widths(performer: nn.Module, targets: Sequence[str]) -> dict[str, int]:
    """Output width of each head target, from one forward of a zero image (no grad)."""
    with eval_mode(performer):
        h, w = performer.image_size
        out = performer_targets(performer, torch.zeros(1, 3, h, w, device=next(performer.parameters()).device), "stem", targets)
    return {t: int(v.shape[-1]) for t, v in out.targets.items()}


class PerformerFeatures(NamedTuple):
    read: torch.Tensor  # (B, D_in, L, L) the map the explainer reads
    maps: FeatureMaps  # the performer's own feature maps
    targets: dict[str, torch.Tensor]  # {head module: (B, F)} x*_l
    logits: torch.Tensor  # (B, K)


@torch.no_grad()
def performer_targets(performer: nn.Module, images: torch.Tensor, layer: str, targets: Sequence[str], *,
                      from_stem: bool = False) -> PerformerFeatures:  # fmt: skip
    """One performer forward (no grad): the map read at ``layer``, its maps, the ``x*_l`` and logits.

    ``from_stem``: ``images`` are already the stem's outputs (a cached frozen stem, ``icnn.cache``)."""
    x = images if from_stem else performer.stem(performer.normalize(images))
    maps = performer.features_from_stem(x)
    read = x if layer == "stem" else maps.masked.get(layer)
    out, wanted = {}, set(targets)
    z = maps.out
    for name, m in performer.head.named_children():
        z = m(z)
        if name in wanted:
            out[name] = z.clone()  # inplace ReLUs follow fc6/fc7
    return PerformerFeatures(read, maps, out, z)


class _Reader(nn.Module):
    """The performer below the layer read, as a chain (for receptive-field geometry only)."""

    def __init__(self, performer: nn.Module, layer: str):
        super().__init__()
        self.normalize = performer.normalize
        self.stem = performer.stem
        names = list(performer.layer_names)
        upto = names[: names.index(layer) + 1] if layer != "stem" else []
        if upto:
            self.layers = nn.ModuleDict(OrderedDict((n, performer.layers[n]) for n in upto))


class ExplainedNet(nn.Module):
    """Performer + explainer seen as one network whose layers are ``interp1``/``interp2``.

    Its children are ordered as the computation (``reader`` = the performer up to the layer
    read, then ``layers``), so ``icnn.metrics.receptive_field.layer_geometry(net, "interp2")``
    gives the explainer units' receptive fields on the image: the layer read's geometry composed
    with conv-interp-1 and conv-interp-2. ``train()`` never puts the performer in training mode.
    """

    def __init__(self, performer: nn.Module, explainer: Explainer, layer: str = "stem"):
        super().__init__()
        self.reader = _Reader(performer, layer)
        self.layers = explainer.layers  # registered before `explainer`: named "layers.interp2"
        self.explainer = explainer
        self._performer = [performer]  # not a submodule: never saved, moved or switched to train()
        self.layer = layer
        self.num_classes = performer.num_classes
        self.image_size = performer.image_size

    @property
    def performer(self) -> nn.Module:
        return self._performer[0]

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.layers.keys())

    interpretable = True

    def train(self, mode: bool = True) -> "ExplainedNet":
        self.training = mode
        self.explainer.train(mode)
        return self

    def forward_features(self, images: torch.Tensor) -> FeatureMaps:
        read = performer_targets(self.performer, images, self.layer, ()).read
        o = self.explainer(read)
        return FeatureMaps(o.relu, o.masked, o.x_enc)

    def forward_head(self, x_enc: torch.Tensor) -> torch.Tensor:
        return self.explainer.decode(x_enc)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images).out)
