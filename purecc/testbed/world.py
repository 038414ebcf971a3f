"""A procedural, captioned toy world of 64 px images for tests, demos and tiny models.

Every scene is a background plus one or two distinct objects (or two to three identical
ones), each described by shape, colour, fill pattern, size and position. Captions name
every attribute, so a small text-to-image model trained on `world_batch` can learn each
one. A few looks (shape, colour and pattern together, `CONCEPT_LOOKS`) never occur in
ordinary scenes: they are the "new concepts" a customisation run has to learn
(`ConceptObject`), new bindings of parts the world base knows how to draw.

Rendering uses only integer and basic float arithmetic (no trig, no PIL rasteriser), so
pixels are identical across platforms and library versions. All randomness goes
through the `random.Random` passed in (or one built from a seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]

# ---------------------------------------------------------------- vocabulary

COLORS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
)
COLOR_RGB: Mapping[str, RGB] = MappingProxyType({
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
})
# The second colour of an ordinary (striped, dotted, checkered) pattern.
PATTERN_SHADES: Mapping[str, RGB] = MappingProxyType({
    "red": (120, 10, 10),
    "green": (10, 85, 25),
    "blue": (15, 30, 120),
    "yellow": (160, 130, 0),
    "purple": (70, 15, 95),
    "orange": (150, 70, 0),
    "white": (170, 170, 170),
    "black": (190, 190, 190),
})
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SHAPE_PLURALS: Mapping[str, str] = MappingProxyType({
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "diamond": "diamonds", "star": "stars", "cross": "crosses",
})
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = (
    "plain white", "plain gray", "plain black", "striped blue", "striped gray",
    "grid", "gradient",
)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
COUNTS: tuple[str, ...] = ("one", "two", "three")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# Looks (shape, colour, pattern) reserved for concepts: never drawn in ordinary scenes, in any
# size or position. Each is a new binding of a shape, a colour and a pattern the world has.
CONCEPT_LOOKS: frozenset[tuple[str, str, str]] = frozenset({
    ("star", "orange", "checkered"), ("circle", "green", "striped"), ("diamond", "purple", "dotted"),
    ("square", "red", "dotted"), ("triangle", "yellow", "checkered"),
})

# Object centres as fractions of the image side, and radii as fractions of it. At 64 px a
# large object is ~26 px across, a small one ~18 px; three small ones fit in a row.
POSITION_CENTERS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2),
    "bottom": (0.5, 0.8), "center": (0.5, 0.5),
})
SIZE_RADII: Mapping[str, float] = MappingProxyType({"small": 0.14, "large": 0.2})
POSITION_PHRASES: Mapping[str, str] = MappingProxyType({
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "center": "in the center",
})
# Where the first and second object of a relation stand.
RELATION_POSITIONS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "left of": ("left", "right"), "right of": ("right", "left"),
    "above": ("top", "bottom"), "below": ("bottom", "top"),
})
# Identical objects are always laid out in a row, so the count alone fixes the layout.
COUNT_POSITIONS: Mapping[int, tuple[str, ...]] = MappingProxyType({
    2: ("left", "right"), 3: ("left", "center", "right"),
})

_REF = 64  # patterns are defined on a 64 px reference grid (4 px stripes at 64 px)


@dataclass(frozen=True)
class _BackgroundSpec:
    kind: str  # plain | stripes | grid | gradient
    base: RGB
    accent: RGB
    clashes: frozenset[str]  # object colours that would not stand out


_BACKGROUND_SPECS: Mapping[str, _BackgroundSpec] = MappingProxyType({
    "plain white": _BackgroundSpec("plain", (245, 245, 245), (245, 245, 245), frozenset({"white"})),
    "plain gray": _BackgroundSpec("plain", (128, 128, 128), (128, 128, 128), frozenset()),
    "plain black": _BackgroundSpec("plain", (20, 20, 20), (20, 20, 20), frozenset({"black"})),
    "striped blue": _BackgroundSpec("stripes", (30, 70, 220), (170, 190, 240),
                                    frozenset({"blue", "white"})),
    "striped gray": _BackgroundSpec("stripes", (110, 110, 110), (170, 170, 170),
                                    frozenset({"white"})),
    "grid": _BackgroundSpec("grid", (235, 235, 235), (160, 160, 160), frozenset({"white"})),
    "gradient": _BackgroundSpec("gradient", (250, 215, 170), (170, 215, 250), frozenset({"white"})),
})

# Five-pointed star (inner radius 0.5), unit circle, point up, vertically centred.
# Written out rather than computed with cos/sin so the mask never depends on libm.
_STAR_UNIT: tuple[tuple[float, float], ...] = (
    (0.0, -0.9045), (0.2939, -0.309), (0.9511, -0.2135), (0.4755, 0.25),
    (0.5878, 0.9045), (0.0, 0.5955), (-0.5878, 0.9045), (-0.4755, 0.25),
    (-0.9511, -0.2135), (-0.2939, -0.309),
)


def _check(value: object, allowed: tuple[str, ...] | Mapping, field: str) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {tuple(allowed)}")


# ---------------------------------------------------------------- scene model

@dataclass(frozen=True)
class WorldObject:
    """One object of an ordinary scene; every field is a vocabulary word."""

    shape: str
    color: str
    pattern: str = "solid"
    size: str = "large"
    position: str = "center"

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "color")
        _check(self.pattern, PATTERNS, "pattern")
        _check(self.size, SIZES, "size")
        _check(self.position, POSITIONS, "position")

    @property
    def appearance(self) -> tuple[str, str, str, str]:
        """(shape, color, pattern, size): everything but where the object stands."""
        return (self.shape, self.color, self.pattern, self.size)

    def phrase(self, plural: bool = False) -> str:
        """'large red striped circle' (no article); 'solid' is the unnamed default."""
        words = [self.size, self.color]
        if self.pattern != "solid":
            words.append(self.pattern)
        words.append(SHAPE_PLURALS[self.shape] if plural else self.shape)
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """A background and 1-3 objects, optionally two of them in a spatial relation."""

    objects: tuple[WorldObject, ...]
    background: str
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        _check(self.background, BACKGROUNDS, "background")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"objects: need 1-3, got {len(self.objects)}")
        positions = tuple(o.position for o in self.objects)
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects share a position: {positions}")
        if self.relation is not None:
            _check(self.relation, RELATIONS, "relation")
            if positions != RELATION_POSITIONS[self.relation]:
                raise ValueError(
                    f"relation={self.relation!r} needs positions "
                    f"{RELATION_POSITIONS[self.relation]}, got {positions}")
        elif self.is_count and positions != COUNT_POSITIONS[len(self.objects)]:
            raise ValueError(f"identical objects must stand at "
                             f"{COUNT_POSITIONS[len(self.objects)]}, got {positions}")
        elif len(self.objects) == 3 and not self.is_count:
            raise ValueError("three objects must be identical (a count scene)")

    @property
    def is_count(self) -> bool:
        """True for 2-3 identical objects without a relation ('two red circles')."""
        return (self.relation is None and len(self.objects) > 1
                and len({o.appearance for o in self.objects}) == 1)

    def caption(self) -> str:
        """Natural caption naming every attribute of every object and the background."""
        first = self.objects[0]
        tail = f"on a {self.background} background"
        if self.is_count:
            return f"{COUNTS[len(self.objects) - 1]} {first.phrase(plural=True)} {tail}"
        if self.relation is not None:
            second = self.objects[1]
            return f"a {first.phrase()} {self.relation} a {second.phrase()} {tail}"
        parts = [f"a {o.phrase()} {POSITION_PHRASES[o.position]}" for o in self.objects]
        return f"{' and '.join(parts)}, {tail}"


# ---------------------------------------------------------------- geometry

def object_radius(size_word: str, image_size: int) -> float:
    """Radius in pixels of a `small` / `large` object in an image of `image_size` px."""
    _check(size_word, SIZES, "size")
    return SIZE_RADII[size_word] * image_size


def object_center(position: str, image_size: int) -> tuple[float, float]:
    """(x, y) pixel centre of an object standing at `position`."""
    _check(position, POSITIONS, "position")
    fx, fy = POSITION_CENTERS[position]
    return fx * image_size, fy * image_size


def object_box(obj: WorldObject, image_size: int) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) pixel box (x1, y1 exclusive) around `obj`."""
    cx, cy = object_center(obj.position, image_size)
    r = object_radius(obj.size, image_size)
    x0, y0 = max(0, int(cx - r)), max(0, int(cy - r))
    x1, y1 = min(image_size, int(cx + r) + 1), min(image_size, int(cy + r) + 1)
    return x0, y0, x1, y1


def usable_colors(background: str) -> tuple[str, ...]:
    """Object colours that stand out against `background`."""
    _check(background, BACKGROUNDS, "background")
    clashes = _BACKGROUND_SPECS[background].clashes
    return tuple(c for c in COLORS if c not in clashes)


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, each (H, W) float64."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(centres, centres)


def _ref_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer coordinates on the 64 px reference grid, each (H, W) int64."""
    ref = (np.arange(size, dtype=np.int64) * _REF) // size
    return np.meshgrid(ref, ref)


def _polygon_mask(u: np.ndarray, v: np.ndarray,
                  verts: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Even-odd point-in-polygon test for every (u, v); (H, W) bool."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(verts, verts[1:] + verts[:1]):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        inside ^= crosses & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
    return inside


_SHAPE_TESTS: Mapping[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = MappingProxyType({
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "triangle": lambda u, v: (v <= 0.7) & (np.abs(u) <= 0.95 * (v + 1.0) / 1.7),
    "cross": lambda u, v: (((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95))
                           | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))),
    "star": lambda u, v: _polygon_mask(u, v, _STAR_UNIT),
})


def shape_mask(shape: str, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """(H, W) bool mask of `shape` centred at `center` (px) with `radius` (px)."""
    _check(shape, SHAPES, "shape")
    xs, ys = _pixel_grid(size)
    return _SHAPE_TESTS[shape]((xs - center[0]) / radius, (ys - center[1]) / radius)


# ---------------------------------------------------------------- patterns

def _pattern_mask(pattern: str, size: int) -> np.ndarray:
    """(H, W) bool: True where the pattern shows its second colour."""
    x, y = _ref_grid(size)
    if pattern == "solid":
        return np.zeros(x.shape, dtype=bool)
    if pattern == "striped":  # vertical stripes, 4 px period
        return x % 4 >= 2
    if pattern == "dotted":  # 2x2 dots on a 6 px lattice
        return (x % 6 // 2 == 1) & (y % 6 // 2 == 1)
    if pattern == "checkered":  # 4 px squares
        return (x // 4 + y // 4) % 2 == 1
    raise ValueError(f"pattern={pattern!r} is not one of {PATTERNS}")


# ---------------------------------------------------------------- rendering

def render_background(background: str, size: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 array of a background."""
    _check(background, BACKGROUNDS, "background")
    spec = _BACKGROUND_SPECS[background]
    x, y = _ref_grid(size)
    base, accent = np.array(spec.base, np.uint8), np.array(spec.accent, np.uint8)
    if spec.kind == "stripes":  # horizontal, 8 px period: unlike vertical object stripes
        accent_at = y % 8 >= 4
    elif spec.kind == "grid":
        accent_at = (x % 8 == 0) | (y % 8 == 0)
    elif spec.kind == "gradient":  # top-to-bottom, base to accent
        rows = np.arange(size, dtype=np.int64)[:, None, None]
        lo, hi = np.array(spec.base, np.int64), np.array(spec.accent, np.int64)
        grad = lo + (hi - lo) * rows // max(1, size - 1)
        return np.broadcast_to(grad, (size, size, 3)).astype(np.uint8)
    else:
        accent_at = np.zeros((size, size), dtype=bool)
    return np.where(accent_at[..., None], accent, base).astype(np.uint8)


def _paint(canvas: np.ndarray, shape: str, pattern: str, colors: tuple[RGB, RGB],
           center: tuple[float, float], radius: float) -> None:
    """Draw one patterned shape onto `canvas` (H, W, 3) in place."""
    size = canvas.shape[0]
    mask = shape_mask(shape, center, radius, size)
    second = _pattern_mask(pattern, size)
    fill = np.where(second[..., None], np.array(colors[1], np.uint8),
                    np.array(colors[0], np.uint8))
    canvas[mask] = fill[mask]


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Render `scene` as a `size` x `size` RGB image."""
    if size < 16:
        raise ValueError(f"size={size} is too small to draw a scene (need >= 16)")
    canvas = render_background(scene.background, size)
    for obj in scene.objects:
        colors = (COLOR_RGB[obj.color], PATTERN_SHADES[obj.color])
        _paint(canvas, obj.shape, obj.pattern, colors,
               object_center(obj.position, size), object_radius(obj.size, size))
    return Image.fromarray(canvas, "RGB")


# ---------------------------------------------------------------- sampling

def _as_rng(rng_or_seed: random.Random | int) -> random.Random:
    if isinstance(rng_or_seed, random.Random):
        return rng_or_seed
    return random.Random(int(rng_or_seed))


def _sample_object(rng: random.Random, colors: tuple[str, ...], position: str,
                   size: str | None = None, reserved: frozenset = CONCEPT_LOOKS) -> WorldObject:
    """A random ordinary object: drawn again while its look is ``reserved``."""
    while True:
        obj = WorldObject(shape=rng.choice(SHAPES), color=rng.choice(colors),
                          pattern=rng.choice(PATTERNS), size=size or rng.choice(SIZES),
                          position=position)
        if (obj.shape, obj.color, obj.pattern) not in reserved:
            return obj


def _sample_pair(rng: random.Random, background: str, colors: tuple[str, ...],
                 relation_prob: float, reserved: frozenset) -> Scene:
    relation = rng.choice(RELATIONS) if rng.random() < relation_prob else None
    if relation is not None:
        positions = RELATION_POSITIONS[relation]
    else:
        positions = rng.choice((("left", "right"), ("right", "left"),
                                ("top", "bottom"), ("bottom", "top")))
    first = _sample_object(rng, colors, positions[0], reserved=reserved)
    second = _sample_object(rng, colors, positions[1], reserved=reserved)
    while second.appearance == first.appearance:
        second = _sample_object(rng, colors, positions[1], reserved=reserved)
    return Scene((first, second), background, relation)


def _sample_count(rng: random.Random, background: str, colors: tuple[str, ...], reserved: frozenset) -> Scene:
    n = rng.choice((2, 3))
    proto = _sample_object(rng, colors, "left", size="small" if n == 3 else None, reserved=reserved)
    objects = tuple(WorldObject(proto.shape, proto.color, proto.pattern, proto.size, pos)
                    for pos in COUNT_POSITIONS[n])
    return Scene(objects, background)


def sample_scene(rng_or_seed: random.Random | int, *, pair_prob: float = 0.35,
                 count_prob: float = 0.25, relation_prob: float = 0.5,
                 reserved: frozenset = CONCEPT_LOOKS) -> Scene:
    """Draw a random scene: one object, a distinct pair (with a relation with probability
    `relation_prob`) or a row of 2-3 identical objects. Colours always stand out from the
    background; no object has a `reserved` look (default: the concepts'; the committed world
    base was pretrained before there were any, on `reserved=frozenset()`). An int seeds a fresh
    `random.Random`; a `Random` is advanced in place."""
    if min(pair_prob, count_prob) < 0 or pair_prob + count_prob > 1:
        raise ValueError(f"pair_prob={pair_prob}, count_prob={count_prob}: need >= 0, sum <= 1")
    rng = _as_rng(rng_or_seed)
    background = rng.choice(BACKGROUNDS)
    colors = usable_colors(background)
    roll = rng.random()
    if roll < count_prob:
        return _sample_count(rng, background, colors, reserved)
    if roll < count_prob + pair_prob:
        return _sample_pair(rng, background, colors, relation_prob, reserved)
    return Scene((_sample_object(rng, colors, rng.choice(POSITIONS), reserved=reserved),), background)


def world_batch(seed: int, n: int, size: int = 64,
                reserved: frozenset = CONCEPT_LOOKS) -> list[tuple[Image.Image, str, Scene]]:
    """`n` deterministic (image, caption, scene) triples drawn from `seed` (`reserved`: see
    `sample_scene`)."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, reserved=reserved)
        out.append((render_scene(scene, size), scene.caption(), scene))
    return out


# ---------------------------------------------------------------- concepts

@dataclass(frozen=True)
class ConceptObject:
    """A specific object never seen in ordinary scenes: one of `CONCEPT_LOOKS` (an ordinary
    shape, its class word, in an ordinary colour and pattern that are never bound to it)."""

    name: str
    shape: str
    color: str
    pattern: str
    size: str = "large"

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "color")
        _check(self.pattern, PATTERNS, "pattern")
        _check(self.size, SIZES, "size")
        if self.look not in CONCEPT_LOOKS:
            raise ValueError(f"{self.name}: look {self.look} is not reserved for concepts "
                             f"(CONCEPT_LOOKS), so ordinary scenes draw it too")

    @property
    def look(self) -> tuple[str, str, str]:
        """(shape, color, pattern): what defines the concept."""
        return (self.shape, self.color, self.pattern)

    def as_object(self, position: str) -> WorldObject:
        """The concept as a world object standing at ``position`` (for captions and facts)."""
        return WorldObject(self.shape, self.color, self.pattern, self.size, position)


def concept_caption(concept: ConceptObject, background: str, position: str,
                    placeholder: str = "[v]") -> str:
    """'a [v] star on the left, on a grid background' (no placeholder when it is '')."""
    _check(background, BACKGROUNDS, "background")
    _check(position, POSITIONS, "position")
    subject = f"{placeholder} {concept.shape}" if placeholder else concept.shape
    return f"a {subject} {POSITION_PHRASES[position]}, on a {background} background"


def render_concept_scene(concept: ConceptObject, background: str, position: str,
                         size: int = 64,
                         rng: random.Random | int | None = None) -> Image.Image:
    """Render `concept` at `position` on `background`; `rng` (if given) shifts it by up to
    one reference pixel each way, so reference images of a concept are not pixel-aligned."""
    _check(background, BACKGROUNDS, "background")
    cx, cy = object_center(position, size)
    if rng is not None:
        gen = _as_rng(rng)
        step = size / _REF
        cx, cy = cx + gen.randint(-1, 1) * step, cy + gen.randint(-1, 1) * step
    canvas = render_background(background, size)
    _paint(canvas, concept.shape, concept.pattern,
           (COLOR_RGB[concept.color], PATTERN_SHADES[concept.color]), (cx, cy),
           object_radius(concept.size, size))
    return Image.fromarray(canvas, "RGB")
