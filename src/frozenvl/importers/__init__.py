"""Importers: turn checkpoints of other multimodal formats into frozenvl model directories."""

from .idefics import import_idefics
from .internvl import import_internvl_hf
from .llava import import_llava_hf
from .llava_next import import_llava_next_hf
from .peft_adaption_prompt import import_peft_adaption_prompt

__all__ = ["import_idefics", "import_internvl_hf", "import_llava_hf", "import_llava_next_hf", "import_peft_adaption_prompt"]
