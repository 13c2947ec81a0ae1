"""How fast can *any* trained reader get boxes out of the demo's frozen ViT? (docs/shapesworld.md, grounding)

No LLM at all: the tiny ViT's last-layer patch features of fresh scenes, and for each shape a query
(its colour and kind). A reader is trained on them with AdamW, batch 16, and scored by Acc@0.5 on
the boxes of held-out scenes, at a few step counts:

* ``--reader attention`` (default): one learned query per (colour, kind) attends over the 64
  patches; the pooled value gives the box. This is the least any grounding workflow must learn.
* ``--reader oracle``: the patch under the shape's centre is handed over (no selection to learn),
  so only the box readout is trained.

and the box comes out as one class among 32 cells per coordinate (``--head cells``, cross entropy:
what ``loc32`` / ``bins32`` answers ask of an LM head), as the same 32 classes scored from one number
per coordinate (``--head ordinal``: logit of cell k = -(z - k - 1/2)^2 / (2 sigma^2), sigma learnt from 2
cells, cross entropy), or as 4 numbers (``--head l1``). The learning rate follows the demo's cosine
schedule (``--schedule constant`` to hold it).
``--closed-form`` prints the least-squares linear probe of the centre patch (what the demo's ViT
probe reports), the ceiling the trained readers are measured against.

    frozenvl demo --out demo_out                                 # once: the bases
    python examples/shapesworld_box_readout.py demo_out --head cells --steps 300,600,1200,2400
    python examples/shapesworld_box_readout.py demo_out --reader oracle --head l1 --closed-form
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import random

import torch
import torch.nn.functional as F
from torch import nn

from frozenvl.data.boxes import box_iou, to_square_box
from frozenvl.shapesworld.bases import BaseSpec, _vit_preprocessor
from frozenvl.shapesworld.probes import centre_patch
from frozenvl.shapesworld.world import COLOURS, KINDS, sample_scene

CELLS = 32


@torch.no_grad()
def shape_rows(vit, n_scenes: int, seed: str, oracle: bool, grid: int):
    """(features [n, P, C], query ids [n], boxes [n, 4], shapes per scene [n]): one row per shape."""
    pre = _vit_preprocessor(BaseSpec())
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    feats = torch.cat([vit(pixel_values=pre([s.render() for s in scenes[i : i + 128]])).last_hidden_state[:, 1:]
                       for i in range(0, n_scenes, 128)])
    f, q, b, n = [], [], [], []
    for i, s in enumerate(scenes):
        for sh in s.shapes:
            f.append(feats[i, centre_patch(s, sh, grid)].unsqueeze(0) if oracle else feats[i])
            q.append(list(COLOURS).index(sh.colour) * len(KINDS) + KINDS.index(sh.kind))
            b.append(to_square_box(sh.bbox(), s.width, s.height))
            n.append(len(s.shapes))
    return torch.stack(f), torch.tensor(q), torch.tensor(b), torch.tensor(n)


class Reader(nn.Module):
    """A query attends over the patch features; the pooled value becomes 4 x CELLS logits or 4 numbers."""

    def __init__(self, width: int, head: str, d: int = 128):
        super().__init__()
        self.query = nn.Embedding(len(COLOURS) * len(KINDS), d)
        self.key, self.value = nn.Linear(width, d), nn.Linear(width, d)
        self.head = head
        self.out = nn.Linear(d, 4 * CELLS if head == "cells" else 4)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(2.0)))  # ordinal only: in cells

    def forward(self, feats: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        q = self.query(query)
        attn = torch.softmax(torch.einsum("bpd,bd->bp", self.key(feats), q) / math.sqrt(q.shape[-1]), -1)
        out = self.out(torch.einsum("bp,bpd->bd", attn, self.value(feats)))
        if self.head == "ordinal":  # one number per coordinate, in cells, scored against every cell's centre
            z = out.unsqueeze(-1) * CELLS
            out = (-((z - torch.arange(CELLS) - 0.5) ** 2) / (2 * self.log_sigma.exp() ** 2)).flatten(1)
        return out


def boxes_of(out: torch.Tensor, head: str) -> torch.Tensor:
    if head in ("cells", "ordinal"):  # read back at the cell's centre, as the bins / loc box formats do
        return (out.view(-1, 4, CELLS).argmax(-1).float() + 0.5) / CELLS
    return out


def acc05(pred: torch.Tensor, gold: torch.Tensor) -> float:
    return sum(box_iou(p, g) >= 0.5 for p, g in zip(pred.tolist(), gold.tolist())) / len(gold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_out", help="a directory `frozenvl demo --out` has filled (its bases/)")
    ap.add_argument("--reader", choices=("attention", "oracle"), default="attention")
    ap.add_argument("--head", choices=("cells", "ordinal", "l1"), default="cells")
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--steps", default="300,600,1200", help="comma-separated step counts to score at")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-scenes", type=int, default=1500, help="the demo's training images")
    ap.add_argument("--closed-form", action="store_true", help="also the least-squares probe of the centre patch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import CLIPVisionModel

    torch.manual_seed(args.seed)
    vision = sorted(glob.glob(os.path.join(args.demo_out, "bases", "*", "vision")))
    if not vision:
        raise SystemExit(f"no bases/*/vision under {args.demo_out}: run `frozenvl demo --out {args.demo_out}` first")
    vit = CLIPVisionModel.from_pretrained(vision[0]).eval()
    grid = vit.config.image_size // vit.config.patch_size
    oracle = args.reader == "oracle"
    tr = shape_rows(vit, args.train_scenes, "box-readout:train", oracle, grid)
    ev = shape_rows(vit, 300, "box-readout:eval", oracle, grid)
    print(f"{len(tr[1])} training shapes, {len(ev[1])} held-out shapes; reader {args.reader}, head {args.head}, "
          f"lr {args.lr} ({args.schedule}), batch 16")
    if args.closed_form:
        centre = shape_rows(vit, args.train_scenes, "box-readout:train", True, grid)
        x = torch.cat([centre[0][:, 0], torch.ones(len(centre[0]), 1)], 1)
        w = torch.linalg.lstsq(x, centre[2]).solution
        ev_c = shape_rows(vit, 300, "box-readout:eval", True, grid)
        pred = torch.cat([ev_c[0][:, 0], torch.ones(len(ev_c[0]), 1)], 1) @ w
        cells = ((pred * CELLS).floor().clamp(0, CELLS - 1) + 0.5) / CELLS
        print(f"closed-form linear probe of the centre patch: Acc@0.5 {100 * acc05(pred, ev_c[2]):.1f}% "
              f"({100 * acc05(cells, ev_c[2]):.1f}% rounded to {CELLS} cells)")
    reader = Reader(tr[0].shape[-1], args.head)
    opt = torch.optim.AdamW(reader.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    marks = sorted(int(s) for s in args.steps.split(","))
    for step in range(1, marks[-1] + 1):
        idx = torch.randint(len(tr[1]), (16,), generator=g)
        if args.schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / marks[-1]))
        out = reader(tr[0][idx], tr[1][idx])
        if args.head in ("cells", "ordinal"):
            loss = F.cross_entropy(out.view(-1, CELLS), (tr[2][idx] * CELLS).floor().clamp(0, CELLS - 1).long().view(-1))
        else:
            loss = F.l1_loss(out, tr[2][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in marks:
            with torch.no_grad():
                pred = boxes_of(reader(ev[0], ev[1]), args.head)
            per_n = {int(k): round(100 * acc05(pred[ev[3] == k], ev[2][ev[3] == k])) for k in ev[3].unique()}
            print(f"step {step}: Acc@0.5 {100 * acc05(pred, ev[2]):.1f}% (by shapes in the scene: {per_n})", flush=True)


if __name__ == "__main__":
    main()
