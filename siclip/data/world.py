"""The embedded image–caption world: procedural scenes of 1–3 objects, rendered and described.

Everything is a pure function of a seed and an integer id: ``sample_scene(seed, scene_id)`` draws a
scene from ``numpy.random.default_rng([seed, scene_id])`` (PCG64, the same stream on every platform) and
``render_scene`` draws it with integer-exact arithmetic only (no trigonometry), so the same seed gives
the same bytes on any machine. Objects have a shape, a colour, a size and a position on a 3×3 grid;
backgrounds are plain, gradients, stripes or noise, always muted so that every object colour stands out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "heart", "hexagon", "crescent")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 190),
    "pink": (250, 130, 200),
    "cyan": (40, 220, 230),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
# Radius as a fraction of the image side. Cells are 1/3 wide and centres jitter by at most 0.025, so
# two large objects in neighbouring cells stay apart (2·0.14 ≤ 1/3 − 0.05) and inside the frame.
SIZES = {"small": 0.08, "medium": 0.11, "large": 0.14}
_CENTRE_JITTER = 0.025
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS = ("plain", "gradient", "stripes", "noise")
_JITTER = 18  # per-channel colour jitter, so no two objects are painted alike


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    position: str
    cx: float  # centre, as fractions of the image side
    cy: float
    rgb: tuple[int, int, int]  # the jittered paint


@dataclass(frozen=True)
class Scene:
    scene_id: int
    objects: tuple[WorldObject, ...]
    background: str
    background_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_param: int  # stripe period or gradient direction
    noise_seed: int

    @property
    def label(self) -> str:
        """The zero-shot class of a one-object scene, e.g. ``"red circle"``."""
        first = self.objects[0]
        return f"{first.colour} {first.shape}"


class _Uniforms:
    """Hands out uniforms from one pre-drawn vector: one generator call per scene instead of dozens."""

    def __init__(self, rng: np.random.Generator, count: int = 64) -> None:
        self.values, self.next = rng.random(count).tolist(), 0

    def __call__(self) -> float:
        value = self.values[self.next]
        self.next += 1
        return value

    def integer(self, low: int, high: int) -> int:
        """Uniform in ``[low, high)``."""
        return low + int(self() * (high - low))

    def pick(self, options):
        return options[int(self() * len(options))]


def _clamp(value: float, low: int, high: int) -> int:
    return int(min(max(value, low), high))


def _muted(u: _Uniforms) -> tuple[int, int, int]:
    base = u.integer(70, 170)
    return tuple(_clamp(base + u.integer(-25, 26), 40, 200) for _ in range(3))


_COLOUR_NAMES = tuple(COLOURS)
_SIZE_NAMES = tuple(SIZES)


def sample_scene(
    seed: int, scene_id: int, *, num_objects: int | None = None, max_objects: int = 3, label: tuple[str, str] | None = None
) -> Scene:
    """Draw scene ``scene_id`` of the world ``seed``.

    ``label=(colour, shape)`` forces a one-object scene of that class (zero-shot sets); otherwise
    ``num_objects`` (or 1..``max_objects`` at random) objects are placed in distinct grid cells.
    """
    rng = np.random.default_rng([seed, scene_id])
    u = _Uniforms(rng)
    count = 1 if label is not None else (num_objects or u.integer(1, max_objects + 1))
    cells = sorted(range(len(POSITIONS)), key=lambda _: u())[:count]  # a random subset, in random order
    objects = []
    for cell in cells:
        colour = label[0] if label is not None else u.pick(_COLOUR_NAMES)
        shape = label[1] if label is not None else u.pick(SHAPES)
        size = u.pick(_SIZE_NAMES)
        row, col = divmod(cell, 3)
        cx = (col + 0.5) / 3 + (2 * u() - 1) * _CENTRE_JITTER
        cy = (row + 0.5) / 3 + (2 * u() - 1) * _CENTRE_JITTER
        rgb = tuple(_clamp(c + u.integer(-_JITTER, _JITTER + 1), 0, 255) for c in COLOURS[colour])
        objects.append(WorldObject(shape, colour, size, POSITIONS[cell], cx, cy, rgb))
    background = u.pick(BACKGROUNDS)
    return Scene(
        scene_id=scene_id,
        objects=tuple(objects),
        background=background,
        background_rgb=(_muted(u), _muted(u)),
        background_param=u.integer(4, 12) if background == "stripes" else u.integer(0, 4),
        noise_seed=int(rng.integers(0, 2**31)),
    )


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test of ``shape`` at unit radius; ``x``, ``y`` are coordinates relative to its centre."""
    ax, ay = np.abs(x), np.abs(y)
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(ax, ay) <= 0.8
    if shape == "triangle":  # apex up: y grows downwards in images
        return (y <= 0.7) & (2.0 * ax <= y + 1.0)
    if shape == "diamond":
        return ax + ay <= 1.0
    if shape == "cross":
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "star":  # a hexagram: the union of an upward and a downward triangle
        up = (y <= 0.5) & (1.732 * ax <= y + 1.0)
        down = (y >= -0.5) & (1.732 * ax <= 1.0 - y)
        return up | down
    if shape == "heart":  # (x² + y² − 1)³ − x²·y³ ≤ 0, flipped so the point is at the bottom
        yy = -y * 1.1 + 0.15
        xx = x * 1.1
        return (xx * xx + yy * yy - 1.0) ** 3 - xx * xx * yy**3 <= 0.0
    if shape == "hexagon":
        return (ay <= 0.866) & (0.866 * ax + 0.5 * ay <= 0.866)
    if shape == "crescent":
        return (r2 <= 1.0) & ((x - 0.45) ** 2 + (y + 0.1) ** 2 >= 0.64)
    raise ValueError(f"unknown shape {shape!r}; the world has {SHAPES}")


def render_scene(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a ``(size, size, 3)`` uint8 array."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    lo, hi = (np.array(c, dtype=np.float64) for c in scene.background_rgb)
    if scene.background == "plain":
        image = np.broadcast_to(lo, (size, size, 3)).copy()
    elif scene.background == "gradient":
        t = (x, y, (x + y) / 2, (x + 1 - y) / 2)[scene.background_param]
        image = lo + (hi - lo) * t[..., None]
    elif scene.background == "stripes":  # vertical or horizontal bands of `background_param` pixels
        band = ((np.arange(size) // scene.background_param) % 2).astype(bool)
        band = band[None, :] if scene.noise_seed % 2 else band[:, None]
        image = np.where(band[..., None], hi, lo) * np.ones((size, size, 1))
    else:  # noise: integer noise from its own PCG64 stream
        noise = np.random.default_rng(scene.noise_seed).integers(-30, 31, size=(size, size, 1))
        image = lo + noise
    for obj in scene.objects:
        radius = SIZES[obj.size]
        mask = _shape_mask(obj.shape, (x - obj.cx) / radius, (y - obj.cy) / radius)
        image[mask] = obj.rgb
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
