"""The built-in data set's world ("shapes world"): scenes of 1-3 shapes, captions that describe
them and pictures of them.

Three pure layers, so each can be tested on its own:

- ``sample_scene(rng) -> Scene``: what is in the picture (shapes, colours, sizes, positions,
  background). Positions are fractions of the image side, (0, 0) top left.
- ``render_caption(scene, rng) -> str``: one caption from several templates and synonyms.
  Every object is mentioned as "<colour> <shape>" (colour word right before the shape word,
  optionally preceded by a size word); every stated relation is true with a margin of
  ``RELATION_MARGIN``; a relation phrase ending in "it"/"its" relates the mention right before
  it to the mention before that, any other relation phrase relates the mention before it to
  the mention after it.
- ``render_image(scene, image_size, rng) -> PIL.Image``: the picture, with nuisance variation
  (exact hues, texture, rotation, aspect, noise, blur) drawn from ``rng`` at render time.

The task is built for distillation headroom: attribute binding ("red circle left of blue
square" vs "blue circle left of red square") and relations decide between images, and
``perturb_scene`` makes minimal edits of a scene, so a bag of colour and shape words is not
enough. ``trainers.synth_shards`` writes the world as shards.
"""

from __future__ import annotations

import colorsys
import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (235, 215, 30),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"),
    "orange": ("orange",),
    "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "purple": ("purple", "violet"),
    "white": ("white", "ivory"),
    "black": ("black", "ebony"),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus"),
}
SIZES = ("small", "medium", "large")  # ascending: "larger than" compares this order
SIZE_SCALE = {"small": 0.16, "medium": 0.24, "large": 0.34}  # diameter / image side
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "speckled")
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain",),
    "gradient": ("gradient", "shaded"),
    "striped": ("striped",),
    "checkered": ("checkered", "checked"),
    "speckled": ("speckled", "mottled"),
}
TONES = ("dark", "light")
TONE_WORDS: dict[str, tuple[str, ...]] = {"dark": ("dark",), "light": ("light", "pale")}

RELATIONS = ("left_of", "right_of", "above", "below", "larger_than", "smaller_than")
# "X <phrase> Y": X is the subject.
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "larger_than": ("larger than", "bigger than"),
    "smaller_than": ("smaller than",),
}
# "Y, X <phrase>": X is the subject, "it"/"its" is Y.
RELATION_ITS_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("to its left", "on its left"),
    "right_of": ("to its right", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it"),
    "larger_than": ("larger than it", "bigger than it"),
    "smaller_than": ("smaller than it",),
}
# (row, column) of the 3x3 grid of thirds -> phrases for a lone object.
REGION_WORDS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left", "in the upper left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle", "near the top edge"),
    (0, 2): ("in the top right", "in the upper right corner", "at the top right"),
    (1, 0): ("on the left", "at the left side", "in the middle left"),
    (1, 1): ("in the center", "in the middle", "in the centre"),
    (1, 2): ("on the right", "at the right side", "in the middle right"),
    (2, 0): ("in the bottom left", "in the lower left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle", "near the bottom edge"),
    (2, 2): ("in the bottom right", "in the lower right corner", "at the bottom right"),
}

RELATION_MARGIN = 0.15  # centre offset (fraction of the side) for left/right/above/below
_MIN_AXIS_GAP = 0.22  # every pair is apart by this on some axis, so a spatial relation holds
_OBJECT_COUNT_P = (0.25, 0.45, 0.30)  # 1, 2, 3 objects
_SHARE_P = 0.35  # a second object reuses the first one's colour or shape: binding matters
_SIZE_JITTER = 0.08
_SUPERSAMPLE = 3

T = TypeVar("T")


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``x``, ``y``: centre as fractions of the image side (0 = left/top);
    ``scale``: diameter as a fraction of the side; ``rotation`` in degrees."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    scale: float
    rotation: float = 0.0

    @property
    def radius(self) -> float:
        return self.scale / 2

    @property
    def region(self) -> tuple[int, int]:
        """(row, column) of the centre in the 3x3 grid of thirds."""
        return min(int(self.y * 3), 2), min(int(self.x * 3), 2)


@dataclass(frozen=True)
class Scene:
    """What a caption can describe; pixels add nuisance on top (see ``render_image``)."""

    objects: tuple[SceneObject, ...]
    background: str
    tone: str

    def to_json(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "tone": self.tone,
            "objects": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(o).items()}
                for o in self.objects
            ],
        }


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------- scenes


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether "a <relation> b" is true (spatial relations need ``RELATION_MARGIN``)."""
    if relation == "left_of":
        return b.x - a.x >= RELATION_MARGIN
    if relation == "right_of":
        return a.x - b.x >= RELATION_MARGIN
    if relation == "above":
        return b.y - a.y >= RELATION_MARGIN
    if relation == "below":
        return a.y - b.y >= RELATION_MARGIN
    if relation == "larger_than":
        return SIZES.index(a.size) > SIZES.index(b.size)
    if relation == "smaller_than":
        return SIZES.index(a.size) < SIZES.index(b.size)
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def true_relations(scene: Scene) -> list[tuple[int, str, int]]:
    """Every (subject index, relation, reference index) that holds, in a fixed order."""
    objects = scene.objects
    return [
        (i, rel, j)
        for i in range(len(objects))
        for j in range(len(objects))
        if i != j
        for rel in RELATIONS
        if relation_holds(objects[i], rel, objects[j])
    ]


def _layout_ok(objects: Sequence[SceneObject]) -> bool:
    for o in objects:
        if not (o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius):
            return False
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            dx, dy = abs(a.x - b.x), abs(a.y - b.y)
            if max(dx, dy) < _MIN_AXIS_GAP or np.hypot(dx, dy) < 0.9 * (a.radius + b.radius):
                return False
            if (a.colour, a.shape) == (b.colour, b.shape):
                return False
    return True


def _sample_attributes(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    attrs: list[tuple[str, str, str]] = []
    while len(attrs) < count:
        shape, colour, size = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), _pick(rng, SIZES)
        if attrs and rng.random() < _SHARE_P:
            first = attrs[0]
            if rng.random() < 0.5:
                colour = first[1]
            else:
                shape = first[0]
        if all((shape, colour) != (s, c) for s, c, _ in attrs):
            attrs.append((shape, colour, size))
    return attrs


def _lone_position(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    # Sample the region first and keep clear of its borders, so the region phrase is
    # unambiguous to a reader of the picture.
    row, col = int(rng.integers(3)), int(rng.integers(3))
    lo_x, hi_x = max(col / 3 + 0.03, radius), min((col + 1) / 3 - 0.03, 1 - radius)
    lo_y, hi_y = max(row / 3 + 0.03, radius), min((row + 1) / 3 - 0.03, 1 - radius)
    return float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))


def _make_object(rng: np.random.Generator, shape: str, colour: str, size: str) -> SceneObject:
    scale = SIZE_SCALE[size] * float(rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER))
    return SceneObject(shape, colour, size, 0.0, 0.0, scale, float(rng.uniform(-12, 12)))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1-3 objects with distinct (colour, shape), inside the image, every pair
    apart enough on some axis that a left/right/above/below relation holds."""
    count = 1 + int(rng.choice(3, p=_OBJECT_COUNT_P))
    background, tone = _pick(rng, BACKGROUNDS), _pick(rng, TONES)
    while True:
        objects = [_make_object(rng, *a) for a in _sample_attributes(rng, count)]
        if count == 1:
            x, y = _lone_position(rng, objects[0].radius)
            return Scene((_replace(objects[0], x=x, y=y),), background, tone)
        for _ in range(200):
            placed = [
                _replace(
                    o, x=rng.uniform(o.radius, 1 - o.radius), y=rng.uniform(o.radius, 1 - o.radius)
                )
                for o in objects
            ]
            if _layout_ok(placed):
                return Scene(tuple(placed), background, tone)


def _replace(obj: SceneObject, **changes: Any) -> SceneObject:
    floats = {k: float(v) if isinstance(v, np.floating) else v for k, v in changes.items()}
    return dataclasses.replace(obj, **floats)


def perturb_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A minimal edit of ``scene`` that changes what a caption may say: swap two objects'
    colours, shapes or places, or change one object's colour, shape, size or region.
    Falls back to a fresh scene when no edit keeps the layout valid."""
    objects = list(scene.objects)
    for _ in range(20):
        edit = _pick(rng, ("swap_colour", "swap_shape", "swap_place", "colour", "shape", "size"))
        new = list(objects)
        i = int(rng.integers(len(objects)))
        j = (i + 1 + int(rng.integers(len(objects) - 1))) % len(objects) if len(objects) > 1 else i
        a, b = objects[i], objects[j]
        if edit == "swap_colour" and i != j:
            new[i], new[j] = _replace(a, colour=b.colour), _replace(b, colour=a.colour)
        elif edit == "swap_shape" and i != j:
            new[i], new[j] = _replace(a, shape=b.shape), _replace(b, shape=a.shape)
        elif edit == "swap_place" and i != j:
            new[i], new[j] = _replace(a, x=b.x, y=b.y), _replace(b, x=a.x, y=a.y)
        elif edit == "swap_place":  # a lone object moves to another region instead
            x, y = _lone_position(rng, a.radius)
            new[i] = _replace(a, x=x, y=y)
        elif edit == "colour":
            new[i] = _replace(a, colour=_pick(rng, tuple(c for c in COLOURS if c != a.colour)))
        elif edit == "shape":
            new[i] = _replace(a, shape=_pick(rng, tuple(s for s in SHAPES if s != a.shape)))
        else:
            size = _pick(rng, tuple(s for s in SIZES if s != a.size))
            new[i] = _replace(a, size=size, scale=SIZE_SCALE[size] * a.scale / SIZE_SCALE[a.size])
        if new != objects and _layout_ok(new) and _region_clear(new):
            return Scene(tuple(new), scene.background, scene.tone)
    return sample_scene(rng)


def _region_clear(objects: Sequence[SceneObject]) -> bool:
    """A lone object stays 0.03 clear of the thirds' borders (see ``_lone_position``)."""
    if len(objects) != 1:
        return True
    return all(min(abs(v - 1 / 3), abs(v - 2 / 3)) >= 0.03 for v in (objects[0].x, objects[0].y))


# --------------------------------------------------------------------------- captions


def _mention(obj: SceneObject, rng: np.random.Generator, det: str, with_size: bool) -> str:
    words = [_pick(rng, SIZE_WORDS[obj.size])] if with_size else []
    words += [_pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])]
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det, *words] if det else words)


def _background_phrase(scene: Scene, rng: np.random.Generator) -> str:
    words = [_pick(rng, BACKGROUND_WORDS[scene.background])]
    if rng.random() < 0.6:
        words.insert(0, _pick(rng, TONE_WORDS[scene.tone]))
    return f"on a {' '.join(words)} background"


def _relation_between(scene: Scene, rng: np.random.Generator, subject: int, reference: int) -> str:
    options = [
        r for r in RELATIONS if relation_holds(scene.objects[subject], r, scene.objects[reference])
    ]
    return _pick(rng, options)


def render_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption for ``scene`` (lower case, no final full stop); see the module docstring
    for the guarantees a reader can rely on."""
    size_p = 0.45

    def np_(index: int, det: str = "a") -> str:
        return _mention(scene.objects[index], rng, det, rng.random() < size_p)

    count = len(scene.objects)
    with_background = rng.random() < 0.3
    if count == 1:
        where = _pick(rng, REGION_WORDS[scene.objects[0].region])
        template = int(rng.integers(6))
        if template == 0:
            text = f"{np_(0)} {where}"
        elif template == 1:
            text = f"{np_(0, '')} {where}"
        elif template == 2:
            text = f"there is {np_(0)} {where}"
        elif template == 3:
            text = f"{where}, {np_(0)}"
        elif template == 4:
            return f"{np_(0)} {_background_phrase(scene, rng)}"
        else:
            text = f"an image of {np_(0)} {where}"
    elif count == 2:
        subject, ref = (0, 1) if rng.random() < 0.5 else (1, 0)
        rel = _relation_between(scene, rng, subject, ref)
        words, its = _pick(rng, RELATION_WORDS[rel]), _pick(rng, RELATION_ITS_WORDS[rel])
        template = int(rng.integers(6))
        if template == 0:
            text = f"{np_(subject)} {words} {np_(ref)}"
        elif template == 1:
            text = f"{np_(ref, '')}, {np_(subject, '')} {its}"
        elif template == 2:
            text = f"{np_(ref)} with {np_(subject)} {its}"
        elif template == 3:
            first, second = (subject, ref) if rng.random() < 0.5 else (ref, subject)
            text = (
                f"two shapes, {np_(first)} and {np_(second)}: "
                f"the {np_(subject, '')} is {words} the {np_(ref, '')}"
            )
        elif template == 4:
            text = f"there is {np_(subject)} {words} {np_(ref)}"
        else:
            text = f"an image of {np_(subject)} {words} {np_(ref)}"
    else:
        a, b, c = (int(i) for i in rng.permutation(3))
        rel_ab = _pick(rng, RELATION_WORDS[_relation_between(scene, rng, a, b)])
        template = int(rng.integers(5))
        if template in (0, 4):
            rel_bc = _pick(rng, RELATION_WORDS[_relation_between(scene, rng, b, c)])
            text = f"{np_(a)} {rel_ab} {np_(b)}, which is {rel_bc} {np_(c)}"
            if template == 4:
                text = f"there is {text}"
        elif template == 1:
            d = _pick(rng, (a, b))
            rel_cd = _pick(rng, RELATION_WORDS[_relation_between(scene, rng, c, d)])
            text = f"{np_(a)} {rel_ab} {np_(b)} and {np_(c)} {rel_cd} {np_(d, 'the')}"
        elif template == 2:
            p, q = _pick(rng, ((a, b), (b, c), (a, c)))
            rel_pq = _pick(rng, RELATION_WORDS[_relation_between(scene, rng, p, q)])
            order = [int(i) for i in rng.permutation(3)]
            listed = f"{np_(order[0])}, {np_(order[1])} and {np_(order[2])}"
            text = f"three shapes: {listed}; the {np_(p, '')} is {rel_pq} the {np_(q, '')}"
        else:
            its = _pick(rng, RELATION_ITS_WORDS[_relation_between(scene, rng, a, b)])
            d = _pick(rng, (a, b))
            rel_cd = _pick(rng, RELATION_WORDS[_relation_between(scene, rng, c, d)])
            text = f"{np_(b, '')}, {np_(a, '')} {its}, and {np_(c)} {rel_cd} {np_(d, 'the')}"
    if with_background:
        text = f"{text} {_background_phrase(scene, rng)}"
    return text


def render_captions(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` different captions of ``scene`` (like the 5 references of Flickr30K)."""
    captions: list[str] = []
    for _ in range(100 * count):
        caption = render_caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    raise RuntimeError(f"could not compose {count} different captions for {scene}")


# --------------------------------------------------------------------------- images


def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` with radius ~1 around the origin, y pointing down, (k, 2)."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "square":
        s = 0.8
        return np.array([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles) + 0.15], axis=1)
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":
        w = 0.3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w)]
        pts += [(w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        return 0.9 * np.array(pts)
    if shape == "diamond":
        return np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)])
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(scene: Scene, side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) uint8: a low-saturation base colour with a texture."""
    value = rng.uniform(0.28, 0.42) if scene.tone == "dark" else rng.uniform(0.62, 0.8)
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), value)) * 255
    axis = (np.arange(side, dtype=np.float32) + 0.5) / side
    xx, yy = axis[None, :], axis[:, None]
    if scene.background == "plain":
        shade = np.zeros((1, 1), np.float32)
    elif scene.background == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        shade = 0.5 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    elif scene.background == "striped":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.1, 0.2)
        phase = np.floor((xx * np.cos(angle) + yy * np.sin(angle)) / period)
        shade = np.where(phase % 2 == 0, 0.15, -0.15)
    elif scene.background == "checkered":
        cell = rng.uniform(0.1, 0.2)
        shade = np.where((np.floor(xx / cell) + np.floor(yy / cell)) % 2 == 0, 0.14, -0.14)
    else:  # speckled: blotches of low-resolution noise
        coarse = rng.normal(0, 0.18, (8, 8)).astype(np.float32)
        shade = np.asarray(
            Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BILINEAR)
        )
    pixels = base.astype(np.float32) * (1 + np.broadcast_to(shade, (side, side))[..., None])
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_image(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB ``image_size`` x ``image_size`` picture of ``scene``: drawn at 3x and
    box-filtered down, then brightness/contrast jitter, optional blur and Gaussian noise."""
    side = image_size * _SUPERSAMPLE
    # The texture is made at the output size: nearest-upscaled then box-filtered back down it
    # comes out unchanged, and numpy work stays 9x smaller than at the drawing size.
    background = Image.fromarray(_background(scene, image_size, rng))
    canvas = background.resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-18, 19, 3), 0, 255)
        aspect = rng.uniform(0.9, 1.1)
        theta = np.deg2rad(obj.rotation)
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        points = _unit_polygon(obj.shape) * np.array([aspect, 1 / aspect]) @ rotation.T
        points = points * obj.radius * side + np.array([obj.x, obj.y]) * side
        outline = None
        if rng.random() < 0.3:
            outline = tuple(int(v) for v in colour * 0.6)
        draw.polygon(
            [tuple(p) for p in points.tolist()],
            fill=tuple(int(v) for v in colour),
            outline=outline,
            width=_SUPERSAMPLE,
        )
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (pixels - 128) * rng.uniform(0.9, 1.1) + 128 + rng.uniform(-10, 10)
    pixels += rng.normal(0, rng.uniform(2, 7), pixels.shape)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
