"""Procedural "shapes" scenes with captions and exact per-object masks.

These scenes train the bundled model (``tools/train_shapes.py``) and give every
edit an exact ground truth: a :class:`Scene` is plain data, so the same scene
redrawn with one attribute changed is the ideal result of that edit
(ShapesBench, :mod:`editor.compare`).

Caption grammar (the first-named object lies in the left half, the second in
the right half)::

    a red circle on a white background
    a red circle and a blue square on a gray background
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
}
#: Hue (degrees) of each named color, used by :func:`classify_color`.
HUES: dict[str, float] = {"red": 0.0, "yellow": 52.0, "green": 128.0, "blue": 226.0}
BACKGROUNDS: dict[str, int] = {"white": 238, "gray": 128, "black": 22}


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, color name, centre (x, y) and radius in pixels."""

    shape: str
    color: str
    center: tuple[float, float]
    radius: float
    tint: tuple[int, int, int] = (0, 0, 0)  # small per-object colour jitter

    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: one or two objects on a textured achromatic background."""

    objects: tuple[SceneObject, ...]
    background: str = "white"
    size: int = 64
    texture_seed: int = 0

    def caption(self) -> str:
        things = " and ".join(f"a {o.phrase()}" for o in self.objects)
        return f"{things} on a {self.background} background"

    def with_object(self, index: int, **changes) -> Scene:
        """The same scene with object ``index`` changed (an edit's ground truth)."""
        objs = list(self.objects)
        objs[index] = dataclasses.replace(objs[index], **changes)
        return dataclasses.replace(self, objects=tuple(objs))

    def render(self) -> tuple[Image.Image, list[np.ndarray]]:
        """Draw the scene: an RGB image and one float mask in [0, 1] per object."""
        return render(self)


@dataclass
class SampledScene:
    scene: Scene
    image: Image.Image
    caption: str
    masks: list[np.ndarray] = field(default_factory=list)


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def shape_sdf(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Signed distance (pixels) of an ideal shape of 'radius' ``r`` at (cx, cy)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        h = r * 0.86
        return np.maximum(np.abs(dx), np.abs(dy)) - h
    if shape == "triangle":  # equilateral, pointing up, circumradius R
        big_r = r * 1.2
        half = big_r / 2.0
        n = np.array([[0.0, 1.0], [np.sqrt(3) / 2, -0.5], [-np.sqrt(3) / 2, -0.5]], np.float32)
        # y axis points down in images: flip dy so the apex is on top
        d = [nx * dx + ny * (-dy) for nx, ny in n]
        # edges at distance half from the centre, outward normals opposite to vertices
        return np.maximum.reduce([-di - half for di in d])
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(scene: Scene) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    s = scene.size
    base = float(BACKGROUNDS[scene.background])
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) / s
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) * rng.uniform(8, 18)
    tex = np.zeros((s, s), np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(1, 4, size=2)
        ph = rng.uniform(0, 2 * np.pi)
        tex += np.sin(2 * np.pi * (fx * xs + fy * ys) + ph) * rng.uniform(1.5, 3.5)
    sign = -1.0 if base > 200 else 1.0  # keep white below 255 and black above 0
    img = base + sign * np.abs(grad) + tex
    return np.repeat(np.clip(img, 0, 255)[..., None], 3, axis=2)


def render(scene: Scene) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw ``scene``; later objects are drawn over earlier ones."""
    img = _background(scene)
    masks = []
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown color {obj.color!r}; expected one of {tuple(COLORS)}")
        cov = _coverage(shape_sdf(obj.shape, *obj.center, obj.radius, scene.size))
        rgb = np.clip(np.array(COLORS[obj.color], np.float32) + np.array(obj.tint), 0, 255)
        img = img * (1 - cov[..., None]) + rgb * cov[..., None]
        masks.append(cov)
    for i in range(len(masks) - 1):  # occlusion: later objects cover earlier ones
        for later in masks[i + 1 :]:
            masks[i] = masks[i] * (1 - later)
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB"), masks


def random_scene(
    rng: np.random.Generator,
    *,
    size: int = 64,
    n_objects: int | None = None,
    colors: tuple[str, ...] | None = None,
    shapes: tuple[str, ...] | None = None,
    background: str | None = None,
) -> Scene:
    """Sample a scene. One object goes anywhere; with two, the first is in the
    left half and the second in the right half (as the caption says)."""
    n = int(n_objects if n_objects is not None else rng.integers(1, 3))
    if n not in (1, 2):
        raise ValueError("scenes have one or two objects")
    cols = list(colors) if colors else [str(c) for c in rng.choice(list(COLORS), n, replace=False)]
    shps = list(shapes) if shapes else [str(s) for s in rng.choice(SHAPES, n)]
    objs = []
    for i in range(n):
        if n == 1:
            r = rng.uniform(0.14, 0.24) * size
            lo_x, hi_x = r + 2, size - r - 2
        else:
            r = rng.uniform(0.11, 0.18) * size
            half = size / 2
            lo_x, hi_x = (r + 2, half - r - 1) if i == 0 else (half + r + 1, size - r - 2)
        cx = rng.uniform(lo_x, max(lo_x, hi_x))
        cy = rng.uniform(r + 2, size - r - 2)
        tint = tuple(int(v) for v in rng.integers(-12, 13, size=3))
        objs.append(SceneObject(shps[i], cols[i], (float(cx), float(cy)), float(r), tint))
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    return Scene(tuple(objs), bg, size, int(rng.integers(0, 2**31 - 1)))


def sample(seed: int, **kwargs) -> SampledScene:
    """A seeded scene with its image, caption and masks."""
    scene = random_scene(np.random.default_rng(seed), **kwargs)
    image, masks = scene.render()
    return SampledScene(scene, image, scene.caption(), masks)


# --- checking generated images against a caption ------------------------------------------


def _hsv(img: np.ndarray, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value of an RGB array, computed in ``dtype``."""
    arr = np.asarray(img).astype(dtype) / 255.0
    mx, mn = arr.max(-1), arr.min(-1)
    delta = mx - mn
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    safe = np.where(delta > 1e-6, delta, 1.0)
    h = np.where(
        mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    sat = np.where(mx > 1e-6, delta / np.maximum(mx, 1e-6), 0.0)
    return h * 60.0, sat, mx


def object_mask(image: Image.Image | np.ndarray, sat_min: float = 0.45) -> np.ndarray:
    """Pixels that belong to some object: saturated colour on an achromatic background."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    _, s, v = _hsv(arr)
    return (s > sat_min) & (v > 0.25)


def classify_color(image: Image.Image | np.ndarray, mask: np.ndarray) -> str | None:
    """Name of the colour whose hue is nearest the circular mean hue under ``mask``."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, s, v = _hsv(arr)
    sel = mask & (s > 0.45) & (v > 0.25)
    if sel.sum() < 4:
        return None
    ang = np.deg2rad(h[sel])
    mean = np.rad2deg(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean())) % 360
    dist = {c: min(abs(mean - hue), 360 - abs(mean - hue)) for c, hue in HUES.items()}
    return min(dist, key=dist.get)


def classify_shape(mask: np.ndarray) -> str | None:
    """Shape whose ideal outline, fitted to the mask's bounding box, overlaps it best (IoU)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 6:
        return None
    size = mask.shape[0]
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    best, best_iou = None, -1.0
    for shape in SHAPES:
        # ideal shape with the same bounding box: fit centre and radius to the box
        if shape == "triangle":
            big_r = (x1 - x0) / np.sqrt(3)
            r = big_r / 1.2
            cx, cy = (x0 + x1) / 2, y0 + big_r
        else:
            r = max(x1 - x0, y1 - y0) / 2 / (0.86 if shape == "square" else 1.0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        ideal = _coverage(shape_sdf(shape, cx, cy, r, size)) > 0.5
        inter = (ideal & mask).sum()
        iou = inter / max((ideal | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, largest first."""
    labels = np.zeros(mask.shape, np.int32)
    comps = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        lab = len(comps) + 1
        stack, pix = [(y0, x0)], []
        labels[y0, x0] = lab
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = lab
                    stack.append((ny, nx))
        comp = np.zeros_like(mask)
        comp[tuple(np.array(pix).T)] = True
        comps.append(comp)
    return sorted(comps, key=lambda c: -c.sum())


@dataclass
class Check:
    """What a checker read from an image, against what the caption asked for."""

    colors: list[str | None]
    shapes: list[str | None]
    color_ok: bool
    shape_ok: bool


def check_image(image: Image.Image, scene: Scene) -> Check:
    """Read colours and shapes from ``image`` and compare them with ``scene``.

    One object: the largest saturated component. Two objects: the largest
    component in the left half and in the right half, so sides count too.
    """
    arr = np.asarray(image.convert("RGB"))
    mask = object_mask(arr)
    size = arr.shape[0]
    if len(scene.objects) == 1:
        comps = _components(mask)
        regions = [comps[0] if comps else np.zeros_like(mask)]
    else:
        regions = []
        for side in (0, 1):
            m = mask.copy()
            if side == 0:
                m[:, size // 2 :] = False
            else:
                m[:, : size // 2] = False
            comps = _components(m)
            regions.append(comps[0] if comps else np.zeros_like(mask))
    colors = [classify_color(arr, r) for r in regions]
    shapes = [classify_shape(r) for r in regions]
    want_c = [o.color for o in scene.objects]
    want_s = [o.shape for o in scene.objects]
    return Check(colors, shapes, colors == want_c, shapes == want_s)
