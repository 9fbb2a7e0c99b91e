"""The testbed's world: one object per image, rendered procedurally, and a caption grammar.

Every scene is four attribute values (shape, color, style, background) plus jitter
(position, size, rotation), all drawn from a seed, so an image can always be checked
against the scene that made it. Captions name the values through wordings: a canonical
word, training synonyms, and held-out wordings that never appear in training captions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

ATTRIBUTES = ("shape", "color", "style", "background")

VALUES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "style": ("solid", "striped", "outlined"),
    "background": ("black", "white", "grass", "sky"),
}

RGB = {
    "red": (220, 30, 30),
    "green": (40, 210, 60),
    "blue": (30, 60, 235),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
}

# Wordings: the first is canonical; "train" wordings appear in training captions;
# "heldout" wordings never do and measure generalisation through the text encoder.
WORDINGS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "shape": {
        "circle": {"train": ("circle", "disc", "round shape", "dot"), "heldout": ("ball", "round object")},
        "square": {"train": ("square", "box", "block", "square shape"), "heldout": ("tile", "four-sided shape")},
        "triangle": {"train": ("triangle", "triangular shape", "wedge", "three-cornered shape"),
                     "heldout": ("pyramid", "three-sided shape")},
        "star": {"train": ("star", "five-pointed star", "starburst", "star shape"),
                 "heldout": ("pentagram", "starfish shape")},
        "cross": {"train": ("cross", "plus sign", "plus", "cross shape"),
                  "heldout": ("crucifix", "addition symbol")},
    },
    "color": {
        "red": {"train": ("red", "crimson", "scarlet", "cherry red"), "heldout": ("ruby", "blood-colored")},
        "green": {"train": ("green", "emerald", "lime", "leaf green"), "heldout": ("jade", "grass-colored")},
        "blue": {"train": ("blue", "navy", "azure", "royal blue"), "heldout": ("cobalt", "sapphire")},
        "yellow": {"train": ("yellow", "golden", "lemon", "canary yellow"), "heldout": ("banana-colored", "mustard")},
        "purple": {"train": ("purple", "violet", "lavender", "plum"), "heldout": ("lilac", "mauve")},
        "orange": {"train": ("orange", "tangerine", "amber", "carrot orange"),
                   "heldout": ("pumpkin-colored", "apricot")},
    },
    "style": {
        "solid": {"train": ("solid", "filled", "plain", "solid-colored"), "heldout": ("opaque", "fully shaded")},
        "striped": {"train": ("striped", "stripy", "banded", "with stripes"), "heldout": ("streaked", "barred")},
        "outlined": {"train": ("outlined", "hollow", "line-drawn", "unfilled"), "heldout": ("empty", "wireframe")},
    },
    "background": {
        "black": {"train": ("on a black background", "on black", "on a dark background", "at night"),
                  "heldout": ("in darkness", "on a pitch-dark backdrop")},
        "white": {"train": ("on a white background", "on white", "on a blank background", "on paper"),
                  "heldout": ("on a snowy backdrop", "on an ivory backdrop")},
        "grass": {"train": ("on a grass background", "on grass", "on a lawn", "in a meadow"),
                  "heldout": ("in a field", "on a pasture")},
        "sky": {"train": ("on a sky background", "in the sky", "against the blue sky", "among clouds"),
                "heldout": ("in the air", "up in the heavens")},
    },
}

# Style wordings that read as postfix phrases ("with stripes") go after the noun.
_POSTFIX_STYLES = {"with stripes"}

TEMPLATES = (
    "a {style} {color} {shape} {background}",
    "a photo of a {style} {color} {shape} {background}",
    "an image of a {color} {shape}, {style}, {background}",
    "{background}, a {style} {color} {shape}",
    "a picture showing a {color} {style} {shape} {background}",
)

WORDING_KINDS = ("canonical", "synonym", "heldout")


def canonical(attribute: str, value: str) -> str:
    """The canonical wording of a value: the first training wording."""
    return WORDINGS[attribute][value]["train"][0]


def wordings(attribute: str, value: str, kind: str) -> tuple[str, ...]:
    """Wordings of one kind: 'canonical' (one), 'synonym' (training, not canonical), 'heldout'."""
    entry = WORDINGS[attribute][value]
    if kind == "canonical":
        return entry["train"][:1]
    if kind == "synonym":
        return entry["train"][1:]
    if kind == "heldout":
        return entry["heldout"]
    raise ValueError(f"unknown wording kind {kind!r}; use one of {', '.join(WORDING_KINDS)}")


def heldout_wordings() -> set[str]:
    return {w for attr in WORDINGS.values() for entry in attr.values() for w in entry["heldout"]}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    style: str
    background: str
    cx: float = 0.5  # centre, as a fraction of the image side
    cy: float = 0.5
    size: float = 0.32  # circumradius, as a fraction of the image side
    angle: float = 0.0  # degrees

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    def labels(self) -> dict[str, int]:
        return {a: VALUES[a].index(self.value(a)) for a in ATTRIBUTES}


# Jitter ranges. Wider ones (centre 0.38-0.62, size 0.26-0.36, angle +-25 degrees) blurred the shapes
# the denoiser learned: the average over orientations and sizes of a star is a blob.
JITTER = {"center": (0.44, 0.56), "size": (0.28, 0.34), "angle": (-10.0, 10.0)}


def allowed_values(attribute: str, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The values of an attribute that scenes may show when the values in exclude are left out."""
    pool = tuple(v for v in VALUES[attribute] if v not in exclude)
    if not pool:
        raise ValueError(f"excluding {', '.join(exclude)} leaves no {attribute} to draw")
    return pool


def random_scene(rng: np.random.Generator, exclude: tuple[str, ...] = (), **fixed: str) -> Scene:
    """A scene with uniformly drawn values (any attribute may be fixed) and jitter. Values in exclude are
    never drawn; with nothing excluded the draws are exactly those of the shipped training data."""
    values = {}
    for a in ATTRIBUTES:
        pool = allowed_values(a, exclude)
        values[a] = fixed.get(a) or pool[rng.integers(len(pool))]
    return Scene(
        **values,
        cx=float(rng.uniform(*JITTER["center"])),
        cy=float(rng.uniform(*JITTER["center"])),
        size=float(rng.uniform(*JITTER["size"])),
        angle=float(rng.uniform(*JITTER["angle"])),
    )


def _outline(scene: Scene, side: float) -> list[tuple[float, float]]:
    """Polygon vertices of the shape, in pixels of a canvas of the given side."""
    cx, cy, r = scene.cx * side, scene.cy * side, scene.size * side
    rot = math.radians(scene.angle)

    def polar(radius: float, theta: float) -> tuple[float, float]:
        return (cx + radius * math.cos(theta + rot), cy + radius * math.sin(theta + rot))

    if scene.shape == "circle":
        return [polar(r * 0.9, 2 * math.pi * k / 48) for k in range(48)]
    if scene.shape == "square":
        return [polar(r * 0.95, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    if scene.shape == "triangle":
        return [polar(r * 1.05, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    if scene.shape == "star":
        return [polar(r * (1.08 if k % 2 == 0 else 0.45), -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    if scene.shape == "cross":
        a, b = r * 0.95, r * 0.33
        pts = [(b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a),
               (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b), (-b, -a)]
        return [polar(math.hypot(x, y), math.atan2(y, x)) for x, y in pts]
    raise ValueError(f"unknown shape {scene.shape!r}")


def _background(name: str, side: int) -> Image.Image:
    y = np.linspace(0.0, 1.0, side)[:, None, None]
    if name == "black":
        arr = np.full((side, side, 3), (12, 12, 12), dtype=np.float64)
    elif name == "white":
        arr = np.full((side, side, 3), (242, 242, 242), dtype=np.float64)
    elif name == "sky":
        top, bottom = np.array([60, 110, 210.0]), np.array([170, 215, 250.0])
        arr = np.broadcast_to(top + (bottom - top) * y, (side, side, 3)).copy()
    elif name == "grass":
        sky, ground = np.array([200, 225, 245.0]), np.array([30, 95, 25.0])
        arr = np.where(y < 0.45, sky, ground) * np.ones((side, side, 3))
    else:
        raise ValueError(f"unknown background {name!r}")
    return Image.fromarray(arr.astype(np.uint8))


def render(scene: Scene, resolution: int = 16, supersample: int = 4) -> np.ndarray:
    """Render a scene as an (H, W, 3) uint8 array; deterministic for a given scene."""
    side = resolution * supersample
    canvas = _background(scene.background, side)
    poly = _outline(scene, side)
    color = RGB[scene.color]
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if scene.style == "outlined":
        width = max(1, round(side * 0.09))
        draw.line(poly + poly[:1], fill=255, width=width, joint="curve")
        canvas.paste(Image.new("RGB", (side, side), color), (0, 0), mask)
    else:
        draw.polygon(poly, fill=255)
        fill = Image.new("RGB", (side, side), color)
        if scene.style == "striped":
            # Bands one eighth of the image wide, perpendicular to the object's own orientation.
            period = side / 4.0
            yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
            rot = math.radians(scene.angle)
            u = xx * math.cos(rot) + yy * math.sin(rot)
            dark = (np.floor(u / (period / 2)) % 2).astype(bool)
            arr = np.array(fill, dtype=np.float64)
            arr[dark] = _stripe_rgb(scene)
            fill = Image.fromarray(arr.astype(np.uint8))
        canvas.paste(fill, (0, 0), mask)
    if supersample > 1:
        canvas = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.uint8)


def _stripe_rgb(scene: Scene) -> tuple[int, int, int]:
    """The second colour of striped objects: white on dark backgrounds, near-black on light ones."""
    return (15, 15, 15) if scene.background in ("white", "sky") else (245, 245, 245)


def caption(scene: Scene, rng: np.random.Generator, kind: str = "train", drop_prob: float = 0.0) -> str:
    """A caption for the scene. kind 'train' draws any training wording; 'canonical', 'synonym'
    and 'heldout' draw wordings of that kind for every attribute. Attributes other than the shape
    are dropped with probability drop_prob each."""
    words = {}
    for attr in ATTRIBUTES:
        if attr != "shape" and rng.random() < drop_prob:
            words[attr] = ""
            continue
        entry = WORDINGS[attr][scene.value(attr)]
        pool = entry["train"] if kind == "train" else wordings(attr, scene.value(attr), kind)
        words[attr] = pool[rng.integers(len(pool))]
    template = TEMPLATES[0] if kind == "canonical" else TEMPLATES[rng.integers(len(TEMPLATES))]
    return fill_template(template, words)


def fill_template(template: str, words: dict[str, str]) -> str:
    words = dict(words)
    if words.get("style") in _POSTFIX_STYLES:
        words["shape"] = f"{words['shape']} {words['style']}"
        words["style"] = ""
    text = template.format(**words)
    text = " ".join(text.replace(" ,", ",").split()).replace(",,", ",")  # an empty word between commas
    return text.replace(", ,", ",").strip(" ,")
