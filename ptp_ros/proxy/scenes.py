"""Scenes and questions of the high-resolution proxy task, deterministic in a seed.

Why these choices:
- Image sizes (1344–2016 px on the long side, six aspect ratios) select every anyres grid of the
  default pinpoints (1×2, 2×1, 2×2, 1×3, 3×1), so the pruning budgets see varied tile layouts.
- An object's size is drawn in *tile pixels* (its size after the processor resizes the image onto the
  anyres canvas): 10–12.5 px, centred on one 14-px patch of a tile, with no other object in the
  neighbouring patches, so each object is exactly one tile token (what "the tokens that matter" means
  is then exact, and counts are counts of tokens).  The 336-px global view shrinks it a further 2–3×
  along the long side (4–6 px) and does not align it, so shapes blur together there (colours do not).
  On the non-square grids the short side gains nothing from the tiles, so there the global view keeps
  some shape.
- Every question names a shape, so its answer needs shape, which only the tiles resolve (location, the
  coarse type, is the exception: see ``_location_question``); the words of the question decide which
  object matters, so the instruction decides which tokens are needed.
- The background is coloured only weakly (low-saturation noise, grey strokes and grey decoy shapes),
  so the objects' saturated colours are the signal and the clutter is texture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..vlm.families import DEFAULT_PINPOINTS  # the pinpoints the tiny and proxy LLaVA-NeXT read

SHAPES = ("circle", "square", "triangle", "cross", "ring")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "ring": "rings"}
COLOURS = {
    "red": (220, 35, 35),
    "green": (35, 175, 45),
    "blue": (45, 80, 235),
    "yellow": (240, 215, 25),
    "purple": (155, 45, 205),
}
COUNT_WORDS = ("zero", "one", "two", "three")
SIDES = ("left", "right")
QUESTION_TYPES = ("colour", "presence", "count", "location")
ANSWER_WORDS = (*COLOURS, "yes", "no", *COUNT_WORDS, *SIDES)

#: (height, width) of the scenes; the anyres grid each gets on the default pinpoints is noted.
SCENE_SIZES = (
    (1008, 1344),
    (1344, 1008),
    (1344, 1344),  # 2×2 tiles
    (1008, 2016),
    (2016, 1008),  # 1×2, 2×1
    (672, 2016),
    (2016, 672),
)  # 1×3, 3×1
PATCH = 14  # CLIP-336/14: a tile is 24×24 patches of 14 px
TILE_OBJECT_PX = (10.0, 12.5)  # object size in tile pixels: each object fills one patch, centred on it
MAX_PER_SHAPE = 3
CENTRE_BAND = (0.42, 0.58)  # objects' centres stay out of it, so left/right is never ambiguous
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # RGB uint8 [H, W, 3]
    objects: list[SceneObject]
    tile_scale: float  # image px → anyres-canvas px

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    qtype: str
    targets: tuple[int, ...] = field(default=())  # indices of the objects the answer depends on


def split_seed(split: str, index: int) -> int:
    """Seeds of the splits never overlap: train, val and test draw from disjoint ranges."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if not 0 <= index < 10_000_000:
        raise ValueError(f"index {index} is outside [0, 1e7)")
    return SPLITS[split] * 10_000_000 + index


def proxy_words() -> list[str]:
    """Every word of the task's prompts and answers (the tokenizer's vocabulary beyond the base words)."""
    words = ["what", "colour", "is", "the", "there", "a", "how", "many", "are", "on", "left", "or", "right", "?"]
    return list(dict.fromkeys([*words, *SHAPES, *PLURALS.values(), *ANSWER_WORDS]))


def anyres_scale(height: int, width: int, pinpoints=DEFAULT_PINPOINTS) -> float:
    """The factor by which LLaVA-NeXT's processor resizes this image onto its anyres canvas."""
    from transformers.image_processing_utils import select_best_resolution

    ph, pw = select_best_resolution((height, width), [list(p) for p in pinpoints])
    return min(ph / height, pw / width)


def _background(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    base = rng.uniform(90, 170, size=(rng.integers(6, 12), rng.integers(6, 12), 1))
    tint = rng.uniform(-18, 18, size=base.shape[:2] + (3,))  # weak colour: clutter is texture, not signal
    image = cv2.resize((base + tint).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(
        rng.normal(0, 14, size=(height // 6, width // 6, 1)).astype(np.float32),
        (width, height),
        interpolation=cv2.INTER_LINEAR,
    )
    image += fine[..., None] if fine.ndim == 2 else fine
    canvas = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(25, 45))):  # grey strokes
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (p0[0] + int(rng.integers(-300, 300)), p0[1] + int(rng.integers(-300, 300)))
        grey = int(rng.integers(40, 220))
        cv2.line(canvas, p0, p1, (grey, grey, grey), int(rng.integers(1, max(2, int(4 / scale)))), cv2.LINE_AA)
    for _ in range(int(rng.integers(8, 16))):  # grey decoys of the objects' own shapes and sizes
        size = rng.uniform(*TILE_OBJECT_PX) / scale
        centre = (rng.uniform(size, width - size), rng.uniform(size, height - size))
        grey = int(rng.integers(30, 230))
        _draw_shape(canvas, str(rng.choice(SHAPES)), centre, size, (grey, grey, grey), float(rng.uniform(0, 360)))
    return canvas


def _draw_shape(canvas: np.ndarray, shape: str, centre, size: float, colour, angle: float) -> None:
    cx, cy = centre
    r = size / 2
    c = tuple(int(v) for v in colour)
    shift = 4  # sub-pixel precision for cv2
    f = 1 << shift

    def pts(points):
        rot = np.deg2rad(angle)
        xy = np.array(points, dtype=np.float64)
        xy = xy @ np.array([[np.cos(rot), np.sin(rot)], [-np.sin(rot), np.cos(rot)]])
        return np.round((xy + [cx, cy]) * f).astype(np.int32)

    if shape == "circle":
        cv2.circle(canvas, (round(cx * f), round(cy * f)), round(r * f), c, -1, cv2.LINE_AA, shift)
    elif shape == "ring":
        cv2.circle(
            canvas, (round(cx * f), round(cy * f)), round(r * 0.78 * f), c, max(2, round(r * 0.42)), cv2.LINE_AA, shift
        )
    elif shape == "square":
        s = r * 0.85
        cv2.fillPoly(canvas, [pts([(-s, -s), (s, -s), (s, s), (-s, s)])], c, cv2.LINE_AA, shift)
    elif shape == "triangle":
        cv2.fillPoly(canvas, [pts([(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)])], c, cv2.LINE_AA, shift)
    elif shape == "cross":
        a, b = r, r * 0.32
        arm = [
            (-a, -b),
            (-b, -b),
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
        ]
        cv2.fillPoly(canvas, [pts(arm)], c, cv2.LINE_AA, shift)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def patch_centres(height: int, width: int, pinpoints=DEFAULT_PINPOINTS) -> tuple[np.ndarray, np.ndarray]:
    """x and y (image pixels) of the centres of the anyres tiles' 14-px patches that lie on the image.

    Mirrors the processor: the image is resized to fit the best canvas (the short side rounded up) and
    centred on it with padding, then the canvas is cut into 336-px tiles of 24×24 patches."""
    from transformers.image_processing_utils import select_best_resolution

    ch, cw = select_best_resolution((height, width), [list(p) for p in pinpoints])
    scale = min(ch / height, cw / width)
    new_h, new_w = min(ch, int(np.ceil(height * scale))), min(cw, int(np.ceil(width * scale)))
    pad_y, pad_x = (ch - new_h) // 2, (cw - new_w) // 2

    def axis(canvas: int, pad: int, content: int) -> np.ndarray:
        centres = np.arange(PATCH // 2, canvas, PATCH, dtype=np.float64)
        inside = (centres - PATCH / 2 >= pad) & (centres + PATCH / 2 <= pad + content)
        return (centres[inside] - pad) / scale

    return axis(cw, pad_x, new_w), axis(ch, pad_y, new_h)


def _place(rng: np.random.Generator, height: int, width: int, count: int) -> list[tuple[float, float]]:
    """Centres of ``count`` objects, each on its own tile patch, no two in neighbouring patches, none in the
    middle band of the width (so that left/right is never ambiguous)."""
    xs, ys = patch_centres(height, width)
    cols = [i for i, x in enumerate(xs) if not CENTRE_BAND[0] * width <= x <= CENTRE_BAND[1] * width]
    cells: list[tuple[int, int]] = []
    while len(cells) < count:
        i, j = cols[int(rng.integers(len(cols)))], int(rng.integers(len(ys)))
        if all(max(abs(i - a), abs(j - b)) >= 2 for a, b in cells):
            cells.append((i, j))
    return [(float(xs[i]), float(ys[j])) for i, j in cells]


def make_scene(seed: int, size: tuple[int, int] | None = None, crowd: int = 0) -> Scene:
    """One scene: 5–7 coloured shapes (each shape at most 3 times) on clutter, from ``seed`` alone.

    ``crowd`` > 0 instead scatters that many objects with no limit per shape: dense scenes for
    pre-training a vision tower (many labelled patches per forward), never the task's scenes."""
    rng = np.random.default_rng(seed)
    height, width = size if size is not None else SCENE_SIZES[int(rng.integers(len(SCENE_SIZES)))]
    scale = anyres_scale(height, width)
    image = _background(rng, height, width, scale)
    while True:
        shapes = [str(s) for s in rng.choice(SHAPES, size=crowd or int(rng.integers(5, 8)))]
        if crowd or max(shapes.count(s) for s in SHAPES) <= MAX_PER_SHAPE:
            break
    colours = [str(c) for c in rng.choice(list(COLOURS), size=len(shapes))]
    sizes = [float(rng.uniform(*TILE_OBJECT_PX)) / scale for _ in shapes]
    centres = _place(rng, height, width, len(shapes))
    objects = []
    for shape, colour, s, (cx, cy) in zip(shapes, colours, sizes, centres):
        jitter = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3), 0, 255)
        _draw_shape(image, shape, (cx, cy), s, jitter, float(rng.uniform(0, 360)))
        objects.append(SceneObject(shape, colour, (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)))
    return Scene(seed=seed, image=image, objects=objects, tile_scale=scale)


def move_object(scene: Scene, index: int, centre_x: float) -> Scene:
    """``scene`` with object ``index`` moved sideways to ``centre_x``: its old place inpainted from the clutter
    around it, its pixels pasted at the new place (a camera sequence in which one object moves; the caller keeps
    the new place clear of the others)."""
    moving = scene.objects[index]
    x0, y0, x1, y1 = (int(round(v)) for v in moving.box)
    x0, y0, x1, y1 = x0 - 1, y0 - 1, x1 + 2, y1 + 2  # the anti-aliased rim too
    mask = np.zeros(scene.image.shape[:2], np.uint8)
    mask[y0:y1, x0:x1] = 255
    image = cv2.inpaint(scene.image, mask, 3, cv2.INPAINT_TELEA)
    shift = int(round(centre_x - moving.centre[0]))
    image[y0:y1, x0 + shift : x1 + shift] = scene.image[y0:y1, x0:x1]
    box = (moving.box[0] + shift, moving.box[1], moving.box[2] + shift, moving.box[3])
    objects = [SceneObject(o.shape, o.colour, box) if i == index else o for i, o in enumerate(scene.objects)]
    return Scene(seed=scene.seed, image=image, objects=objects, tile_scale=scene.tile_scale)


def _unique_object(scene: Scene, rng: np.random.Generator) -> tuple[str, int] | None:
    """A shape that occurs exactly once in the scene and that object's index (None if there is none),
    so that "the <shape>" names one object."""
    unique = [s for s in SHAPES if scene.count(s) == 1]
    if not unique:
        return None
    shape = str(rng.choice(unique))
    return shape, next(k for k, o in enumerate(scene.objects) if o.shape == shape)


def _colour_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    if (picked := _unique_object(scene, rng)) is None:
        return None
    shape, i = picked
    return Question(f"what colour is the {shape} ?", scene.objects[i].colour, "colour", (i,))


def _presence_question(scene: Scene, rng: np.random.Generator) -> Question:
    """Yes/no with probability ½; a "no" names a colour–shape pair drawn uniformly from those absent.

    Why not only hard negatives (both words present, just not bound together): with every negative
    hard, neither word alone says anything about the answer, so a model trained from scratch gets no
    first-order signal to start from (docs/accuracy/training.md).  Uniform absent
    pairs keep about two thirds of the negatives hard on 5–7-object scenes anyway."""
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    targets = tuple(k for k, o in enumerate(scene.objects) if o.shape == shape)
    return Question(f"is there a {colour} {shape} ?", answer, "presence", targets)


def _count_question(scene: Scene, rng: np.random.Generator) -> Question:
    """The count asked for is drawn uniformly from those the scene offers, so answers stay balanced."""
    by_count: dict[int, list[str]] = {}
    for s in SHAPES:
        by_count.setdefault(scene.count(s), []).append(s)
    counts = sorted(by_count)
    n = counts[int(rng.integers(len(counts)))]
    shape = str(rng.choice(by_count[n]))
    targets = tuple(k for k, o in enumerate(scene.objects) if o.shape == shape)
    return Question(f"how many {PLURALS[shape]} are there ?", COUNT_WORDS[n], "count", targets)


def _location_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    """Left or right of the one object of its colour, named by colour and shape.

    Coarse location is the one type the global view can answer: a token's place in the image is known
    to the vision tower only within its own 336-px view, and only the global view spans the whole image
    (the LLM would have to infer a tile's column from the packed sequence).  So the asked-about object
    is picked by a colour that occurs once; it is the control type on which global-only models keep up."""
    unique = [k for k, o in enumerate(scene.objects) if sum(p.colour == o.colour for p in scene.objects) == 1]
    if not unique:
        return None
    i = unique[int(rng.integers(len(unique)))]
    o = scene.objects[i]
    side = "left" if o.centre[0] < scene.image.shape[1] / 2 else "right"
    return Question(f"is the {o.colour} {o.shape} on the left or right ?", side, "location", (i,))


_MAKERS = {
    "colour": _colour_question,
    "presence": _presence_question,
    "count": _count_question,
    "location": _location_question,
}


def make_questions(scene: Scene, per_type: int = 2, seed: int | None = None) -> list[Question]:
    """Up to ``per_type`` distinct questions of every type (fewer where the scene cannot pose them)."""
    rng = np.random.default_rng(scene.seed if seed is None else seed)
    questions: list[Question] = []
    for qtype in QUESTION_TYPES:
        seen: set[str] = set()
        for _ in range(4 * per_type):
            if len(seen) == per_type:
                break
            q = _MAKERS[qtype](scene, rng)
            if q is not None and q.text not in seen:
                seen.add(q.text)
                questions.append(q)
    return questions
