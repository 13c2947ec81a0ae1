"""Questions and exact answers: about a scene (caption, VQA, grounding) and text-only tasks.

Every item is ``{"task", "question", "answer", "qtype"}``:

=========  ==========  =============================================================
task       qtype       example
=========  ==========  =============================================================
caption    caption     "Describe the shapes in the image from left to right."
                       -> "a small red circle and a large blue square"
vqa        colour      "What colour is the circle?" -> "red" (kind unique in scene)
vqa        shape       "What shape is the red thing?" -> "circle" (colour unique)
vqa        count       "How many shapes are there?" -> "2"
vqa        exists      "Is there a blue triangle?" -> "yes" / "no" (one of each per scene)
vqa        left_of     "Which is further left, the red circle or the blue square?"
                       -> "red circle" (centres at least LEFT_MARGIN px apart)
vqa        size        "What size is the green square?" -> "small" / "large"
grounding  box         GROUNDING_PROMPT + "the red circle." -> "[0.12,0.30,0.25,0.43]"
text       arith       "What is 3 plus 4?" -> "7"
text       fact        "Where does Zorin live?" -> "Velmora"
text       word        "Spell 'cat' backwards." -> "tac" / "What comes after Tuesday?"
=========  ==========  =============================================================

Text tasks and their held-out split (:func:`text_tasks`)
-------------------------------------------------------
The text tasks are what the base LLM learns in pretraining, before it is frozen; the
held-out items measure whether a model still has those skills after multimodal training.
A held-out item must be answerable from what pretraining showed, without being in it:

* arith: all ``a plus b``, ``a times b`` (a, b in 0..9) and ``a minus b`` (a >= b). Held out:
  for a seeded 20% of the pairs a != b, ONE order of ``plus`` / ``times`` (the other order
  stays in training, so commutativity answers it), and a seeded 20% of the ``minus`` items.
* fact: a fixed made-up world (:func:`fact_world`, independent of ``seed``) of 20 people, each
  with a home city, a pet and a favourite colour. Training always holds every fact as
  statements (``"Tell me a fact about Zorin's home."`` -> ``"Zorin lives in Velmora."``, and a
  per-person bio ``"Tell me about Zorin."``). The short-answer questions (``"Where does Zorin
  live?"`` -> ``"Velmora"``) of a seeded quarter of the people per attribute are held out; the
  other three quarters are in training, which teaches the question format. So every held-out
  fact was seen in training, only never asked in that form.
* word: reversing a word from :data:`WORDS` (a seeded 20% of the words held out: reversal is a
  procedure) and "What comes after X?" over days and months (a seeded few held out; training
  holds the full ordered lists, ``"List the days of the week."``).

Held-out question strings never occur among the training questions.
"""

from __future__ import annotations

import random
from collections import Counter

from ..data.boxes import BoxFormat, box_format, to_square_box
from .world import COLOURS, KINDS, Scene, Shape

__all__ = [
    "CAPTION_PROMPT",
    "CITIES",
    "DAYS",
    "GROUNDING_PROMPT",
    "LEFT_MARGIN",
    "MONTHS",
    "NAMES",
    "PETS",
    "WORDS",
    "WORLD_SEED",
    "canonical_order",
    "caption",
    "caption_items",
    "fact_world",
    "grounding_items",
    "image_items",
    "text_tasks",
    "vqa_items",
]

CAPTION_PROMPT = "Describe the shapes in the image from left to right."
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."
#: "Which is further left" is only asked about shapes whose centres are this many px apart.
LEFT_MARGIN = 8
VQA_QTYPES = ("colour", "shape", "count", "exists", "left_of", "size")


def _item(task: str, qtype: str, question: str, answer: str) -> dict:
    return {"task": task, "qtype": qtype, "question": question, "answer": answer}


# --------------------------------------------------------------------------- image tasks


def canonical_order(scene: Scene) -> list[Shape]:
    """Shapes left to right (centre x), ties top to bottom (centre y)."""
    return sorted(scene.shapes, key=lambda s: (s.cx, s.cy, s.colour, s.kind))


def caption(scene: Scene) -> str:
    """``"a small red circle and a large blue square"``: every shape, left to right, joined by " and "."""
    return " and ".join(f"a {s.size} {s.colour} {s.kind}" for s in canonical_order(scene))


def caption_items(scene: Scene) -> list[dict]:
    return [_item("caption", "caption", CAPTION_PROMPT, caption(scene))]


def vqa_items(scene: Scene, rng: random.Random) -> list[dict]:
    """One question of every applicable VQA type (two for "exists": one "yes", one "no")."""
    shapes = canonical_order(scene)
    kind_count = Counter(s.kind for s in shapes)
    colour_count = Counter(s.colour for s in shapes)
    items = []

    unique_kind = [s for s in shapes if kind_count[s.kind] == 1]
    if unique_kind:
        s = rng.choice(unique_kind)
        items.append(_item("vqa", "colour", f"What colour is the {s.kind}?", s.colour))

    unique_colour = [s for s in shapes if colour_count[s.colour] == 1]
    if unique_colour:
        s = rng.choice(unique_colour)
        items.append(_item("vqa", "shape", f"What shape is the {s.colour} thing?", s.kind))

    items.append(_item("vqa", "count", "How many shapes are there?", str(len(shapes))))

    s = rng.choice(shapes)
    items.append(_item("vqa", "exists", f"Is there a {s.colour} {s.kind}?", "yes"))
    present = {(s.colour, s.kind) for s in shapes}
    absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present]
    # Prefer absent pairs that share the colour or the kind of a present shape, so "no" cannot
    # be answered from the colour (or the kind) alone.
    near = [(c, k) for c, k in absent if c in colour_count or k in kind_count]
    c, k = rng.choice(near or absent)
    items.append(_item("vqa", "exists", f"Is there a {c} {k}?", "no"))

    pairs = [(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1 :] if abs(a.cx - b.cx) >= LEFT_MARGIN]
    if pairs:
        a, b = rng.choice(pairs)  # a.cx < b.cx (canonical order)
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        items.append(
            _item("vqa", "left_of", f"Which is further left, the {first.name} or the {second.name}?", a.name)
        )

    s = rng.choice(shapes)
    items.append(_item("vqa", "size", f"What size is the {s.name}?", s.size))
    return items


def grounding_box(scene: Scene, shape: Shape, fmt: str | BoxFormat | None = None) -> str:
    """The shape's pixel box on the padded square, normalised, written in box format `fmt`
    (:func:`frozenvl.data.boxes.box_format`; default ``unit``: 0-1 with 2 decimals)."""
    return box_format(fmt).render(to_square_box(shape.bbox(), scene.width, scene.height))


def grounding_items(scene: Scene, fmt: str | BoxFormat | None = None) -> list[dict]:
    """One item per shape, in canonical order."""
    return [
        _item("grounding", "box", GROUNDING_PROMPT.format(f"the {s.name}"), grounding_box(scene, s, fmt))
        for s in canonical_order(scene)
    ]


def image_items(scene: Scene, rng: random.Random, tasks=("caption", "vqa", "grounding"),
                fmt: str | BoxFormat | None = None) -> list[dict]:
    """All items of ``tasks`` for one scene, in the order caption, vqa, grounding (boxes in `fmt`)."""
    unknown = set(tasks) - {"caption", "vqa", "grounding"}
    if unknown:
        raise ValueError(f"unknown image task(s) {sorted(unknown)}; valid: caption, vqa, grounding")
    items: list[dict] = []
    if "caption" in tasks:
        items += caption_items(scene)
    if "vqa" in tasks:
        items += vqa_items(scene, rng)
    if "grounding" in tasks:
        items += grounding_items(scene, fmt)
    return items


# --------------------------------------------------------------------------- text tasks

#: Seed of the made-up world of facts: fixed, so every dataset shares the same facts.
WORLD_SEED = 20240917
NAMES = (
    "Zorin", "Aleva", "Bromi", "Calix", "Dunya", "Elwin", "Fenna", "Garro", "Hesta", "Ivor",
    "Jalen", "Kirsa", "Lomas", "Mirel", "Nadi", "Orrin", "Pela", "Quenby", "Rusa", "Tavi",
)  # fmt: skip
CITIES = ("Velmora", "Ostrand", "Kelvey", "Dunmarsh", "Pirelle", "Sarnith", "Brackwell", "Tolluna")
PETS = ("cat", "dog", "parrot", "rabbit", "tortoise", "goldfish", "hamster", "lizard")
WORDS = (
    "cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "bus", "egg",
    "fish", "bird", "tree", "star", "moon", "frog", "milk", "rain", "ship", "lamp",
    "door", "king", "wolf", "bell", "corn", "gold", "snow", "leaf", "rope", "sand",
    "apple", "bread", "chair", "river", "stone", "cloud", "green", "plant", "mouse", "table",
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
HELDOUT_FRACTION = 0.2
FACT_HELDOUT_PER_ATTRIBUTE = 5  # of 20 people


def fact_world() -> list[dict]:
    """The fixed made-up world: ``[{"name", "city", "pet", "colour"}]`` for the 20 :data:`NAMES`."""
    rng = random.Random(WORLD_SEED)
    colours = list(COLOURS)
    return [
        {"name": n, "city": rng.choice(CITIES), "pet": rng.choice(PETS), "colour": rng.choice(colours)}
        for n in NAMES
    ]


_FACT_QUESTION = {
    "city": ("Where does {name} live?", "{city}"),
    "pet": ("What pet does {name} have?", "{pet}"),
    "colour": ("What is {name}'s favourite colour?", "{colour}"),
}
_FACT_STATEMENT = {
    "city": ("Tell me a fact about {name}'s home.", "{name} lives in {city}."),
    "pet": ("Tell me a fact about {name}'s pet.", "{name} has a pet {pet}."),
    "colour": ("Tell me a fact about {name}'s favourite colour.", "{name}'s favourite colour is {colour}."),
}


def _arith_tasks(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for op, fn in (("plus", lambda a, b: a + b), ("times", lambda a, b: a * b)):
        unordered = [(a, b) for a in range(10) for b in range(a + 1, 10)]
        n_held = round(HELDOUT_FRACTION * len(unordered))
        held_pairs = {p if rng.random() < 0.5 else p[::-1] for p in rng.sample(unordered, n_held)}
        for a in range(10):
            for b in range(10):
                item = _item("text", "arith", f"What is {a} {op} {b}?", str(fn(a, b)))
                (held if (a, b) in held_pairs else train).append(item)
    minus = [(a, b) for a in range(10) for b in range(a + 1)]
    held_minus = set(rng.sample(minus, round(HELDOUT_FRACTION * len(minus))))
    for a, b in minus:
        item = _item("text", "arith", f"What is {a} minus {b}?", str(a - b))
        (held if (a, b) in held_minus else train).append(item)
    return train, held


def _fact_tasks(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    people = fact_world()
    for p in people:
        bio = " ".join(_FACT_STATEMENT[a][1].format(**p) for a in ("city", "pet", "colour"))
        train.append(_item("text", "fact", f"Tell me about {p['name']}.", bio))
        for q, a in _FACT_STATEMENT.values():
            train.append(_item("text", "fact", q.format(**p), a.format(**p)))
    for q, a in _FACT_QUESTION.values():
        held_names = set(rng.sample(NAMES, FACT_HELDOUT_PER_ATTRIBUTE))
        for p in people:
            item = _item("text", "fact", q.format(**p), a.format(**p))
            (held if p["name"] in held_names else train).append(item)
    return train, held


def _word_tasks(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    held_words = set(rng.sample(WORDS, round(HELDOUT_FRACTION * len(WORDS))))
    for w in WORDS:
        item = _item("text", "word", f"Spell '{w}' backwards.", w[::-1])
        (held if w in held_words else train).append(item)
    for title, seq in (("the days of the week", DAYS), ("the months of the year", MONTHS)):
        train.append(_item("text", "word", f"List {title}.", ", ".join(seq)))
        held_idx = set(rng.sample(range(len(seq)), max(1, round(HELDOUT_FRACTION * len(seq)))))
        for i, x in enumerate(seq):
            item = _item("text", "word", f"What comes after {x}?", seq[(i + 1) % len(seq)])
            (held if i in held_idx else train).append(item)
    return train, held


def text_tasks(seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)``: every text item, split with ``seed`` (see the module docstring).

    Both lists are in a fixed order (arith, fact, word); the facts themselves do not depend on ``seed``.
    """
    rng = random.Random(f"shapesworld:{seed}:text-split")
    train, held = [], []
    for make in (_arith_tasks, _fact_tasks, _word_tasks):
        t, h = make(rng)
        train += t
        held += h
    return train, held
