"""Synthetic MMEB-format data: coloured shapes, for smoke tests and the offline demo.

    python -m training.synthetic OUT --n 2000 --seed 0 [--eval-n 200] [--image-size 64]
        [--tasks t2i,i2t,t2i_detailed,vqa] [--num-candidates 8]

writes ``OUT/train.jsonl`` (MMEB-train rows), ``OUT/eval.jsonl`` (MMEB-eval rows, with a
``dataset`` name per task) and ``OUT/images/{train,eval}/*.png``; image paths are relative
to OUT, so ``--image-root OUT`` resolves them. Each image shows one shape with four
attributes: colour, shape, size (small/large) and position (left/right/top/bottom/center),
with random jitter in hue, size, placement and background, so every file is a distinct
render; eval renders never repeat a train render. File names carry the attributes (for
debugging and tests; models never see them).

Tasks (``dataset`` names in eval.jsonl):
- ``shapes_t2i``: caption "a red circle" (or "an orange star") -> the image (plain text query, image-only
  target: the demo's search task).
- ``shapes_i2t``: the image alone -> its caption "a red circle".
- ``shapes_t2i_detailed``: MMEB-style instruction "Find me an image that matches the
  given caption: a small red circle on the left" -> "<|image_1|>\\nRepresent the given
  image."
- ``shapes_vqa``: "<|image_1|>\\nRepresent the given image with the following question:
  What colour is the shape?" (or shape / size / position) -> the answer ("red").

Train rows carry a hard negative that differs from the positive in exactly one attribute.
Eval candidates: the positive first, then hard negatives differing in exactly one
attribute (as many as fit), then random distractors; no candidate also matches the query.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES = ("colour", "shape", "size", "position")
VALUES: dict[str, Sequence[str]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
}
_POSITION_XY = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
_POSITION_XY["center"] = (0.5, 0.5)
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "size": "How big is the shape?",
    "position": "Where is the shape?",
}
TASKS = ("t2i", "i2t", "t2i_detailed", "vqa")
IMAGE_MARKER = "<|image_1|>"
# An image alone in MMEB's layout: the marker on its own line. The authors' evaluation leaves
# a message that starts with the image as written, so this is exactly the message the
# server's {"image": ...} shorthand builds (<image>\n), and the demo is served as trained.
IMAGE_ONLY = IMAGE_MARKER + "\n"
IMAGE_INSTRUCTION = IMAGE_MARKER + "\nRepresent the given image."


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)

    def with_(self, attribute: str, value: str) -> Scene:
        return replace(self, **{attribute: value})

    @property
    def caption(self) -> str:
        return f"{_article(self.colour)} {self.colour} {self.shape}"

    @property
    def detailed_caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {_POSITION_PHRASE[self.position]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: random.Random) -> Scene:
    return Scene(*(rng.choice(VALUES[a]) for a in ATTRIBUTES))


def one_attribute_variants(scene: Scene, attributes: Sequence[str] = ATTRIBUTES) -> list[Scene]:
    """Every scene that differs from ``scene`` in exactly one of ``attributes``."""
    return [scene.with_(a, v) for a in attributes for v in VALUES[a] if v != scene.get(a)]


# --------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    def ring(points: int, radii: Sequence[float], offset: float) -> list[tuple[float, float]]:
        out = []
        for k in range(points):
            a = offset + turn + 2 * math.pi * k / points
            rad = radii[k % len(radii)]
            out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return out

    if shape == "square":
        return ring(4, [r * 1.25], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r * 1.2], -math.pi / 2)
    if shape == "star":
        return ring(10, [r * 1.2, r * 0.5], -math.pi / 2)
    if shape == "diamond":
        return ring(4, [r * 1.15, r * 0.75], -math.pi / 2)
    if shape == "cross":
        w = r * 0.38
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w)]
        pts += [(-r, -w), (-w, -w)]
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: random.Random, size: int) -> Image.Image:
    """Draw ``scene`` with random jitter; the same rng state gives the same image."""
    base = rng.randint(215, 250)
    background = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLOURS[scene.colour])
    fx, fy = _POSITION_XY[scene.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * size
    cy = (fy + rng.uniform(-0.04, 0.04)) * size
    r = (rng.uniform(0.10, 0.13) if scene.size == "small" else rng.uniform(0.19, 0.23)) * size
    turn = rng.uniform(-0.25, 0.25)
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_shape_polygon(scene.shape, cx, cy, r, turn), fill=colour)
    if rng.random() < 0.5:  # light noise on half the images
        noise_seed = rng.getrandbits(32)
        pixels = np.asarray(image, dtype=np.int16)
        noise = np.random.default_rng(noise_seed).integers(-10, 11, size=pixels.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return image


class ImageWriter:
    """Renders scenes into ``OUT/images/<split>/``; never repeats an image's pixels."""

    def __init__(self, out: Path, split: str, size: int, rng: random.Random, seen: set[bytes]):
        self.out, self.split, self.size, self.rng, self.seen = out, split, size, rng, seen
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        self.count = 0

    def write(self, scene: Scene) -> str:
        while True:
            image = render(scene, self.rng, self.size)
            digest = hashlib.sha1(image.tobytes()).digest()
            if digest not in self.seen:
                break
        self.seen.add(digest)
        name = f"{self.count:06d}_{scene.colour}_{scene.shape}_{scene.size}_{scene.position}.png"
        self.count += 1
        rel = f"images/{self.split}/{name}"
        image.save(self.out / rel, format="PNG")
        return rel


# --------------------------------------------------------------------------- rows


def _query_and_target(task: str, scene: Scene, writer: ImageWriter, rng: random.Random) -> tuple:
    """(qry_text, qry_image, tgt_text, tgt_image, varied attributes, question attribute)."""
    if task == "t2i":
        return scene.caption, "", IMAGE_ONLY, writer.write(scene), ("colour", "shape"), None
    if task == "i2t":
        return IMAGE_ONLY, writer.write(scene), scene.caption, "", ("colour", "shape"), None
    if task == "t2i_detailed":
        text = f"Find me an image that matches the given caption: {scene.detailed_caption}"
        return text, "", IMAGE_INSTRUCTION, writer.write(scene), ATTRIBUTES, None
    if task == "vqa":
        attribute = rng.choice(ATTRIBUTES)
        text = (
            f"{IMAGE_MARKER}\nRepresent the given image with the following question: {_QUESTIONS[attribute]}"
        )
        return text, writer.write(scene), scene.get(attribute), "", (attribute,), attribute
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def _target(task: str, scene: Scene, writer: ImageWriter, attribute: str | None) -> tuple[str, str]:
    if task == "t2i":
        return IMAGE_ONLY, writer.write(scene)
    if task == "t2i_detailed":
        return IMAGE_INSTRUCTION, writer.write(scene)
    if task == "i2t":
        return scene.caption, ""
    return scene.get(attribute), ""  # vqa


def _key(scene: Scene, varied: Sequence[str]) -> tuple[str, ...]:
    return tuple(scene.get(a) for a in varied)


def train_row(task: str, writer: ImageWriter, rng: random.Random) -> dict:
    scene = random_scene(rng)
    qry, qry_image, pos, pos_image, varied, attribute = _query_and_target(task, scene, writer, rng)
    negative = rng.choice(one_attribute_variants(scene, varied))
    neg, neg_image = _target(task, negative, writer, attribute)
    return {
        "qry": qry,
        "qry_image_path": qry_image,
        "pos_text": pos,
        "pos_image_path": pos_image,
        "neg_text": neg,
        "neg_image_path": neg_image,
    }


def eval_row(task: str, writer: ImageWriter, rng: random.Random, num_candidates: int) -> dict:
    scene = random_scene(rng)
    qry, qry_image, pos, pos_image, varied, attribute = _query_and_target(task, scene, writer, rng)
    # Candidates must differ from the positive in what the query asks about.
    hard = one_attribute_variants(scene, varied)
    rng.shuffle(hard)
    chosen = [scene, *hard[: num_candidates - 1]]
    seen = {_key(s, varied) for s in chosen}
    n_distinct = math.prod(len(VALUES[a]) for a in varied)
    while len(chosen) < min(num_candidates, n_distinct):
        other = random_scene(rng)
        if _key(other, varied) not in seen:
            seen.add(_key(other, varied))
            chosen.append(other)
    targets = [(pos, pos_image)] + [_target(task, s, writer, attribute) for s in chosen[1:]]
    return {
        "qry_text": qry,
        "qry_img_path": qry_image,
        "tgt_text": [text for text, _ in targets],
        "tgt_img_path": [path for _, path in targets],
        "dataset": f"shapes_{task}",
    }


def _task_schedule(n: int, tasks: Sequence[str], rng: random.Random) -> list[str]:
    """n task names, as evenly split as possible, in random order."""
    schedule = [tasks[i % len(tasks)] for i in range(n)]
    rng.shuffle(schedule)
    return schedule


def generate(
    out: Path,
    *,
    n: int,
    seed: int,
    eval_n: int = 200,
    image_size: int = 64,
    tasks: Sequence[str] = TASKS,
    num_candidates: int = 8,
) -> None:
    """Write OUT/train.jsonl, OUT/eval.jsonl and OUT/images/ (see the module docstring)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    if num_candidates < 2:
        raise ValueError("num_candidates must be at least 2")
    out.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    # Separate streams so that eval data do not depend on --n (and vice versa).
    train_rng, eval_rng = random.Random(f"train-{seed}"), random.Random(f"eval-{seed}")
    splits = (
        ("train", n, train_rng, lambda task, w: train_row(task, w, train_rng)),
        ("eval", eval_n, eval_rng, lambda task, w: eval_row(task, w, eval_rng, num_candidates)),
    )
    for split, count, rng, make_row in splits:
        writer = ImageWriter(out, split, image_size, random.Random(rng.getrandbits(64)), seen)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for task in _task_schedule(count, tasks, rng):
                f.write(json.dumps(make_row(task, writer), ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out", type=Path, help="output folder (created if missing)")
    parser.add_argument("--n", type=int, required=True, help="number of train rows")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--eval-n", type=int, default=200, help="number of eval rows")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated subset of {','.join(TASKS)}; rows split evenly",
    )
    parser.add_argument(
        "--num-candidates", type=int, default=8, help="eval candidates per row, positive included"
    )
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    generate(
        args.out,
        n=args.n,
        seed=args.seed,
        eval_n=args.eval_n,
        image_size=args.image_size,
        tasks=tasks,
        num_candidates=args.num_candidates,
    )
    print(f"wrote {args.n} train rows and {args.eval_n} eval rows to {args.out}")


if __name__ == "__main__":
    main()
