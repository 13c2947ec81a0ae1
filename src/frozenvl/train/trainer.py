"""Staged training of one workflow on a frozen base, on HF accelerate.

Design points:
- Only the workflow's parameters are optimised; the base LLM and the vision tower stay frozen and
  in eval mode, and their checksum is verified at the end.
- The loss of an optimizer step is the mean over all label tokens of the whole global batch (every
  micro-batch of every process), so N processes with batch b train exactly like one with N*b.
- The data order is a pure function of (seed, stage, epoch): a resumed run skips what was consumed
  and continues bit for bit as if never stopped.
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import ConfigError
from ..losses import label_positions, selected_lm_loss
from ..model import FrozenVLModel
from . import checkpoint as ckpt
from .config import StageConfig, TrainConfig
from .feature_memo import VisionFeatureMemo
from .precision import MasterWeights


@dataclass
class TrainResult:
    output_dir: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0
    base_unchanged: bool = True
    final_loss: float | None = None
    resumed_from: str | None = None

    def summary(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"steps {self.steps} | label tokens {self.tokens} | {self.seconds:.1f}s | "
            f"skipped samples: {skipped} | base weights unchanged: {'yes' if self.base_unchanged else 'NO'}"
        )


def base_checksum(model: FrozenVLModel) -> str:
    """SHA-256 over the frozen base LLM's and vision tower's weights."""
    h = hashlib.sha256()
    modules = [("llm", model.llm)] + ([("vision", model.vision)] if model.vision is not None else [])
    for prefix, module in modules:
        for name, t in module.state_dict().items():
            h.update(f"{prefix}.{name}".encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _allow_precision(mixed_precision: str) -> None:
    """accelerate keeps the first Accelerator's precision for the whole process and refuses another;
    a later run in the same process (a notebook, a test session) may pick its own. Only the
    precision state is dropped: the process group and device (PartialState) stay."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def select_parameters(family: nn.Module, selectors: list[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Resolve a stage's `train` list: family part names, or fnmatch patterns over parameter names."""
    parts = family.parts()
    owned = {id(p) for ps in parts.values() for p in ps}
    # Only the workflow's own parameters can be selected (a LoRA copy also reaches shared base tensors).
    named = [(n, p) for n, p in family.named_parameters() if id(p) in owned]
    by_id = {id(p): n for n, p in named}
    chosen: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for sel in selectors:
        if sel in parts:
            chosen[sel] = [(by_id[id(p)], p) for p in parts[sel]]
        else:
            hits = [(n, p) for n, p in named if fnmatch.fnmatch(n, sel)]
            if not hits:
                raise ConfigError(
                    f"train entry {sel!r} is neither a part of this family ({sorted(parts)}) nor a pattern "
                    "matching any of its parameter names"
                )
            chosen[sel] = hits
    return chosen


def _lr_for(selector: str, lr: float | dict[str, float], stage: str) -> float:
    if isinstance(lr, dict):
        if selector not in lr:
            raise ConfigError(f"stage {stage!r}: lr has no entry for {selector!r} (it has {sorted(lr)})")
        return float(lr[selector])
    return float(lr)


def enable_gradient_checkpointing(model: FrozenVLModel) -> None:
    """Recompute every decoder layer (frozen and inserted) in backward, for every workflow."""
    for family in model.workflows.values():
        family.gradient_checkpointing = True


class Trainer:
    """Trains `cfg.workflow` through `cfg.stages`; see :func:`train` for the one-call entry point."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: FrozenVLModel | None = None,
        show_progress: bool = True,
        callbacks: list[Callable[[Trainer, ckpt.Position], None]] | None = None,
    ):
        self.cfg = cfg
        self.callbacks = list(callbacks or [])  # called after every optimizer step (and its checkpoint)
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        # accelerate only sets up multi-process CPU runs (gloo) when told it is on CPU.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        # Parameters may go unused in a step (the connector on a text-only micro-batch).
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        mixed = "no" if precision == "fp32" else precision
        _allow_precision(mixed)
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=multi_cpu, kwargs_handlers=[ddp])
        self.show_progress = show_progress and self.accelerator.is_main_process
        set_seed(cfg.seed)
        self.task = cfg.workflow_name
        if model is None:
            model = FrozenVLModel.build(cfg.llm, cfg.vision, workflows={}, dtype=cfg.dtype)
        # Before the workflow is attached: a family that touched the base while being built is caught.
        # (A model handed in with the workflow already attached can only be checked from here on.)
        self.base_checksum_before = base_checksum(model)
        if self.task not in model.workflows:
            if cfg.init_from:
                model.load_workflow(cfg.init_from, self.task)
            else:
                model.add_workflow(self.task, cfg.workflow_config())
        self.model = model.to(self.accelerator.device)
        self.family = model.workflow(self.task)
        # fp32 masters of the trainable weights while training under autocast; the base's dtype outside.
        self.masters = MasterWeights(self.family, enabled=precision != "fp32")
        if precision == "fp32" and model.llm.dtype in (torch.float16, torch.bfloat16):
            raise ConfigError(
                f"the base is loaded in {model.llm.dtype} but precision is fp32: use precision bf16/fp16 "
                "(autocast, fp32 trainable weights) or load the base in float32"
            )
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.dataset = self._dataset()
        # each image's frozen vision features, kept after first use (docs/training.md, "Speed")
        self.feature_memo = (VisionFeatureMemo(cfg.data.feature_cache_mb * 2**20)
                             if cfg.data.feature_cache_mb > 0 and self.model.caches_vision_features(self.task) else None)
        self.sample_weights = sample_weights(self.dataset, cfg.task_weights)
        # The plain mean over label tokens keeps its own (bit-exact, earlier) arithmetic.
        self.uniform_loss = cfg.loss_weighting == "token" and all(w == 1.0 for w in self.sample_weights)

    # ------------------------------------------------------------------ data
    def _dataset(self):
        from ..data.dataset import ConversationDataset

        d = self.cfg.data
        m = self.model
        return ConversationDataset(
            d.train,
            tokenizer=m.tokenizer,
            tokens_per_image=m.tokens_per_image(self.task),
            preprocessor=(m.preprocessor(self.task)
                          if m.vision is not None or m.pixel_embedding(self.task) is not None else None),
            image_root=d.image_root,
            max_length=d.max_length,
            truncation=d.truncation,
            on_bad_sample=d.on_bad_sample,
            tiles_in_sequence=not m.workflow(self.task).tiles_as_media,
        )

    def _epoch_order(self, stage_idx: int, epoch: int, global_micro: int) -> list[list[int]]:
        """Global micro-batches (lists of dataset indices) of one epoch; a pure function of the seed."""
        seed = self.cfg.seed * 1_000_003 + stage_idx * 1009 + epoch
        if self.cfg.data.group_by == "modality_length":
            from ..data.dataset import ModalityLengthGroupedSampler

            sampler = ModalityLengthGroupedSampler(
                self.dataset.lengths, self.dataset.has_image, global_micro, seed=seed, shuffle=True
            )
            order = list(iter(sampler))
        else:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
        batches = [order[i : i + global_micro] for i in range(0, len(order), global_micro)]
        world = self.accelerator.num_processes
        if world > 1 and batches and len(batches[-1]) < global_micro:
            batches = batches[:-1]  # every process needs a share of every micro-batch
        if not batches:
            raise ConfigError(
                f"{len(self.dataset)} usable samples do not fill one global micro-batch of {global_micro} "
                f"({world} processes x batch_size): lower batch_size or use fewer processes"
            )
        return batches

    def _steps_per_epoch(self, stage: StageConfig) -> int:
        n, world = len(self.dataset), self.accelerator.num_processes
        global_micro = stage.batch_size * world
        micro = n // global_micro if world > 1 else math.ceil(n / global_micro)
        return max(1, math.ceil(micro / stage.grad_accum))

    def _load_micro(self, indices: list[int], stage: StageConfig) -> dict[str, Any] | None:
        from ..data.dataset import collate

        r = self.accelerator.process_index
        mine = indices[r * stage.batch_size : (r + 1) * stage.batch_size]
        memo = self.feature_memo
        # a sample whose every image has its features kept is not read from disk again
        items = [self.dataset.item(i, pixels=memo is None or not memo.has_all(self.dataset.image_paths[i]))
                 for i in mine]
        batch = collate(items, self.model.tokenizer.pad_token_id)
        if batch is None:
            return None
        # collate drops broken samples: so do their weights
        kept = [i for i, it in zip(mine, items) if it is not None]
        batch["loss_weights"] = torch.tensor([self.sample_weights[i] for i in kept], dtype=torch.float32)
        if memo is not None and any(self.dataset.image_paths[i] for i in kept):
            self._kept_features(batch, kept)
        return batch

    def _kept_features(self, batch: dict[str, Any], kept: list[int]) -> None:
        """Replace the batch's pixels by every image's vision features, in order: kept ones from the
        memo, the others encoded now (one tower call) and kept."""
        from ..inputs import rows_from_counts

        memo, paths = self.feature_memo, [self.dataset.image_paths[i] for i in kept]
        fresh = [p for ps in paths if not memo.has_all(ps) for p in ps]  # the images collate holds pixels of
        encoded = {}
        if fresh:
            # under the step's autocast, so kept features equal the ones the step would compute
            with self.accelerator.autocast():
                feats = self.model.vision_features(self.task, batch["pixel_values"].to(self.accelerator.device))
            for p, f in zip(fresh, feats.cpu()):  # kept in host memory: the bound is not taken from a GPU
                encoded[p] = f
                memo.put(p, f)
        memo.misses += len(fresh)
        memo.hits += sum(len(ps) for ps in paths) - len(fresh)
        batch["vision_features"] = torch.stack([encoded[p] if p in encoded else memo.get(p) for ps in paths for p in ps])
        batch["pixel_values"] = None
        batch["image_rows"] = rows_from_counts([len(ps) for ps in paths])

    def token_weights(self, batch: dict[str, Any]) -> torch.Tensor:
        """The weight of every next-token target of `batch` ((B, L-1), 0 where unlabelled): the
        sample's weight, divided by its number of label tokens with ``loss_weighting: sample``."""
        mask = (batch["labels"][:, 1:] != -100).float()
        w = batch["loss_weights"][:, None].to(mask) * mask
        if self.cfg.loss_weighting == "sample":
            w = w / mask.sum(1, keepdim=True).clamp(min=1.0)
        return w

    # ------------------------------------------------------------------ stage set-up
    def _setup_stage(self, stage_idx: int):
        stage = self.cfg.stages[stage_idx]
        chosen = select_parameters(self.family, stage.train)
        self.family.requires_grad_(False)
        groups, seen = [], set()
        for sel, named in chosen.items():
            params = [p for _, p in named if id(p) not in seen]
            seen.update(id(p) for p in params)
            for p in params:
                p.requires_grad_(True)
            if params:
                groups.append({"params": params, "lr": _lr_for(sel, stage.lr, stage.name), "name": sel})
        # Prepared, so that fp16 loss scaling (unscale before clipping, skip on overflow) works.
        optimizer = self.accelerator.prepare_optimizer(
            torch.optim.AdamW(groups, weight_decay=stage.weight_decay), device_placement=False
        )
        per_epoch = self._steps_per_epoch(stage)
        total = stage.steps if stage.steps is not None else max(1, math.ceil(stage.epochs * per_epoch))
        scheduler = get_scheduler(
            stage.schedule if stage.schedule != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=int(stage.warmup_ratio * total),
            num_training_steps=total,
        )
        params = [p for g in groups for p in g["params"]]
        if self.accelerator.num_processes > 1:
            ddp = self.accelerator.prepare_model(self.model, device_placement=False)
        else:
            ddp = self.model
        return stage, optimizer, scheduler, params, total, per_epoch, ddp

    # ------------------------------------------------------------------ one step
    def _step(self, ddp, micro_batches, stage, optimizer, scheduler, params) -> tuple[float, int]:
        acc = self.accelerator
        device = acc.device
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches if b is not None)
        global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=device), "sum").item())
        if global_tokens == 0:
            return float("nan"), 0
        weights = None if self.uniform_loss else [None if b is None else self.token_weights(b) for b in micro_batches]
        if weights is None:
            norm = float(global_tokens)
        else:  # the weighted mean: divided by the sum of the weights of every label token of the step
            local = sum(float(w.sum()) for w in weights if w is not None)
            norm = float(acc.reduce(torch.tensor(local, device=device, dtype=torch.float64), "sum").item())
        scale = acc.num_processes / norm  # DDP averages gradients over processes
        weight_of = {id(b): w for b, w in zip(micro_batches, weights or [])}
        loss_sum = torch.zeros((), device=device)
        live = [b for b in micro_batches if b is not None] or [None]
        for k, batch in enumerate(live):
            sync = k == len(live) - 1
            ctx = acc.no_sync(ddp) if (not sync and acc.num_processes > 1) else nullcontext()
            with ctx, acc.autocast():
                if batch is None:
                    # Nothing for this process in this step: a zero loss still joins the gradient sync.
                    loss = sum(p.sum() for p in params) * 0.0
                else:
                    # logits only where a label is predicted (docs/training.md, "Speed")
                    keep, targets = label_positions(batch["labels"])
                    out = ddp(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
                        vision_features=batch.get("vision_features"),
                        image_rows=batch.get("image_rows"),
                        task=self.task,
                        logits_mask=keep.to(device),
                    )
                    if weights is None:
                        loss = selected_lm_loss(out.logits, targets, reduction="sum")
                    else:
                        per_token = selected_lm_loss(out.logits, targets, reduction="none")
                        loss = (per_token * weight_of[id(batch)][keep[:, :-1]].to(device)).sum()
                    loss_sum += loss.detach()
                    if not loss.requires_grad:
                        # Only text rows and only the connector trained (prefix): nothing trained took part.
                        loss = loss + sum(p.sum() for p in params) * 0.0
                acc.backward(loss * scale)
        if stage.max_grad_norm:
            acc.clip_grad_norm_(params, stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss = acc.reduce(loss_sum, "sum").item() / norm
        return total_loss, global_tokens

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, optimizer, scheduler, position: ckpt.Position) -> None:
        acc = self.accelerator
        tmp = None
        if acc.is_main_process:
            tmp = ckpt.begin(self.cfg.output_dir, position.global_step)
        acc.wait_for_everyone()
        tmp = tmp or os.path.join(
            ckpt.checkpoint_root(self.cfg.output_dir), f"{ckpt.TMP_PREFIX}{ckpt.PREFIX}{position.global_step:08d}"
        )
        ckpt.write_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            # A model dir in the base's dtype (frozenvl.load opens it), plus the fp32 masters to resume from.
            with self.masters.build_dtype():
                self.model.save_pretrained(tmp, tasks=[self.task])
            masters = self.family.owned_state_dict() if self.masters.separate else None
            extra = {"skipped": dict(self.dataset.stats.skipped), "task": self.task}
            ckpt.write_main(tmp, masters, optimizer, scheduler, position, extra)
            ckpt.commit(tmp, self.cfg.keep_last)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ the run
    def train(self, resume: bool = False) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        os.makedirs(cfg.output_dir, exist_ok=True)
        result = TrainResult(output_dir=cfg.output_dir)
        position = ckpt.Position()
        restored = None
        if not resume and ckpt.list_checkpoints(cfg.output_dir):
            raise ConfigError(
                f"{cfg.output_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                "or choose another output_dir"
            )
        metrics = tb = None
        try:
            self.masters.to_fp32()  # before any optimizer holds the parameters or a checkpoint refills them
            if resume:
                found = ckpt.list_checkpoints(cfg.output_dir)
                if found:
                    restored = ckpt.read(found[-1], acc.process_index, acc.device)
                    position = restored["position"]
                    result.resumed_from = found[-1]
                    with torch.no_grad():
                        named = dict(self.family.named_parameters())
                        for k, v in restored["weights"].items():
                            named[k].copy_(v)
                elif acc.is_main_process:
                    print(f"--resume: no checkpoint under {ckpt.checkpoint_root(cfg.output_dir)}; starting fresh")
            metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
            if acc.is_main_process:
                _truncate_metrics(metrics_path, position.global_step)  # rows after the checkpoint are redone
            metrics = open(metrics_path, "a", encoding="utf-8") if acc.is_main_process else None
            tb = self._tensorboard()
            start = time.time()
            self.model.train()
            last_loss = None
            for stage_idx in range(position.stage, len(cfg.stages)):
                stage, optimizer, scheduler, params, total, per_epoch, ddp = self._setup_stage(stage_idx)
                if restored is not None and restored["position"].stage == stage_idx:
                    if position.stage_step > 0:  # mid-stage (a stage-end checkpoint starts the next one fresh)
                        optimizer.load_state_dict(restored["optimizer"])
                        scheduler.load_state_dict(restored["scheduler"])
                    if restored["rng"] is not None:
                        ckpt.set_rng_state(restored["rng"])
                else:
                    position = ckpt.Position(stage=stage_idx, global_step=position.global_step, tokens=position.tokens)
                bar = tqdm(total=total, initial=position.stage_step, desc=f"stage {stage.name}",
                           disable=not self.show_progress, dynamic_ncols=True)
                global_micro = stage.batch_size * acc.num_processes
                while position.stage_step < total:
                    order = self._epoch_order(stage_idx, position.epoch, global_micro)
                    steps = [order[i : i + stage.grad_accum] for i in range(0, len(order), stage.grad_accum)]
                    for step_batches in steps[position.step_in_epoch :]:
                        t0 = time.time()
                        micro = [self._load_micro(ix, stage) for ix in step_batches]
                        loss, tokens = self._step(ddp, micro, stage, optimizer, scheduler, params)
                        position.step_in_epoch += 1
                        position.stage_step += 1
                        position.global_step += 1
                        position.tokens += tokens
                        if tokens == 0:
                            result.skipped_steps += 1
                        else:
                            last_loss = loss
                        lr = scheduler.get_last_lr()[0]
                        tps = tokens / max(time.time() - t0, 1e-9)
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                        bar.update(1)
                        if metrics is not None and (position.global_step % max(1, cfg.log_every) == 0):
                            row = {"step": position.global_step, "stage": stage.name, "epoch": position.epoch,
                                   "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": tps}
                            metrics.write(json.dumps(row) + "\n")
                            metrics.flush()
                            if tb is not None:
                                tb.add_scalar("train/loss", loss, position.global_step)
                                tb.add_scalar("train/lr", lr, position.global_step)
                        if cfg.save_every and position.global_step % cfg.save_every == 0 and position.stage_step < total:
                            self._save_checkpoint(optimizer, scheduler, position)
                        for callback in self.callbacks:
                            callback(self, position)
                        if position.stage_step >= total:
                            break
                    if position.step_in_epoch == len(steps):  # the epoch is used up
                        position.epoch += 1
                        position.step_in_epoch = 0
                bar.close()
                # Stage done: the checkpoint points at the start of the next stage.
                done = ckpt.Position(stage=stage_idx + 1, global_step=position.global_step, tokens=position.tokens)
                self._save_checkpoint(optimizer, scheduler, done)
                position = done
                restored = None
        finally:
            self.masters.to_build_dtype()  # what is returned and saved runs inference in the base's dtype
            if metrics is not None:
                metrics.close()
            if tb is not None:
                tb.close()
        self.model.eval()
        result.steps = position.global_step
        result.tokens = position.tokens
        result.seconds = time.time() - start
        result.skipped = self._skipped_everywhere()
        result.final_loss = last_loss
        result.base_unchanged = base_checksum(self.model) == self.base_checksum_before
        if acc.is_main_process:
            self.model.save_pretrained(cfg.output_dir, tasks=[self.task])
            with open(os.path.join(cfg.output_dir, "train_summary.json"), "w") as f:
                json.dump(result.__dict__, f, indent=1)
        acc.wait_for_everyone()
        if acc.num_processes > 1:
            _destroy_process_group_at_exit()
        if not result.base_unchanged:
            raise RuntimeError(
                "the frozen base weights changed between loading the base and the end of training (while the "
                "workflow was attached or trained): this is a frozenvl bug"
            )
        return result

    def _skipped_everywhere(self) -> dict[str, int]:
        """Skip counts summed over processes (broken images are found by whichever process loads them)."""
        from accelerate.utils import gather_object

        mine = {k: int(v) for k, v in self.dataset.stats.skipped.items()}
        if self.accelerator.num_processes == 1:
            return mine
        total: dict[str, int] = {}
        # Found up front (missing images, overlong samples...) every process counts alike: take one;
        # found while loading (broken images) each counts its own: add them up.
        for k, v in gather_object([mine])[0].items():
            total[k] = v
        per_process = gather_object([mine.get("bad_image", 0)])
        if any(per_process):
            total["bad_image"] = sum(per_process)
        return total

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.accelerator.is_main_process):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("tensorboard is not installed; metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(os.path.join(self.cfg.output_dir, "tensorboard"))


def sample_weights(dataset, task_weights: dict[str, float] | None) -> list[float]:
    """Each sample's loss weight: its task's weight (1 for a task `task_weights` does not name)
    times its own ``loss_weight``. A named task that no sample has is an error (a typo, most likely)."""
    task_weights = task_weights or {}
    found = {t for t in dataset.tasks if t is not None}
    unknown = sorted(set(task_weights) - found)
    if unknown:
        raise ConfigError(
            f"task_weights names task(s) {unknown} that no sample of {dataset.path} has "
            f"(the samples' 'task' values: {sorted(found) or 'none'})"
        )
    return [task_weights.get(t, 1.0) * w for t, w in zip(dataset.tasks, dataset.loss_weights)]


def train(config: TrainConfig | dict | str, resume: bool = False, model: FrozenVLModel | None = None,
          show_progress: bool = True, callbacks=None) -> TrainResult:
    """Train from a TrainConfig, a dict, or a YAML path; returns the run's result and writes the model dir."""
    if isinstance(config, str):
        config = TrainConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    return Trainer(config, model=model, show_progress=show_progress, callbacks=callbacks).train(resume=resume)


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter does.

    Left to interpreter finalization, gloo's worker threads can still hold finished collectives'
    tensors; freeing them then aborts the process ("terminate called without an active exception",
    SIGABRT) after a successful run. Called only once every process reached the end of training,
    so no peer is left waiting in a collective; the group stays usable until exit (a second
    ``train`` call in the same process reuses it, and registers the hook only once).
    """
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _truncate_metrics(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows)
