"""Evaluation: metrics (VQA accuracy, grounding IoU / Acc@0.5, CIDEr-D, BLEU, exact match), a
runner that answers a JSONL evaluation set with any workflow and scores it, and text skills
(ARC-Easy / PIQA by log-likelihood, chat agreement with the base) deployed and on the own path."""

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
from .text_skills import (
    MCItem,
    MCResult,
    chat_agreement,
    default_chat_prompts,
    format_report,
    load_arc_easy,
    load_benchmark,
    load_piqa,
    score_multiple_choice,
    text_skills_report,
)

__all__ = [
    "ITEM_KINDS",
    "EvalReport",
    "MCItem",
    "MCResult",
    "bleu",
    "caption_tokens",
    "chat_agreement",
    "cider_d",
    "cider_d_scores",
    "default_chat_prompts",
    "evaluate",
    "exact_match",
    "format_report",
    "grounding_scores",
    "load_arc_easy",
    "load_benchmark",
    "load_piqa",
    "normalize_answer",
    "read_eval_file",
    "score_multiple_choice",
    "text_preservation",
    "text_skills_report",
    "vqa_accuracy",
]
