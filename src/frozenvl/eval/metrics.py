"""Evaluation metrics, written from their published definitions.

* :func:`normalize_answer` / :func:`vqa_accuracy` -- VQA v2 style answer normalisation and the
  "min(#humans that said it / 3, 1)" accuracy, averaged over the leave-one-out subsets of the
  human answers.
* :func:`grounding_scores` -- IoU of the first box in a prediction with the ground truth box, and
  whether it reaches 0.5 (Acc@0.5, as used for RefCOCO).
* :func:`cider_d` / :func:`cider_d_scores` -- CIDEr-D (Vedantam et al., 2015): tf-idf weighted
  n-gram (n = 1..4) cosine similarity with clipped candidate counts and a gaussian length penalty
  (sigma = 6), averaged over references and n, times 10. Term frequencies are raw n-gram counts
  and the document frequencies come from the reference sets of the evaluated images, which is how
  the commonly reported numbers (COCO caption evaluation) are computed.
* :func:`bleu` -- corpus BLEU-n (Papineni et al., 2002) with the closest-reference brevity penalty.
* :func:`exact_match` -- normalised exact match for text tasks.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from ..data.boxes import BoxFormat, box_format, box_iou, parse_boxes

__all__ = [
    "bleu",
    "caption_tokens",
    "cider_d",
    "cider_d_scores",
    "exact_match",
    "grounding_scores",
    "normalize_answer",
    "vqa_accuracy",
]

# ----------------------------------------------------------------------------- answers

_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Any punctuation (or "_"), except a "." that sits between two digits (1.5).
_PUNCT = re.compile(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]|_")


def normalize_answer(s: str) -> str:
    """VQA-style normalisation of a short answer.

    Lowercase; thousands separators dropped ("1,000" -> "1000"); apostrophes dropped so that
    contractions compare equal with and without them ("don't" == "dont", "it's" == "its");
    every other punctuation mark becomes a space, except a decimal point inside a number ("1.5");
    the articles a / an / the are removed; number words zero..ten become digits; whitespace
    collapses to single spaces.
    """
    if not isinstance(s, str):
        raise TypeError(f"answers must be strings, got {type(s).__name__}: {s!r}")
    s = s.lower()
    s = _THOUSANDS.sub("", s)
    s = _APOSTROPHES.sub("", s)
    s = _PUNCT.sub(" ", s)
    words = [_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def _as_answer_list(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("no reference answers given")
    return answers


def vqa_accuracy(pred: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy of `pred`.

    One reference (a string or a one-element list): 1.0 on a normalised exact match, else 0.0.
    Several human answers (VQA v2 has 10): for each of the leave-one-out subsets of the answers,
    ``min(#answers in the subset equal to pred / 3, 1)``; the mean over the subsets.
    """
    refs = _as_answer_list(answers)
    p = normalize_answer(pred)
    norm = [normalize_answer(a) for a in refs]
    if len(norm) == 1:
        return 1.0 if p == norm[0] else 0.0
    matches = sum(1 for a in norm if a == p)
    total = 0.0
    for a in norm:  # leave this one out
        in_subset = matches - (1 if a == p else 0)
        total += min(in_subset / 3.0, 1.0)
    return total / len(norm)


def exact_match(pred: str, answer: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the (or any) normalised reference answer, else 0.0."""
    p = normalize_answer(pred)
    return 1.0 if any(p == normalize_answer(a) for a in _as_answer_list(answer)) else 0.0


# ----------------------------------------------------------------------------- grounding

_box_format = box_format  # the parameter of grounding_scores shadows the function


def _gt_box(gt_box: str | Sequence[float], fmt: str | BoxFormat | None = None) -> list[float]:
    """The ground truth as a 0-1 box: 4 numbers, or a string holding a box (in `fmt` when given)."""
    if isinstance(gt_box, str):
        boxes = box_format(fmt).parse(gt_box) if fmt is not None else parse_boxes(gt_box)
        if not boxes:
            raise ValueError(f"no [x1,y1,x2,y2] box{f' in format {fmt!r}' if fmt else ''} in the ground truth {gt_box!r}")
        return boxes[0]
    values = list(gt_box)
    if len(values) == 1 and not isinstance(values[0], (int, float)):
        return _gt_box(values[0], fmt)  # ["[..]"] or [[..]]
    if len(values) != 4:
        raise ValueError(f"a ground truth box must be 4 numbers, got {gt_box!r}")
    return [float(v) for v in values]


def grounding_scores(pred_text: str, gt_box: str | Sequence[float], threshold: float = 0.5,
                     box_format: str | BoxFormat | None = None) -> tuple[float, float]:
    """``(iou, hit)`` of the first ``[x1,y1,x2,y2]`` box in `pred_text` against `gt_box`.

    `gt_box` is 4 numbers (0-1) or a string holding a box. ``hit`` is 1.0 when ``iou >= threshold``
    (Acc@0.5 by default), else 0.0. A prediction without a (valid) box scores ``(0.0, 0.0)``.
    `box_format` (:func:`frozenvl.data.boxes.box_format`: ``unit``, ``int1000``, ``bins32``...):
    the format the model writes boxes in; then only well-formed boxes of that format count (a
    ground-truth string is read in it too). None: any ``[a,b,c,d]`` of numbers, read as 0-1.
    """
    gt = _gt_box(gt_box, box_format)
    boxes = _box_format(box_format).parse(pred_text) if box_format is not None else parse_boxes(pred_text)
    if not boxes:
        return 0.0, 0.0
    try:
        iou = box_iou(boxes[0], gt)
    except ValueError:  # e.g. non-finite numbers
        return 0.0, 0.0
    return iou, 1.0 if iou >= threshold else 0.0


# ----------------------------------------------------------------------------- captions

_WORD = re.compile(r"[^\W_]+")


def caption_tokens(text: str) -> list[str]:
    """Lowercase words (letters/digits); apostrophes are dropped, other punctuation splits words."""
    return _WORD.findall(_APOSTROPHES.sub("", text.lower()))


def _ngrams(tokens: Sequence[str], n_max: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, n_max + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _check_corpus(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[Hashable, list[str]]:
    missing = [k for k in candidates if k not in references]
    if missing:
        raise ValueError(f"no references for candidate id(s) {missing[:5]}")
    refs = {}
    for k in candidates:
        r = references[k]
        r = [r] if isinstance(r, str) else list(r)
        if not r:
            raise ValueError(f"id {k!r} has an empty reference list")
        refs[k] = r
    return refs


def cider_d_scores(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> dict[Hashable, float]:
    """CIDEr-D of every candidate (id -> score); :func:`cider_d` is their mean.

    For image i with candidate c and references S_i, with g^k(s) the vector of
    ``count_s(w) * log(|I| / df(w))`` over the k-grams w of s (df(w): number of images whose
    references contain w; |I|: number of evaluated images)::

        CIDEr-D(c, S_i) = 10 / (N |S_i|) * sum_k sum_{s in S_i}
                          exp(-(len(c) - len(s))^2 / (2 sigma^2))
                          * <min(g^k(c), g^k(s)), g^k(s)> / (|g^k(c)| |g^k(s)|)

    where a term whose vectors have zero norm contributes 0 and len counts tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    refs = _check_corpus(candidates, references)
    if not refs:
        return {}
    ref_tokens = {k: [caption_tokens(s) for s in v] for k, v in refs.items()}
    ref_counts = {k: [_ngrams(t, n) for t in v] for k, v in ref_tokens.items()}
    df: Counter = Counter()
    for counts in ref_counts.values():
        df.update(set().union(*counts))
    log_images = math.log(len(refs))

    def vectors(counts: Counter) -> tuple[list[dict], list[float]]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1, df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms

    scores = {}
    for k, cand in candidates.items():
        c_tokens = caption_tokens(cand)
        c_vec, c_norm = vectors(_ngrams(c_tokens, n))
        total = 0.0
        for r_tokens, r_counts in zip(ref_tokens[k], ref_counts[k]):
            r_vec, r_norm = vectors(r_counts)
            penalty = math.exp(-((len(c_tokens) - len(r_tokens)) ** 2) / (2.0 * sigma**2))
            for level in range(n):
                if c_norm[level] == 0.0 or r_norm[level] == 0.0:
                    continue
                rv = r_vec[level]
                dot = sum(min(w, rv[g]) * rv[g] for g, w in c_vec[level].items() if g in rv)
                total += penalty * dot / (c_norm[level] * r_norm[level])
        scores[k] = 10.0 * total / (n * len(ref_tokens[k]))
    return scores


def cider_d(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores` over the candidates (0.0 for none).

    The idf comes from the reference sets of the candidates' images, so with a handful of images
    (or a single reference each) the values are not comparable with COCO-sized evaluations and
    may be large.
    """
    scores = cider_d_scores(candidates, references, n=n, sigma=sigma)
    return sum(scores.values()) / len(scores) if scores else 0.0


def bleu(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    n: int = 4,
) -> float:
    """Corpus BLEU-n: clipped n-gram precisions pooled over the corpus, geometric mean, times
    the brevity penalty ``exp(1 - r / c)`` (c < r) with r the sum of the closest reference lengths.
    0.0 when some precision is 0 (no smoothing).
    """
    refs = _check_corpus(candidates, references)
    matched = [0] * n
    possible = [0] * n
    cand_len = 0
    ref_len = 0
    for k, cand in candidates.items():
        c_tokens = caption_tokens(cand)
        r_tokens = [caption_tokens(s) for s in refs[k]]
        cand_len += len(c_tokens)
        # closest reference length; ties go to the shorter reference
        ref_len += min((abs(len(r) - len(c_tokens)), len(r)) for r in r_tokens)[1]
        c_counts = _ngrams(c_tokens, n)
        max_ref: Counter = Counter()
        for r in r_tokens:
            max_ref |= _ngrams(r, n)
        for gram, cnt in c_counts.items():
            matched[len(gram) - 1] += min(cnt, max_ref[gram])
        for level in range(1, n + 1):
            possible[level - 1] += max(0, len(c_tokens) - level + 1)
    if cand_len == 0 or any(m == 0 for m in matched):
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, possible)) / n
    brevity = 1.0 if cand_len >= ref_len else math.exp(1.0 - ref_len / cand_len)
    return brevity * math.exp(log_precision)
