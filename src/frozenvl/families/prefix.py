"""prefix (LLaVA, "Frozen"): connector output replaces the image placeholder in the input embeddings.

Everything the family needs is the base class's default: the splice in `Family.embed`, the base
decoder loop, the base norm and head. The LLM is frozen unless `llm_train` is `full` (the LLaVA
fine-tuned baseline, on the workflow's own copy of the LLM) or `lora`.
"""

from __future__ import annotations

from .base import Family


class PrefixFamily(Family):
    name = "prefix"
