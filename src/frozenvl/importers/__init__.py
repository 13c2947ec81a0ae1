"""Importers: turn checkpoints of other multimodal formats into frozenvl model directories."""

from .llava import import_llava_hf

__all__ = ["import_llava_hf"]
