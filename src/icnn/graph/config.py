"""Hyper-parameters of the explanatory graph (SPEC-trees-graph §2a "Hyper-parameters"; the authors'
``getNetParameters.m:84-94``, ``getCurDistribution.m:2-3``, ``learn_explanatoryGraph.m:2-3``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from icnn.training.config import Config, ConfigError


class GraphError(ConfigError):
    """A user mistake (unknown layer, empty data, bad argument): one line naming the argument."""


@dataclass
class GraphConfig(Config):
    density: tuple[float, ...] | None = None  # nodes per map cell, per layer bottom to top (comma-separated as a flag; patternDensity); None: 1.4 / H, the code's 0.05 at 28x28, 0.1 at 14x14, 0.2 at 7x7
    candidates: int = 6  # candidate positions per axis around a node's centre (positionCandNum; at most the map side)
    max_range: float = 0.3  # search half-range <= max_range * H / 2 (search_.maxRange)
    deform_ratio: float = 3.0  # search half-range <= deform_ratio * sigma (search_.deform_ratio)
    init_delta: float = 0.15  # initial sigma and the prior sigma of a node without parents, times H (deform_.init_delta)
    map_delta: float = 0.025  # sigma of the Gaussian that pools a candidate's response, times H (map_delta)
    top_n: int = 15  # parents per node (topN)
    top_m: int = 600  # candidate parents in the layer above (topM)
    tau: float = 0.1  # background of the competition, times the mean prior mass of a node (validTau)
    min_var_rate: float = 0.5  # share of upper nodes dropped from the candidates: those whose position varies least (minVarRate)
    edge_cut_rate: float = 0.1  # upper nodes whose mean lies within this share of the map side from a border are no candidates (edgeCutRate)
    iterations: int = 20  # EM iterations per layer, no convergence test (iterNum)
    eta: float = 1.0  # step size of the mean update (eta)
    faithful: bool = False  # reproduce the code's quirks (SPEC §2c, docs/graph.md); False fixes them
    sigma_neg: str = "auto"  # R = x / sigma_neg: channel, one per channel (the RMS of its units'); unit, per unit (h, w, c) over the negatives (the code's: boosts a padded backbone's border units, docs/graph.md); auto: unit with faithful, else channel
    seed: int = 0  # initial node positions: a random distinct cell per node of a filter
    chunk_images: int = 8  # images per E-step chunk: bounds the working memory (docs/graph.md "Cost")
    chunk_elements: int = 1 << 23  # children x candidate parents x images per block of the parent selection

    POSITIVE: ClassVar[tuple[str, ...]] = ("candidates", "top_n", "top_m", "iterations", "chunk_images", "chunk_elements",
                                           "max_range", "deform_ratio", "init_delta", "map_delta", "tau", "eta")  # fmt: skip

    CHOICES: ClassVar[dict[str, tuple]] = {"sigma_neg": ("auto", "unit", "channel")}  # "auto" is resolved on construction
    RESUME_OVERRIDABLE: ClassVar[frozenset] = frozenset({"chunk_images", "chunk_elements"})  # memory only, not the result

    def __post_init__(self) -> None:
        if isinstance(self.density, str):  # the command line: comma-separated
            try:
                self.density = tuple(float(t) for t in self.density.split(",") if t.strip())
            except ValueError:
                raise GraphError(f"density: expected numbers separated by commas, got {self.density!r}", field="density",
                                 reason=f"expected numbers separated by commas, got {self.density!r}") from None  # fmt: skip
        if self.density is not None:
            self.density = tuple(float(d) for d in self.density)
        if self.sigma_neg == "auto":
            self.sigma_neg = "unit" if self.faithful else "channel"
        self.validate()

    def _bad(self, name: str, why: str) -> GraphError:
        exc = super()._bad(name, why)
        return GraphError(str(exc), field=exc.field, reason=exc.reason)

    def validate(self):
        super().validate()
        if self.density is not None and not (self.density and all(0 < d <= 1 for d in self.density)):
            raise self._bad("density", "every value must be in (0, 1]")
        for name in ("min_var_rate", "edge_cut_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise self._bad(name, "must be in [0, 1)")
        return self

    def layer_density(self, index: int, num_layers: int, side: int) -> float:
        """Density of layer ``index`` (bottom to top) whose map side is ``side``."""
        if self.density is None:
            return min(1.0, 1.4 / side)
        if len(self.density) != num_layers:
            raise GraphError(f"density: {len(self.density)} values for {num_layers} layers")
        return self.density[index]

    def nodes_per_filter(self, index: int, num_layers: int, side: int) -> int:
        """P = ceil(H * W * density) (``initializeModel.m:8``)."""
        return math.ceil(side * side * self.layer_density(index, num_layers, side) - 1e-9)

    def sigma_range(self, index: int, num_layers: int, side: int) -> tuple[float, float]:
        """Clamp of sigma, ``[max_delta / 10, max_delta] * H`` with ``max_delta = 1 / sqrt(density H^2)``."""
        top = side / math.sqrt(self.layer_density(index, num_layers, side) * side * side)
        return top / 10, top

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["density"] = None if self.density is None else list(self.density)
        return d
