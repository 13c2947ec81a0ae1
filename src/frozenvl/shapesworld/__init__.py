"""ShapesWorld: frozenvl's built-in synthetic multimodal benchmark (deterministic data generator).

A small world in which "a frozen LLM keeps its text skills, a fine-tuned one forgets" can be
tested end to end on a CPU: flat-coloured shapes on a grey background with exact caption, VQA
and grounding answers (:mod:`.tasks`), plus text-only tasks (arithmetic, facts of a made-up
world, word games) for pretraining the LLM, with a held-out split.

>>> from frozenvl.shapesworld import generate
>>> info = generate("data/shapesworld", seed=0)  # doctest: +SKIP
"""

from .tasks import (
    CAPTION_PROMPT,
    GROUNDING_PROMPT,
    caption,
    fact_world,
    grounding_items,
    image_items,
    text_tasks,
    vqa_items,
)
from .world import BACKGROUND, COLOURS, KINDS, SIZES, Scene, Shape, sample_scene
from .writer import FORMAT_VERSION, corpus, generate

__all__ = [
    "BACKGROUND",
    "CAPTION_PROMPT",
    "COLOURS",
    "FORMAT_VERSION",
    "GROUNDING_PROMPT",
    "KINDS",
    "SIZES",
    "Scene",
    "Shape",
    "caption",
    "corpus",
    "fact_world",
    "generate",
    "grounding_items",
    "image_items",
    "sample_scene",
    "text_tasks",
    "vqa_items",
]
