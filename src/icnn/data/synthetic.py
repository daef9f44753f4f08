"""The synthetic part world: the embedded default dataset (SPEC §7), generated from a seed.

Sample ``i`` is drawn from ``np.random.default_rng([seed, split, stream, i])``: no files, no
downloads, the same sample for the same arguments on any machine. A scene has a cluttered
textured background (a two-colour texture, two large blobs and 4-10 smaller distractors, ~40% of
them loose parts of *other* categories) and at most one articulated object of one of six
categories (hound, stag, bird, lizard, scorpion, turtle) built from four named parts -- head,
torso, legs, tail -- each category with its own part shapes. Each object is posed at random:
torso tilt, neck / head / leg / knee / tail angles, part proportions, foreshortening (turned
towards the viewer), in-plane rotation, horizontal flip, position and scale; sometimes a
distractor in front hides some of it. Every fill (parts, distractors, background) comes from one
shared palette of 12 colours and one texture family (flat, stripes, spots, mottled), and parts
often wear the torso's fill, so neither colour nor texture tells a part, a category or the
background apart: only shape and layout do.

Ground truth is exact because the world is analytic (capsules, ellipses and convex polygons;
textures are functions of scene coordinates): any view is rendered directly at the output size,
so a box crop "resized" to ``image_size`` is a fresh render, never an interpolation. Per sample:
category; object box = the amodal box of the whole object (computed from the primitives), clipped
to the image; a *visible* mask per part (the pixel centres it owns after occlusion); landmark per
part = centroid of its visible mask in continuous pixel coordinates (pixel ``p`` covers
``[p, p+1)``), NaN when the part is fully hidden or outside the image. The centroid of a part made
of pieces (four legs) can fall between them; it always lies inside the mask's bounding box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DatasetError

PART_NAMES = ["head", "torso", "legs", "tail"]
HEAD, TORSO, LEGS, TAIL = range(4)
SPLITS = {"train": 0, "val": 1, "test": 2}

# Primitive kinds. Geometry per primitive: ``pts`` (4, 2) and ``scal`` (3,)
#   capsule: segment pts[0] -> pts[1], radius scal[0] at pts[0] tapering to scal[1] at pts[1]
#   ellipse: centre pts[0], semi-axes scal[0], scal[1], major-axis angle scal[2] (radians)
#   polygon: convex, vertices pts[0..3] (a triangle repeats its last vertex)
CAPSULE, ELLIPSE, POLYGON = 0, 1, 2

# One palette for everything: parts, distractors and background all draw from it.
PALETTE = np.array(
    [
        [0.55, 0.40, 0.25],  # brown
        [0.75, 0.62, 0.42],  # tan
        [0.38, 0.45, 0.25],  # olive
        [0.20, 0.30, 0.20],  # dark green
        [0.50, 0.50, 0.48],  # grey
        [0.26, 0.22, 0.20],  # dark brown
        [0.85, 0.82, 0.72],  # cream
        [0.60, 0.30, 0.20],  # rust
        [0.35, 0.40, 0.55],  # slate
        [0.70, 0.65, 0.30],  # ochre
        [0.14, 0.14, 0.17],  # near black
        [0.45, 0.55, 0.60],  # blue grey
    ]
)
# Fill parameters, one row per fill: colours A, B; two plane waves (k_x, k_y, phase); weights of
# wave 1, wave 2 and their product; threshold and sharpness of the A -> B switch.
_FILL_DIM = 17


class SyntheticDataError(DatasetError):
    """Bad argument to a synthetic dataset (one line naming the argument)."""


@dataclass(frozen=True)
class Category:
    """Shape and pose ranges of one category, in object units (torso ~1 long), angles in degrees.

    Directions: an angle ``a`` is the direction ``(cos a, -sin a)`` in image coordinates (y down),
    so 0 = forward (towards the head), 90 = up, -90 = down.
    """

    name: str
    torso: tuple[float, float]  # half length, half height of the torso ellipse
    tilt: tuple[float, float]  # torso tilt range, nose-up positive
    neck: tuple[float, float, float, float]  # length, half width, angle range (lo, hi)
    head: str  # "ellipse" | "circle" | "triangle" | "box"
    head_size: tuple[float, float]  # half length, half height
    head_angle: tuple[float, float]  # head direction range (absolute, before the body tilt)
    head_extras: tuple[str, ...]  # "snout" "ears" "antlers" "beak" "pincers" (part of the head)
    hips: tuple[float, ...]  # hip positions along the torso, fractions of its half length
    legs_per_hip: int
    leg: tuple[float, float, float]  # upper length, lower length (0: one segment), half width
    leg_angle: tuple[float, float]  # upper segment direction range (-90 = straight down)
    knee: tuple[float, float]  # lower segment bend relative to the upper one
    tail: str  # "chain" | "sting" (chain + stinger) | "fan" | "spike"
    tail_segments: int
    tail_size: tuple[float, float, float]  # segment length, half width at base, at tip
    tail_angle: tuple[float, float]  # direction range above backward (0 = straight back)
    tail_bend: tuple[float, float]  # per-segment bend range (positive curls downward)
    tail_in_front: bool = False  # drawn over the torso (a tail curled over the back)


CATEGORIES = [
    Category("hound", (0.45, 0.2), (-15, 40), (0.26, 0.075, 20, 85), "ellipse", (0.14, 0.1),
             (-70, 20), ("snout", "ears"), (0.68, -0.68), 2, (0.2, 0.18, 0.065), (-130, -50),
             (-35, 35), "chain", 2, (0.17, 0.055, 0.025), (-40, 80), (-30, 30)),
    Category("stag", (0.42, 0.22), (-10, 35), (0.36, 0.09, -20, 85), "ellipse", (0.16, 0.075),
             (-90, -10), ("antlers",), (0.7, -0.7), 2, (0.27, 0.27, 0.06), (-125, -55),
             (-30, 30), "chain", 1, (0.14, 0.035, 0.025), (-80, 0), (-10, 10)),
    Category("bird", (0.3, 0.21), (0, 70), (0.05, 0.05, 30, 70), "circle", (0.13, 0.13),
             (-40, 40), ("beak",), (0.0,), 2, (0.2, 0.12, 0.03), (-120, -60), (-25, 25),
             "fan", 1, (0.28, 0.05, 0.14), (-40, 30), (0, 0)),
    Category("lizard", (0.38, 0.13), (-25, 45), (0.06, 0.08, -10, 10), "triangle",
             (0.18, 0.14), (-35, 35), (), (0.65, -0.65), 2, (0.15, 0.13, 0.055), (-160, -20),
             (-80, 80), "chain", 4, (0.16, 0.1, 0.015), (-40, 40), (-40, 40)),
    Category("scorpion", (0.3, 0.16), (-10, 20), (0.0, 0.0, 0, 0), "box", (0.11, 0.11),
             (-15, 15), ("pincers",), (0.5, 0.0, -0.5), 2, (0.13, 0.14, 0.03), (-140, -40),
             (-45, 45), "sting", 4, (0.13, 0.06, 0.035), (20, 80), (-45, -15), True),
    Category("turtle", (0.42, 0.26), (-10, 20), (0.14, 0.065, -30, 50), "circle", (0.09, 0.09),
             (-30, 30), (), (0.6, -0.6), 2, (0.16, 0.0, 0.075), (-130, -50), (0, 0),
             "spike", 1, (0.13, 0.05, 0.0), (-30, 20), (0, 0)),
]


@dataclass(frozen=True)
class WorldConfig:
    """How the scenes are drawn. Sizes are fractions of the scene's shorter side."""

    object_size: tuple[float, float] = (0.45, 0.85)  # longer side of the object box
    max_outside: float = 0.1  # fraction of the object box allowed outside the scene
    clutter: tuple[int, int] = (6, 12)  # distractors behind the object (inclusive range)
    distractor_size: tuple[float, float] = (0.06, 0.3)
    decoy_fraction: float = 0.4  # distractors that are loose parts of other categories
    occluder_prob: float = 0.3  # chance of one distractor in front of the object
    same_fill_prob: float = 0.5  # chance that a non-torso part reuses the torso's fill
    max_rotation: float = 90.0  # degrees of in-plane rotation of the whole object
    foreshortening: tuple[float, float] = (0.45, 1.0)  # body-axis squash (turned towards us)
    length_jitter: float = 0.1  # relative jitter of every single length
    proportions: float = 0.5  # neck, head, legs, tail lengths each scale by exp(U(-p, p))
    lighting: float = 0.25  # strength of a linear lighting gradient across the scene
    noise_std: float = 0.03  # per-pixel Gaussian noise


@dataclass
class Scene:
    """One scene in scene coordinates (the shorter side spans [0, 1]), primitives in draw order."""

    size: tuple[float, float]  # (height, width) of the scene frame
    kind: np.ndarray  # (N,) int   CAPSULE / ELLIPSE / POLYGON
    pts: np.ndarray  # (N, 4, 2)   points (x, y)
    scal: np.ndarray  # (N, 3)     radii / semi-axes + angle
    owner: np.ndarray  # (N,) int  object part index, -1 for clutter
    source: np.ndarray  # (N,) int category whose part shape this is, -1 for generic shapes
    fill: np.ndarray  # (N,) int   row of ``fills``
    fills: np.ndarray  # (F, 17)   fill parameters; row 0 is the background
    fill_colors: np.ndarray  # (F, 2) int palette indices of colours A and B
    category: int  # object category, -1 for a background-only scene
    box: np.ndarray  # (4,) amodal object box x0, y0, x1, y1 (NaN without object)
    light: np.ndarray = field(default_factory=lambda: np.zeros(4))  # gx, gy, gain, offset


# ---------------------------------------------------------------------------------------------
# Building objects (object frame: torso centre at the origin, facing +x, y down). Plain Python
# floats here: a scene has a few hundred points, far too few for numpy to pay off.


def _dir(deg: float) -> tuple[float, float]:
    a = math.radians(deg)
    return math.cos(a), -math.sin(a)


def _at(p, d, k):
    """``p + k * d`` for 2-vectors."""
    return p[0] + k * d[0], p[1] + k * d[1]


def _frame(origin, deg, sx, sy):
    """Point ``(a, b)`` of a frame at ``origin`` facing ``deg`` with unit lengths ``sx, sy``."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return lambda a, b: (origin[0] + c * a * sx + s * b * sy, origin[1] - s * a * sx + c * b * sy)


class _Parts:
    """Primitives of one object (or one loose part) in draw order."""

    def __init__(self):
        self.kind, self.pts, self.scal, self.part = [], [], [], []

    def _add(self, kind, pts, scal, part):
        self.kind.append(kind)
        self.pts.append(pts)
        self.scal.append(scal)
        self.part.append(part)

    def capsule(self, part, a, b, r0, r1):
        self._add(CAPSULE, (*a, *b, *b, *b), (r0, r1, 0.0), part)

    def ellipse(self, part, c, a, b, deg):
        # a major axis along direction deg has angle -deg in (x, y-down) atan2 terms
        self._add(ELLIPSE, (*c, *c, *c, *c), (a, b, -math.radians(deg)), part)

    def polygon(self, part, *v):
        v = list(v) + [v[-1]] * (4 - len(v))
        self._add(POLYGON, tuple(x for p in v for x in p), (0.0, 0.0, 0.0), part)

    def extend(self, other: "_Parts"):
        for name in ("kind", "pts", "scal", "part"):
            getattr(self, name).extend(getattr(other, name))

    def arrays(self):
        """``kind (N,), pts (N, 4, 2), scal (N, 3), part (N,)``."""
        return (np.array(self.kind, np.int64), np.array(self.pts).reshape(-1, 4, 2),
                np.array(self.scal, float).reshape(-1, 3), np.array(self.part, np.int64))


def _build_object(cat: Category, rng: np.random.Generator, cfg: "WorldConfig",
                  only: int | None = None) -> _Parts:
    """One posed object of category ``cat`` in the object frame (just its part ``only``)."""
    uni = rng.random(64)  # every random number of the pose, drawn at once (<= 64 per category)
    it = iter(uni)
    u = lambda lo, hi: lo + (hi - lo) * next(it)  # noqa: E731
    j = lambda: u(1 - cfg.length_jitter, 1 + cfg.length_jitter)  # noqa: E731  one per length
    g_neck, g_head, g_legs, g_tail = (math.exp(u(-cfg.proportions, cfg.proportions)) for _ in range(4))
    hl, hh = cat.torso[0] * j(), cat.torso[1] * j()
    tilt = u(*cat.tilt)
    tp = _frame((0.0, 0.0), tilt, hl, hh)  # point on the torso, in half lengths / heights
    legs, tail, torso, head = _Parts(), _Parts(), _Parts(), _Parts()

    torso.ellipse(TORSO, (0.0, 0.0), hl, hh, tilt)

    # neck (part of the torso) and head
    base = tp(0.75, -0.45)
    nl, nw = cat.neck[0] * g_neck * j(), cat.neck[1]
    end = _at(base, _dir(u(cat.neck[2], cat.neck[3]) + tilt), nl)
    if nl > 0 and nw > 0:
        torso.capsule(TORSO, base, end, nw, nw * 0.85)
    hang = u(*cat.head_angle) + tilt
    ha, hb = cat.head_size[0] * g_head * j(), cat.head_size[1] * g_head * j()
    hc = _at(end, _dir(hang), 0.6 * ha)
    hp = _frame(hc, hang, ha, hb)
    if cat.head == "ellipse":
        head.ellipse(HEAD, hc, ha, hb, hang)
    elif cat.head == "circle":
        head.ellipse(HEAD, hc, ha, ha, 0.0)
    elif cat.head == "triangle":
        head.polygon(HEAD, hp(1.0, 0.0), hp(-0.7, -1.0), hp(-0.7, 1.0))
    else:  # box
        head.polygon(HEAD, hp(1, -1), hp(1, 1), hp(-1, 1), hp(-1, -1))
    for extra in cat.head_extras if only in (None, HEAD) else ():
        if extra == "snout":
            head.capsule(HEAD, hp(0.4, 0.15), hp(1.5 * j(), 0.35), 0.55 * hb, 0.4 * hb)
        elif extra == "ears":
            head.polygon(HEAD, hp(-0.6, -0.5), hp(0.1, -0.7), hp(-0.4, -1.9 * j()))
        elif extra == "beak":
            head.polygon(HEAD, hp(0.75, -0.35), hp(0.75, 0.35), hp(1.9 * j(), 0.1))
        elif extra == "antlers":
            for side in (-1.0, 1.0):
                root = hp(-0.5, -0.7)
                tip = _at(root, _dir(90 + 25 * side + u(-10, 10)), 0.24 * j())
                head.capsule(HEAD, root, tip, 0.022, 0.012)
                mid = _at(root, (tip[0] - root[0], tip[1] - root[1]), 0.5)
                head.capsule(HEAD, mid, _at(mid, _dir(90 + 55 * side), 0.1), 0.016, 0.01)
        elif extra == "pincers":
            for side in (-1.0, 1.0):
                p0 = hp(0.8, 0.6 * side)
                p1 = _at(p0, _dir(hang + side * u(10, 35)), 0.15 * j())
                head.capsule(HEAD, p0, p1, 0.03, 0.025)
                head.ellipse(HEAD, _at(p1, _dir(hang), 0.04), 0.065, 0.035, hang + u(-20, 20))

    # legs: drawn behind the torso, which hides their tops
    l1, l2, lw = cat.leg[0] * g_legs, cat.leg[1] * g_legs, cat.leg[2]
    for hx in cat.hips if only in (None, LEGS) else ():
        for k in range(cat.legs_per_hip):
            hip = tp(hx + 0.12 * (k - (cat.legs_per_hip - 1) / 2), 0.45)
            a1 = u(*cat.leg_angle)
            knee = _at(hip, _dir(a1), l1 * j())
            legs.capsule(LEGS, hip, knee, lw, 0.9 * lw)
            if l2 > 0:
                foot = _at(knee, _dir(a1 + u(*cat.knee)), l2 * j())
                legs.capsule(LEGS, knee, foot, 0.9 * lw, 0.75 * lw)

    # tail: "a above backward" is the direction 180 - a (+ tilt)
    sl, w0, w1 = cat.tail_size[0] * g_tail, cat.tail_size[1], cat.tail_size[2]
    p = tp(-0.85, -0.2)
    ang = 180 - u(*cat.tail_angle) + tilt
    if cat.tail in ("chain", "sting"):
        n = cat.tail_segments
        for s in range(n):
            q = _at(p, _dir(ang), sl * j())
            tail.capsule(TAIL, p, q, w0 + (w1 - w0) * s / n, w0 + (w1 - w0) * (s + 1) / n)
            p = q
            ang -= u(*cat.tail_bend)  # positive bend turns clockwise (down when pointing back)
        if cat.tail == "sting":
            d, nrm = _dir(ang), _dir(ang + 90)
            tail.polygon(TAIL, _at(p, nrm, 0.05), _at(p, d, 0.12), _at(p, nrm, -0.05))
    else:  # fan / spike: a (truncated) triangle pointing back
        d, nrm = _dir(ang), _dir(ang + 90)
        tip = _at(p, d, sl * j())
        if cat.tail == "fan":
            tail.polygon(TAIL, _at(p, nrm, w0), _at(tip, nrm, w1), _at(tip, nrm, -w1), _at(p, nrm, -w0))
        else:
            tail.polygon(TAIL, _at(p, nrm, w0), tip, _at(p, nrm, -w0))

    if only is not None:
        return [head, torso, legs, tail][only]
    obj = _Parts()
    for parts in [legs, torso, tail, head] if cat.tail_in_front else [legs, tail, torso, head]:
        obj.extend(parts)
    return obj


def _transform(pts, scal, kind, *, scale=1.0, deg=0.0, flip=False, shift=(0.0, 0.0)):
    """Similarity transform of primitives: mirror x (flip), rotate to ``deg``, scale, shift.

    ``scale, deg, flip`` are scalars or ``(N,)`` (one per primitive), ``shift`` is ``(2,)`` or
    ``(N, 2)``. Returns new ``pts (N, 4, 2)`` and ``scal (N, 3)``.
    """
    n = len(kind)
    scale, deg, flip = (np.broadcast_to(np.asarray(v, float), (n,)) for v in (scale, deg, flip))
    a = np.radians(deg)[:, None]
    c, s = np.cos(a), np.sin(a)  # (N, 1)
    x = np.where(flip[:, None] > 0, -pts[..., 0], pts[..., 0])  # (N, 4)
    y = pts[..., 1]
    out = np.stack([c * x + s * y, c * y - s * x], -1) * scale[:, None, None]
    out += np.broadcast_to(np.asarray(shift, float), (n, 2))[:, None, :]
    scal = scal.copy()
    scal[:, :2] *= scale[:, None]
    theta = np.where(flip > 0, -scal[:, 2], scal[:, 2]) - a[:, 0]
    scal[:, 2] = np.where(kind == ELLIPSE, theta, scal[:, 2])
    return out, scal


def _squash(kind, pts, scal, f: float):
    """Foreshorten primitives along x by ``f`` (an object turned towards the viewer): points
    scale, capsule radii stay (limbs keep their width), ellipses get their exact image under
    ``diag(f, 1)``: the quadric ``M = R diag(a^-2, b^-2) R^T`` becomes ``A^-T M A^-1``."""
    pts = pts * np.array([f, 1.0])
    scal = scal.copy()
    ell = kind == ELLIPSE
    a, b, t = scal[ell, 0], scal[ell, 1], scal[ell, 2]
    c, s = np.cos(t), np.sin(t)
    p = (c * c / a**2 + s * s / b**2) / f**2
    r = s * s / a**2 + c * c / b**2
    q = c * s * (1 / a**2 - 1 / b**2) / f
    mid, rad = (p + r) / 2, np.hypot((p - r) / 2, q)
    scal[ell, 0] = 1 / np.sqrt(mid - rad)  # major semi-axis: the smaller eigenvalue
    scal[ell, 1] = 1 / np.sqrt(mid + rad)
    scal[ell, 2] = 0.5 * np.arctan2(2 * q, p - r) + np.pi / 2
    return pts, scal


def _extents(kind, pts, scal) -> np.ndarray:
    """Exact bounding box ``(x0, y0, x1, y1)`` of each primitive: ``(N, 4)``."""
    r = scal[:, :2, None]  # (N, 2, 1) capsule radii at both ends
    cap_lo, cap_hi = (pts[:, :2] - r).min(1), (pts[:, :2] + r).max(1)  # (N, 2)
    a, b, t = scal[:, 0], scal[:, 1], scal[:, 2]
    half = np.stack([np.hypot(a * np.cos(t), b * np.sin(t)), np.hypot(a * np.sin(t), b * np.cos(t))], 1)
    cap, ell = (kind == CAPSULE)[:, None], (kind == ELLIPSE)[:, None]
    lo = np.where(cap, cap_lo, np.where(ell, pts[:, 0] - half, pts.min(1)))
    hi = np.where(cap, cap_hi, np.where(ell, pts[:, 0] + half, pts.max(1)))
    return np.concatenate([lo, hi], 1)


def _extent(kind, pts, scal) -> np.ndarray:
    """Exact union bounding box ``(x0, y0, x1, y1)`` of primitives."""
    e = _extents(kind, pts, scal)
    return np.concatenate([e[:, :2].min(0), e[:, 2:].max(0)])


# ---------------------------------------------------------------------------------------------
# Fills and the scene


def _random_fills(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fills from the shared palette and texture family: ``(n, 17)`` parameters and
    ``(n, 2)`` palette indices of colours A, B. Row 0 is a low-frequency (background) texture."""
    idx = rng.integers(len(PALETTE), size=(n, 2))  # (n, 2)
    cols = np.clip(PALETTE[idx] + rng.uniform(-0.06, 0.06, (n, 2, 3)), 0, 1)  # (n, 2, 3)
    period = rng.uniform(0.025, 0.12, (n, 2))  # scene units (the shorter side is 1)
    period[0] = rng.uniform(0.15, 0.5, 2)
    k = 2 * np.pi / period
    ang = rng.uniform(0, np.pi, (n, 2))
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    waves = np.stack([k * np.cos(ang), k * np.sin(ang), phase], 2).reshape(n, 6)  # (n, 6)
    texture = rng.integers(4, size=n)
    thr = rng.uniform(-0.4, 0.4, n)
    sharp = rng.uniform(5, 20, n)
    mix = np.zeros((n, 5))
    mix[:, 3], mix[:, 4] = thr, sharp
    flat = texture == 0  # B everywhere, B = A plus a little
    cols[flat, 1] = np.clip(cols[flat, 0] + rng.uniform(-0.05, 0.05, (int(flat.sum()), 3)), 0, 1)
    idx[flat, 1] = idx[flat, 0]
    mix[flat, 3], mix[flat, 4] = -1.0, 5.0
    mix[texture == 1, 0] = 1.0  # stripes
    mix[texture == 2, 2] = 1.0  # spots / checks
    mottled = texture == 3
    mix[mottled, 0:2] = 0.6
    mix[mottled, 4] = sharp[mottled] / 5
    return np.concatenate([cols.reshape(n, 6), waves, mix], 1), idx


class PartWorld:
    """Draws scenes (``scene``) and renders any view of them (``render``)."""

    def __init__(self, num_categories: int = 6, config: WorldConfig | None = None):
        if not 1 <= num_categories <= len(CATEGORIES):
            raise SyntheticDataError(
                f"num_categories must be in 1..{len(CATEGORIES)}, got {num_categories}")
        self.categories = CATEGORIES[:num_categories]
        self.config = config or WorldConfig()

    # -- scenes -------------------------------------------------------------------------------

    def scene(self, rng: np.random.Generator, category: int | None, *, size=(1.0, 1.0),
              exclude: tuple[int, ...] = ()) -> Scene:
        """A scene with one object of ``category`` (None: background only) in a frame of
        ``size = (height, width)`` scene units.

        Decoy distractors (loose parts) never come from ``category`` itself (they would be
        unlabelled copies of its parts) nor from the categories in ``exclude``.
        """
        cfg = self.config
        hs, ws = size
        fills, fill_colors = _random_fills(rng, 2 + cfg.clutter[1] + len(PART_NAMES))
        banned = set(exclude) | ({category} if category is not None else set())
        decoys = [c for c in range(len(self.categories)) if c not in banned]

        # clutter behind the object: two large blobs, then smaller shapes; fill i + 1 each
        n = int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))
        centre = rng.uniform([-0.1, -0.1], [ws + 0.1, hs + 0.1], (n, 2))
        sizes = rng.uniform(*cfg.distractor_size, n)
        sizes[:2] = rng.uniform(0.4, 0.8, 2)[: min(n, 2)]
        groups = [self._distractors(rng, centre, sizes, 1 + np.arange(n), decoys)]
        used = 1 + n

        box = np.full(4, np.nan)
        if category is not None:
            obj = _build_object(self.categories[category], rng, cfg)
            kind, pts, scal, part = obj.arrays()
            pts, scal = _squash(kind, pts, scal, rng.uniform(*cfg.foreshortening))
            pts, scal = _transform(pts, scal, kind, deg=rng.uniform(-cfg.max_rotation, cfg.max_rotation),
                                   flip=rng.random() < 0.5)
            ext = _extent(kind, pts, scal)
            bw, bh = ext[2] - ext[0], ext[3] - ext[1]
            s = rng.uniform(*cfg.object_size) * min(hs, ws) / max(bw, bh)
            bw, bh, m = s * bw, s * bh, cfg.max_outside
            x0 = rng.uniform(-m * bw, max(ws - (1 - m) * bw, -m * bw))
            y0 = rng.uniform(-m * bh, max(hs - (1 - m) * bh, -m * bh))
            pts, scal = _transform(pts - ext[:2], scal, kind, scale=s, shift=(x0, y0))
            # fills: the torso's, often reused by the other parts
            new = rng.random(len(PART_NAMES)) >= cfg.same_fill_prob
            new[TORSO] = False
            part_fill = np.full(len(PART_NAMES), used)
            part_fill[new] = used + 1 + np.arange(int(new.sum()))
            used += 1 + int(new.sum())
            groups.append((kind, pts, scal, part, np.full(len(kind), category), part_fill[part]))
            box = _extent(kind, pts, scal)
            if rng.random() < cfg.occluder_prob:  # one distractor in front, over the object
                centre = rng.uniform(box[:2], box[2:])[None]
                sizes = np.array([rng.uniform(0.2, 0.45) * max(bw, bh)])
                groups.append(self._distractors(rng, centre, sizes, np.array([used]), decoys))
                used += 1

        gx, gy = rng.normal(0, cfg.lighting, 2)
        light = np.array([gx, gy, rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05)])
        kind, pts, scal, owner, source, fill = (np.concatenate(a) for a in zip(*groups))
        return Scene(size=(hs, ws), kind=kind, pts=pts, scal=scal, owner=owner, source=source,
                     fill=fill, fills=fills[:used], fill_colors=fill_colors[:used],
                     category=-1 if category is None else int(category), box=box, light=light)

    def _distractors(self, rng, centre, sizes, fill, decoys):
        """Distractors centred at ``centre (n, 2)`` with longer side ``sizes (n,)``, in that draw
        order: generic shapes (capsule, ellipse, convex polygon; one primitive each) or, with
        chance ``decoy_fraction``, a loose part (head, torso, legs or tail) of a category in
        ``decoys``. Returns ``kind, pts, scal, owner (-1), source (category or -1), fill``."""
        n = len(sizes)
        decoy = (rng.random(n) < self.config.decoy_fraction) & (len(decoys) > 0)
        # generic shapes, vectorised over slots
        shape = rng.integers(3, size=n)
        r = sizes / 2
        u = rng.random((n, 10))
        ang = 2 * np.pi * u[:, 0]
        d = np.stack([np.cos(ang), np.sin(ang)], 1) * (r * (0.5 + 0.5 * u[:, 1]))[:, None]  # (n, 2)
        rad = r * (0.15 + 0.3 * u[:, 2])
        cap_pts = np.stack([centre - d, centre + d, centre + d, centre + d], 1)  # (n, 4, 2)
        nv = 3 + (u[:, 3] < 0.5)  # polygon: 3 or 4 vertices at increasing angles
        k = np.minimum(np.arange(4), nv[:, None] - 1)  # (n, 4) the last vertex repeats
        jit = np.take_along_axis(u[:, 6:10], k, 1)  # (n, 4) per-vertex jitter
        a = ang[:, None] + (2 * np.pi * k + (jit - 0.5) * 0.8 * np.pi) / nv[:, None]
        rv = r[:, None] * (0.6 + 0.4 * np.take_along_axis(u[:, 6:10], 3 - k, 1))
        pol_pts = centre[:, None] + rv[..., None] * np.stack([np.cos(a), np.sin(a)], -1)
        sh = shape[:, None, None]
        pts = np.where(sh == CAPSULE, cap_pts, np.where(sh == ELLIPSE, centre[:, None], pol_pts))
        scal = np.where(shape[:, None] == CAPSULE,
                        np.stack([rad, rad * (0.4 + 0.8 * u[:, 4]), 0 * rad], 1),
                        np.stack([r, r * (0.3 + 0.7 * u[:, 4]), np.pi * u[:, 5]], 1))
        scal[shape == POLYGON] = 0.0
        slot = [np.flatnonzero(~decoy)]
        out = [(shape[~decoy], pts[~decoy], scal[~decoy], np.full((~decoy).sum(), -1))]

        idx = np.flatnonzero(decoy)
        if len(idx):  # loose parts, transformed together
            parts, group, source = _Parts(), [], []
            cats = rng.integers(len(decoys), size=len(idx))
            which = np.searchsorted([0.3, 0.45, 0.75], rng.random(len(idx)), side="right")  # H T L T
            for g, (c, w) in enumerate(zip(cats, which)):
                one = _build_object(self.categories[decoys[c]], rng, self.config, only=int(w))
                parts.extend(one)
                group += [g] * len(one.kind)
                source += [decoys[c]] * len(one.kind)
            kind, p, sc, _ = parts.arrays()
            group = np.array(group)
            e = _extents(kind, p, sc)
            starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
            lo, hi = np.minimum.reduceat(e[:, :2], starts), np.maximum.reduceat(e[:, 2:], starts)
            s = sizes[idx] / np.maximum((hi - lo).max(1), 1e-3)  # (G,)
            deg, flip = rng.uniform(-180, 180, len(idx)), rng.random(len(idx)) < 0.5
            p, sc = _transform(p - ((lo + hi) / 2)[group, None], sc, kind, scale=s[group],
                               deg=deg[group], flip=flip[group], shift=centre[idx][group])
            slot.append(idx[group])
            out.append((kind, p, sc, np.array(source)))
        order = np.argsort(np.concatenate(slot), kind="stable")
        kind, pts, scal, source = (np.concatenate(a)[order] for a in zip(*out))
        slot = np.concatenate(slot)[order]
        return kind, pts, scal, np.full(len(kind), -1), source, fill[slot]

    # -- rendering ----------------------------------------------------------------------------

    def render(self, scene: Scene, out_hw: tuple[int, int], view=None, rng=None) -> dict:
        """Render the region ``view = (x0, y0, x1, y1)`` (scene coordinates; default: the whole
        scene) to ``out_hw = (H, W)`` pixels. Pixel ``(r, c)`` samples the scene at
        ``(x0 + (c + 0.5) * sx, y0 + (r + 0.5) * sy)``, ``sx = (x1 - x0) / W``.

        Returns numpy arrays: image (3, H, W) float32, part_masks (P, H, W) bool, landmarks (P, 2)
        (mask centroids, NaN when empty), box (4,) (the object box in output pixels, clipped to the
        image; NaN without an object). ``rng`` draws the pixel noise (none when None).
        """
        H, W = out_hw
        if view is None:
            view = (0.0, 0.0, scene.size[1], scene.size[0])
        vx0, vy0, vx1, vy1 = view
        sx, sy = (vx1 - vx0) / W, (vy1 - vy0) / H
        xs = vx0 + (np.arange(W) + 0.5) * sx  # (W,) scene x of pixel centres
        ys = vy0 + (np.arange(H) + 0.5) * sy  # (H,)

        top = _top_primitive(scene.kind, scene.pts, scene.scal, view, (H, W))  # (H, W)
        hit = top >= 0
        owner = np.where(hit, scene.owner[top], -1)  # (H, W)
        fill = np.where(hit, scene.fill[top], 0)

        # textures: every pixel evaluates its own fill's formula (a gather, then one pass)
        g = scene.fills[fill]  # (H, W, 17)
        X, Y = xs[None, :], ys[:, None]
        s1 = np.sin(g[..., 6] * X + g[..., 7] * Y + g[..., 8])
        s2 = np.sin(g[..., 9] * X + g[..., 10] * Y + g[..., 11])
        s = g[..., 12] * s1 + g[..., 13] * s2 + g[..., 14] * s1 * s2
        t = 1.0 / (1.0 + np.exp(-g[..., 16] * (s - g[..., 15])))  # (H, W)
        img = g[..., 0:3] + (g[..., 3:6] - g[..., 0:3]) * t[..., None]  # (H, W, 3)
        gx, gy, gain, offset = scene.light
        shade = gain * (1 + gx * (X - scene.size[1] / 2) + gy * (Y - scene.size[0] / 2)) + offset
        img = (img * shade[..., None]).astype(np.float32)
        if rng is not None and self.config.noise_std > 0:
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(self.config.noise_std)
        img = np.clip(img, 0, 1).transpose(2, 0, 1)  # (3, H, W)

        masks = owner[None] == np.arange(len(PART_NAMES))[:, None, None]  # (P, H, W)
        box = np.full(4, np.nan)
        if scene.category >= 0:
            box = (scene.box - [vx0, vy0, vx0, vy0]) / [sx, sy, sx, sy]
            box = np.clip(box, 0, [W, H, W, H])
        return {"image": img, "part_masks": masks, "landmarks": mask_centroids(masks), "box": box}


def _top_primitive(kind, pts, scal, view, out_hw) -> np.ndarray:
    """Index of the last-drawn primitive covering each pixel centre, -1 for none: ``(H, W)``.

    Each primitive is tested only inside its own pixel window (from its exact extent); windows of
    one kind are padded to a common size and tested together, small and large ones apart.
    """
    H, W = out_hw
    vx0, vy0, vx1, vy1 = view
    sx, sy = (vx1 - vx0) / W, (vy1 - vy0) / H
    ext = _extents(kind, pts, scal)  # (N, 4) scene coordinates
    # pixel c is tested if its centre (c + 0.5) lies in [x0, x1] (output pixel units)
    c0 = np.ceil((ext[:, 0] - vx0) / sx - 0.5)
    c1 = np.floor((ext[:, 2] - vx0) / sx - 0.5)
    r0 = np.ceil((ext[:, 1] - vy0) / sy - 0.5)
    r1 = np.floor((ext[:, 3] - vy0) / sy - 0.5)
    c0, r0 = np.clip(c0, 0, W).astype(np.int64), np.clip(r0, 0, H).astype(np.int64)
    c1, r1 = np.clip(c1, -1, W - 1).astype(np.int64), np.clip(r1, -1, H - 1).astype(np.int64)
    nw, nh = c1 - c0 + 1, r1 - r0 + 1  # window sizes (<= 0: off screen)
    top = np.full(H * W, -1, np.int64)
    large = np.maximum(nw, nh) > max(H, W) // 3
    for k in (CAPSULE, ELLIPSE, POLYGON):
        for big in (False, True):
            sel = np.flatnonzero((kind == k) & (large == big) & (nw > 0) & (nh > 0))
            if len(sel) == 0:
                continue
            ww, wh = nw[sel].max(), nh[sel].max()
            cols = c0[sel, None] + np.arange(ww)  # (n, ww)
            rows = r0[sel, None] + np.arange(wh)  # (n, wh)
            X = (vx0 + (cols + 0.5) * sx)[:, None, :]  # (n, 1, ww)
            Y = (vy0 + (rows + 0.5) * sy)[:, :, None]  # (n, wh, 1)
            inside = _inside(k, pts[sel], scal[sel], X, Y)  # (n, wh, ww)
            inside &= (cols < W)[:, None, :] & (rows < H)[:, :, None]
            n_i, r_i, c_i = np.nonzero(inside)
            flat = rows[n_i, r_i] * W + cols[n_i, c_i]
            np.maximum.at(top, flat, sel[n_i])
    return top.reshape(H, W)


def _inside(kind, pts, scal, X, Y) -> np.ndarray:
    """Which points each primitive of one ``kind`` covers. ``pts (n, 4, 2)``, ``scal (n, 3)``,
    ``X (n, 1, w)``, ``Y (n, h, 1)`` -> ``(n, h, w)`` bool."""
    if kind == CAPSULE:
        ax, ay, bx, by = (pts[:, i // 2, i % 2, None, None] for i in range(4))  # (n, 1, 1)
        r0, r1 = scal[:, 0, None, None], scal[:, 1, None, None]
        ex, ey = bx - ax, by - ay
        px, py = X - ax, Y - ay  # (n, 1, w), (n, h, 1)
        t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey + 1e-12), 0, 1)  # (n, h, w)
        dx, dy = px - ex * t, py - ey * t
        r = r0 + (r1 - r0) * t
        return dx * dx + dy * dy <= r * r
    if kind == ELLIPSE:
        cx, cy = pts[:, 0, 0, None, None], pts[:, 0, 1, None, None]
        a, b, th = (scal[:, i, None, None] for i in range(3))
        dx, dy = X - cx, Y - cy
        cos, sin = np.cos(th), np.sin(th)
        u = (dx * cos + dy * sin) / a
        v = (dy * cos - dx * sin) / b
        return u * u + v * v <= 1
    # convex polygon: the point is on the same side of every edge (either winding)
    pos = neg = None
    for i in range(4):
        x0, y0 = pts[:, i, 0, None, None], pts[:, i, 1, None, None]
        x1, y1 = pts[:, (i + 1) % 4, 0, None, None], pts[:, (i + 1) % 4, 1, None, None]
        cross = (x1 - x0) * (Y - y0) - (y1 - y0) * (X - x0)  # (n, h, w)
        pos = cross >= 0 if pos is None else pos & (cross >= 0)
        neg = cross <= 0 if neg is None else neg & (cross <= 0)
    return pos | neg


def mask_centroids(masks: np.ndarray) -> np.ndarray:
    """Centroid ``(x, y)`` of each mask in continuous pixel coordinates: ``(P, H, W) -> (P, 2)``.

    Pixel ``(r, c)`` has centre ``(c + 0.5, r + 0.5)``; an empty mask gives NaN.
    """
    P, H, W = masks.shape
    count = masks.sum((1, 2))  # (P,)
    cx = masks.sum(1) @ (np.arange(W) + 0.5)  # (P,)
    cy = masks.sum(2) @ (np.arange(H) + 0.5)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.stack([cx / count, cy / count], 1)
    out[count == 0] = np.nan
    return out


def crop_view(box, margin: float = 0.0, square: bool = False) -> tuple[float, float, float, float]:
    """The region a box crop covers: the box grown by ``margin`` times its size on every side
    (and, if ``square``, its shorter side grown to the longer one around the same centre)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    if square:
        side = max(w, h)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, x1, y0, y1 = cx - side / 2, cx + side / 2, cy - side / 2, cy + side / 2
        w = h = side
    return (x0 - margin * w, y0 - margin * h, x1 + margin * w, y1 + margin * h)


# ---------------------------------------------------------------------------------------------
# Datasets


def _check(num_samples, split, image_size, seed) -> tuple[int, int]:
    if not isinstance(num_samples, int) or num_samples < 0:
        raise SyntheticDataError(f"num_samples must be a non-negative int, got {num_samples!r}")
    if split not in SPLITS:
        raise SyntheticDataError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not isinstance(seed, int) or seed < 0:
        raise SyntheticDataError(f"seed must be a non-negative int, got {seed!r}")
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and v >= 4 for v in hw):
        raise SyntheticDataError(f"image_size must be an int or (H, W) of ints >= 4, got {image_size!r}")
    return hw


def _scene_size(hw) -> tuple[float, float]:
    """Scene frame (height, width) with the image's aspect, shorter side 1."""
    return hw[0] / min(hw), hw[1] / min(hw)


def _fraction(name, value) -> float:
    if not 0.0 <= value <= 1.0:
        raise SyntheticDataError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _sample(out: dict, label: int, index: int) -> dict:
    return {
        "image": torch.from_numpy(out["image"]),
        "label": torch.tensor(label, dtype=torch.int64),
        "box": torch.from_numpy(out["box"].astype(np.float32)),
        "landmarks": torch.from_numpy(out["landmarks"].astype(np.float32)),
        "part_masks": torch.from_numpy(out["part_masks"]),
        "index": torch.tensor(index, dtype=torch.int64),
    }


# Samples are deterministic per (seed, split, index), so a generated sample can be kept and
# served again: training epochs then cost no generation. Kept only while the whole set fits here.
CACHE_BYTES = 1 << 30


class _SyntheticBase(Dataset):
    part_names = PART_NAMES
    landmark_names = PART_NAMES

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        cache = self.__dict__.setdefault("_cache", {})
        if index in cache:
            return {k: v.clone() for k, v in cache[index].items()}
        sample = self._make(index)
        h, w = self.image_size
        if self.num_samples * h * w * (3 * 4 + len(self.part_names)) <= CACHE_BYTES:
            cache[int(index)] = {k: v.clone() for k, v in sample.items()}
        return sample

    def _rng(self, index: int, stream: int) -> tuple[np.random.Generator, int]:
        """The generator of sample ``index`` (negative indices count from the end)."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        return np.random.default_rng([self.seed, SPLITS[self.split], stream, index]), index


class SyntheticParts(_SyntheticBase):
    """Multi-category synthetic part world: whole scenes, one object (or none) each.

    Labels: ``0 .. num_categories - 1`` the object's category (``classes[:num_categories]``);
    background-only scenes (negatives) get the extra last class ``"background"`` (box, landmarks
    NaN; masks all False). Without negatives (``negative_fraction=0``) there is no such class.

    Args:
        num_samples: dataset length.
        split: ``"train"`` | ``"val"`` | ``"test"``; each split has its own seed stream.
        image_size: output side (int) or ``(H, W)``.
        num_categories: 1..6, the first categories of ``CATEGORIES``.
        seed: sample ``i`` is drawn from ``default_rng([seed, split, 0, i])``.
        negative_fraction: chance that a sample is a background-only scene; default
            ``1 / (num_categories + 1)`` (all classes equally likely).
        config: ``WorldConfig`` (clutter, sizes, noise ...).
    """

    def __init__(self, num_samples: int, *, split: str = "train", image_size=64,
                 num_categories: int = 6, seed: int = 0, negative_fraction: float | None = None,
                 config: WorldConfig | None = None):
        self.image_size = _check(num_samples, split, image_size, seed)
        self.num_samples, self.split, self.seed = num_samples, split, seed
        self.world = PartWorld(num_categories, config)
        if negative_fraction is None:
            negative_fraction = 1.0 / (num_categories + 1)
        self.negative_fraction = _fraction("negative_fraction", negative_fraction)
        self.num_categories = num_categories
        self.classes = [c.name for c in self.world.categories]
        if self.negative_fraction > 0:
            self.classes.append("background")

    def scene(self, index: int) -> tuple[Scene, np.random.Generator, int]:
        """The scene of sample ``index`` and the generator left for its pixel noise."""
        rng, index = self._rng(index, 0)
        negative = rng.random() < self.negative_fraction
        category = None if negative else int(rng.integers(self.num_categories))
        return self.world.scene(rng, category, size=_scene_size(self.image_size)), rng, index

    def _make(self, index: int) -> dict:
        scene, rng, index = self.scene(index)
        out = self.world.render(scene, self.image_size, rng=rng)
        label = scene.category if scene.category >= 0 else self.num_categories
        return _sample(out, label, index)


class SyntheticSingleCategory(_SyntheticBase):
    """The paper's single-category task on the synthetic world (see ``synthetic_single_category``)."""

    def __init__(self, num_samples: int, *, split: str = "train", target=0, image_size=64,
                 seed: int = 0, crop_margin: float = 0.0, crop_jitter: float = 0.6, square_crop: bool = False,
                 positive_fraction: float = 0.5, background_fraction: float | None = None,
                 num_categories: int = 6, config: WorldConfig | None = None):
        self.image_size = _check(num_samples, split, image_size, seed)
        self.num_samples, self.split, self.seed = num_samples, split, seed
        self.world = PartWorld(num_categories, config)
        names = [c.name for c in self.world.categories]
        if isinstance(target, str):
            if target not in names:
                raise SyntheticDataError(f"target must be one of {names}, got {target!r}")
            target = names.index(target)
        if not isinstance(target, int) or not 0 <= target < num_categories:
            raise SyntheticDataError(f"target must be a category in 0..{num_categories - 1}, got {target!r}")
        if crop_margin < 0 or crop_jitter < 0:
            raise SyntheticDataError(f"crop_margin and crop_jitter must be >= 0, got {crop_margin!r}, {crop_jitter!r}")
        self.target, self.crop_margin, self.square_crop = target, float(crop_margin), square_crop
        self.crop_jitter = float(crop_jitter)
        self.positive_fraction = _fraction("positive_fraction", positive_fraction)
        if background_fraction is None:  # uniform over the other categories and "background"
            background_fraction = 1.0 / num_categories
        self.background_fraction = _fraction("background_fraction", background_fraction)
        self.others = [c for c in range(num_categories) if c != target]
        self.classes = ["negative", names[target]]

    def is_positive(self, index: int) -> bool:
        """Positives are spread evenly: ``floor((i + 1) f) > floor(i f)`` for fraction ``f``."""
        f = self.positive_fraction
        return math.floor((index + 1) * f + 1e-9) > math.floor(index * f + 1e-9)

    def scene(self, index: int) -> tuple[Scene, np.random.Generator, int]:
        rng, index = self._rng(index, 1 + self.target)
        if self.is_positive(index):
            category = self.target
        elif not self.others or rng.random() < self.background_fraction:
            category = None
        else:
            category = int(rng.choice(self.others))
        scene = self.world.scene(rng, category, size=_scene_size(self.image_size), exclude=(self.target,))
        return scene, rng, index

    def _make(self, index: int) -> dict:
        scene, rng, index = self.scene(index)
        positive = scene.category == self.target
        view = None
        if positive:  # the box grown by the margin, then each side by its own U(0, crop_jitter)
            x0, y0, x1, y1 = crop_view(scene.box, self.crop_margin, self.square_crop)
            jl, jt, jr, jb = rng.uniform(0.0, self.crop_jitter, 4) * np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
            view = (x0 - jl, y0 - jt, x1 + jr, y1 + jb)
        out = self.world.render(scene, self.image_size, view, rng)
        if not positive:  # negatives carry no object annotation at all
            out["box"][:] = np.nan
            out["landmarks"][:] = np.nan
            out["part_masks"][:] = False
        return _sample(out, int(positive), index)


def synthetic_single_category(num_samples: int, **kwargs) -> SyntheticSingleCategory:
    """Single-category task (paper §5.1): target objects vs everything else.

    Positives (label 1): a scene with an object of ``target`` (index or name), cropped by its box
    grown by ``crop_margin`` (fraction of the box size per side; ``square_crop=True`` squares it),
    then each side by its own ``U(0, crop_jitter)`` of the box size (a loose detection: the object
    and its parts move inside the crop), and rendered at ``image_size`` -- landmarks, masks and
    box in the crop's pixels. With the default jitter (0.6) and rotation (90 degrees) the best
    fixed unit's location instability is 0.42x the random unit's (Lite0 at 160 px; 0.28x without:
    a filter that ignores the image no longer looks stable).
    Negatives (label 0): whole scenes without the target -- another category's object, or a
    background-only scene with chance ``background_fraction`` (default ``1 / num_categories``);
    their box and landmarks are NaN and masks all False; decoy parts never come from the target.
    ``positive_fraction`` (default 0.5) of the samples are positives, spread evenly over indices.
    ``classes == ["negative", <target name>]``. Sample ``i`` is drawn from
    ``default_rng([seed, split, 1 + target, i])``.
    """
    return SyntheticSingleCategory(num_samples, **kwargs)
