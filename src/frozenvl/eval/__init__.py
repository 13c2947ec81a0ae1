"""Evaluation: metrics (VQA accuracy, grounding IoU / Acc@0.5, CIDEr-D, BLEU, exact match) and a
runner that answers a JSONL evaluation set with any workflow and scores it."""

from .metrics import (
    bleu,
    caption_tokens,
    cider_d,
    cider_d_scores,
    exact_match,
    grounding_scores,
    normalize_answer,
    vqa_accuracy,
)
from .runner import ITEM_KINDS, EvalReport, evaluate, read_eval_file, text_preservation

__all__ = [
    "ITEM_KINDS",
    "EvalReport",
    "bleu",
    "caption_tokens",
    "cider_d",
    "cider_d_scores",
    "evaluate",
    "exact_match",
    "grounding_scores",
    "normalize_answer",
    "read_eval_file",
    "text_preservation",
    "vqa_accuracy",
]
