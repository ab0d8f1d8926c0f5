"""Procedural "shapes" scenes with captions and exact per-object masks.

These scenes train the bundled model (``tools/train_shapes.py``) and give every
edit an exact ground truth: a :class:`Scene` is plain data, so the same scene
redrawn with one attribute changed is the ideal result of that edit
(ShapesBench, :mod:`editor.compare`).

Caption grammar (the first-named object lies in the left half, the second in
the right half)::

    a red circle on a white background
    a red circle and a blue square on a gray background

Opt-in graded attribute (``random_scene(..., graded=p)``): each object gets a size
word (:data:`GRADES`) with probability ``p``, and its radius is drawn from that
word's range (:func:`radius_range`); the ground truth is ``SceneObject.grade`` and
``SceneObject.radius``, and :func:`object_sizes` / :func:`equivalent_radius` read the
graded quantity back from an image::

    a small red circle on a white background
    a big red circle and a blue square on a gray background

With ``graded=0`` (the default) nothing of this is drawn: every seed gives the same
scene, image and caption as before the attribute existed.
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
#: Size words of the optional graded attribute, smallest first.
GRADES: tuple[str, ...] = ("small", "big")
#: Radius range (fraction of the image side) by object count and grade word; ``None`` is an
#: object without a size word (the generator's ranges since the first version).
RADIUS_RANGES: dict[int, dict[str | None, tuple[float, float]]] = {
    1: {"small": (0.09, 0.13), None: (0.14, 0.24), "big": (0.25, 0.29)},
    2: {"small": (0.07, 0.10), None: (0.11, 0.18), "big": (0.19, 0.22)},
}


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, color name, centre (x, y) and radius in pixels.

    ``grade`` is the optional size word (one of :data:`GRADES`, or None); the radius
    it stands for was drawn from :func:`radius_range` when the scene was sampled.
    """

    shape: str
    color: str
    center: tuple[float, float]
    radius: float
    tint: tuple[int, int, int] = (0, 0, 0)  # small per-object colour jitter
    grade: str | None = None

    def phrase(self) -> str:
        if self.grade:
            return f"{self.grade} {self.color} {self.shape}"
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


def shape_sdf(shape: str, cx: float, cy: float, r: float, size: int,
              height: int | None = None) -> np.ndarray:
    """Signed distance (pixels) of an ideal shape of 'radius' ``r`` at (cx, cy), on a
    ``size`` x ``size`` grid (or ``size`` wide and ``height`` high)."""
    h = size if height is None else height
    ys, xs = np.mgrid[0:h, 0:size].astype(np.float32) + 0.5
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


def _background(scene: Scene, width: int | None = None, height: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    w = scene.size if width is None else width
    h = scene.size if height is None else height
    base = float(BACKGROUNDS[scene.background])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs, ys = xs / w, ys / h
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) * rng.uniform(8, 18)
    tex = np.zeros((h, w), np.float32)
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


def radius_range(grade: str | None, n_objects: int) -> tuple[float, float]:
    """Radius range (fraction of the image side) of an object with size word ``grade``."""
    if grade is not None and grade not in GRADES:
        raise ValueError(f"unknown grade {grade!r}; expected one of {GRADES} or None")
    if n_objects not in RADIUS_RANGES:
        raise ValueError("scenes have one or two objects")
    return RADIUS_RANGES[n_objects][grade]


def _draw_grades(rng: np.random.Generator, n: int, graded: float,
                 grades: tuple[str | None, ...] | None) -> list[str | None]:
    """Size words for ``n`` objects. Random ones come from a stream spawned off ``rng``
    (``Generator.spawn`` leaves ``rng``'s own draws unchanged), and only when asked for."""
    if grades is not None:
        if len(grades) != n:
            raise ValueError(f"grades has {len(grades)} entries for {n} objects")
        for g in grades:
            radius_range(g, n)  # validates
        return list(grades)
    if not 0.0 <= graded <= 1.0:
        raise ValueError(f"graded is a probability; got {graded}")
    if graded == 0.0:
        return [None] * n
    if hasattr(rng, "spawn"):
        (sub,) = rng.spawn(1)
    else:  # numpy < 1.25: the same child, through the bit generator's seed sequence
        (child,) = rng.bit_generator._seed_seq.spawn(1)
        sub = np.random.Generator(type(rng.bit_generator)(child))
    out: list[str | None] = []
    for _ in range(n):
        hit = sub.random() < graded
        word = GRADES[int(sub.integers(len(GRADES)))]
        out.append(word if hit else None)
    return out


def random_scene(
    rng: np.random.Generator,
    *,
    size: int = 64,
    n_objects: int | None = None,
    colors: tuple[str, ...] | None = None,
    shapes: tuple[str, ...] | None = None,
    background: str | None = None,
    graded: float = 0.0,
    grades: tuple[str | None, ...] | None = None,
) -> Scene:
    """Sample a scene. One object goes anywhere; with two, the first is in the
    left half and the second in the right half (as the caption says).

    ``graded``: probability that an object gets a size word (:data:`GRADES`, chosen
    uniformly), drawn from a stream spawned off ``rng``; ``grades`` names them instead
    (one entry per object, None for none). A graded object's radius is the same draw
    mapped linearly into its word's range (:func:`radius_range`), so ``rng`` is consumed
    exactly as without grades: the same seed gives the same colours, shapes, background
    and texture, and with ``graded=0`` and no ``grades`` the very same scene as ever.
    """
    n = int(n_objects if n_objects is not None else rng.integers(1, 3))
    if n not in (1, 2):
        raise ValueError("scenes have one or two objects")
    cols = list(colors) if colors else [str(c) for c in rng.choice(list(COLORS), n, replace=False)]
    shps = list(shapes) if shapes else [str(s) for s in rng.choice(SHAPES, n)]
    grds = _draw_grades(rng, n, graded, grades)
    objs = []
    for i in range(n):
        lo, hi = radius_range(None, n)
        r = rng.uniform(lo, hi) * size
        if grds[i] is not None:  # the same draw, mapped into the grade's range
            g_lo, g_hi = radius_range(grds[i], n)
            r = (g_lo + (g_hi - g_lo) * (r / size - lo) / (hi - lo)) * size
        if n == 1:
            lo_x, hi_x = r + 2, size - r - 2
        else:
            half = size / 2
            lo_x, hi_x = (r + 2, half - r - 1) if i == 0 else (half + r + 1, size - r - 2)
        cx = rng.uniform(lo_x, max(lo_x, hi_x))
        cy = rng.uniform(r + 2, size - r - 2)
        tint = tuple(int(v) for v in rng.integers(-12, 13, size=3))
        objs.append(SceneObject(shps[i], cols[i], (float(cx), float(cy)), float(r), tint, grds[i]))
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


def object_regions(image: Image.Image | np.ndarray, n_objects: int) -> list[np.ndarray]:
    """The regions :func:`check_image` reads, one boolean mask per object.

    One object: the largest saturated component (:func:`object_mask`). Two objects:
    the largest component in the left half and in the right half (empty if none).
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    mask = object_mask(arr)
    size = arr.shape[0]
    if n_objects == 1:
        comps = _components(mask)
        return [comps[0] if comps else np.zeros_like(mask)]
    regions = []
    for side in (0, 1):
        m = mask.copy()
        if side == 0:
            m[:, size // 2 :] = False
        else:
            m[:, : size // 2] = False
        comps = _components(m)
        regions.append(comps[0] if comps else np.zeros_like(mask))
    return regions


#: Area of each ideal shape of radius 1 (``shape_sdf``): circle pi r^2, square (2 * 0.86 r)^2,
#: triangle an equilateral one of circumradius 1.2 r.
SHAPE_AREA: dict[str, float] = {
    "circle": float(np.pi),
    "square": (2 * 0.86) ** 2,
    "triangle": 3 * np.sqrt(3) / 4 * 1.2**2,
}


def object_sizes(image: Image.Image | np.ndarray, n_objects: int) -> list[int]:
    """The graded quantity read from an image: area in pixels of each object's region
    (:func:`object_regions`, so for two objects the left one first)."""
    return [int(r.sum()) for r in object_regions(image, n_objects)]


def equivalent_radius(area: float, shape: str) -> float:
    """Radius (pixels, as ``SceneObject.radius``) of the ideal ``shape`` with this area."""
    if shape not in SHAPE_AREA:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return float(np.sqrt(max(float(area), 0.0) / SHAPE_AREA[shape]))


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
    regions = object_regions(arr, len(scene.objects))
    colors = [classify_color(arr, r) for r in regions]
    shapes = [classify_shape(r) for r in regions]
    want_c = [o.color for o in scene.objects]
    want_s = [o.shape for o in scene.objects]
    return Check(colors, shapes, colors == want_c, shapes == want_s)


def render_at(scene: Scene, width: int, height: int) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw ``scene`` on a ``width`` x ``height`` canvas: its square layout stretched to the
    canvas (x by ``width / size``, y by ``height / size``), radii scaled by the shorter side
    (shapes stay circles, squares and triangles; the first-named of two objects stays in
    the left half). ``render_at(s, s.size, s.size)`` is :func:`render`."""
    if width < 8 or height < 8:
        raise ValueError(f"canvas {width} x {height} is too small")
    sx, sy, sr = width / scene.size, height / scene.size, min(width, height) / scene.size
    img = _background(scene, width, height)
    masks = []
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown color {obj.color!r}; expected one of {tuple(COLORS)}")
        cx, cy = obj.center
        cov = _coverage(shape_sdf(obj.shape, cx * sx, cy * sy, obj.radius * sr, width, height))
        rgb = np.clip(np.array(COLORS[obj.color], np.float32) + np.array(obj.tint), 0, 255)
        img = img * (1 - cov[..., None]) + rgb * cov[..., None]
        masks.append(cov)
    for i in range(len(masks) - 1):
        for later in masks[i + 1 :]:
            masks[i] = masks[i] * (1 - later)
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB"), masks
