"""FrozenVLModel: one frozen base LLM + one frozen vision tower + named workflows."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from .config import ModelConfig, WorkflowConfig, parse_workflow
from .data.prompt import (
    count_placeholders,
    left_pad,
    position_ids_from_mask,
    tokenize_with_images,
)
from .families import get_family
from .families.architectures import cache_kwarg
from .families.base import IMAGE_TOKEN_ID, DecodeContext, Family
from .vision.encoder import VisionTower
from .vision.images import ImagePreprocessor

TEXT_TASK = "text"
NO_IMAGES_FOR_TEXT = "the 'text' workflow is the base LLM and takes no images; pick a multimodal task"
WEIGHTS_PATTERN = "workflow-{name}.safetensors"


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None


def _resolve(name_or_path: str | None) -> str | None:
    """Local directories are recorded as absolute paths, hub ids as given."""
    if name_or_path is None:
        return None
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if not hasattr(torch, value) or not isinstance(getattr(torch, value), torch.dtype):
        raise ValueError(f"unknown dtype {value!r} (e.g. 'float32', 'bfloat16', 'float16')")
    return getattr(torch, value)


class EncodedImageCache:
    """The last `size` images each workflow encoded (vision tower + family encoder), for inference.

    A chat sends every earlier image again with each turn; with this cache each is encoded once.
    Entries are keyed by workflow, the image's pixel bytes, and the storage and in-place version of the
    weights involved, so any weight change (an optimizer step, loading, casting) is a miss. Used
    only without autograd (generation, evaluation); `size=0` turns it off.
    """

    def __init__(self, size: int = 16):
        self.size = size
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def clear(self) -> None:
        self._store.clear()

    def get(self, task: str, modules: Sequence[nn.Module], pixel_values: torch.Tensor, encode) -> torch.Tensor:
        params = [p for m in modules for p in m.parameters()]
        if self.size <= 0 or any(p.is_inference() for p in params):
            return encode(pixel_values)  # inference tensors keep no version counter: changes would go unseen
        # storage address + in-place version of every weight: moving, casting or updating any is a miss
        version = tuple((p.data_ptr(), p._version) for p in params)
        keys = [(task, version, _digest(px)) for px in pixel_values]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # an image given twice is encoded once
        missing = [i for k, i in first.items() if k not in self._store]
        if missing:
            fresh = encode(pixel_values[missing])
            for j, i in enumerate(missing):
                self._store[keys[i]] = fresh[j]
        out = torch.stack([self._store[k] for k in keys])
        for k in keys:
            self._store.move_to_end(k)
        while len(self._store) > self.size:
            self._store.popitem(last=False)
        return out


def _digest(pixels: torch.Tensor) -> str:
    data = pixels.detach().to("cpu").contiguous()
    head = f"{tuple(data.shape)}{data.dtype}".encode()
    return hashlib.sha1(head + data.view(torch.uint8).numpy().tobytes()).hexdigest()


class FrozenVLModel(nn.Module):
    """Use :func:`frozenvl.build` or :func:`frozenvl.load` to make one."""

    def __init__(
        self,
        config: ModelConfig,
        llm: PreTrainedModel,
        tokenizer,
        vision: VisionTower | None,
    ):
        super().__init__()
        self.config = config
        self.llm = llm.requires_grad_(False).eval()
        self.vision = vision
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.workflows = nn.ModuleDict()
        self._preprocessors: dict[str, ImagePreprocessor] = {}
        self.encoded_images = EncodedImageCache()
        for name, wf in config.workflows.items():
            self._attach(name, wf)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        llm: str,
        vision: str | None = None,
        workflows: dict[str, dict[str, Any] | WorkflowConfig] | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | torch.device | None = None,
    ) -> "FrozenVLModel":
        dt = _dtype(dtype)
        config = ModelConfig(
            llm=_resolve(llm),
            vision=_resolve(vision),
            workflows=dict(workflows or {}),
            dtype=str(dt).removeprefix("torch.") if dt is not None else None,
            attn_implementation=attn_implementation,
        )
        needs_vision = any(get_family(wf.family).uses_images for wf in config.workflows.values())
        if needs_vision and config.vision is None:
            raise ValueError("these workflows take images: give a vision encoder (vision=hub id or local dir)")
        kwargs: dict[str, Any] = {}
        if dt is not None:
            kwargs["dtype"] = dt
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        base = AutoModelForCausalLM.from_pretrained(config.llm, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(config.llm)
        tower = (
            VisionTower.from_pretrained(config.vision, dtype=dt, attn_implementation=attn_implementation)
            if config.vision
            else None
        )
        model = cls(config, base, tokenizer, tower)
        return model.to(device) if device is not None else model

    def _attach(self, name: str, wf: WorkflowConfig) -> Family:
        family_cls = get_family(wf.family)
        vision_hidden = self.vision.hidden_size if self.vision is not None else None
        if family_cls.uses_images and self.vision is None:
            raise ValueError(f"workflow {name!r} ({wf.family}) takes images but the model has no vision encoder")
        module = family_cls(wf, self.llm, vision_hidden).to(self.llm.device)
        if module.extra_tokens():
            module.set_token_ids(self._add_tokens(module.extra_tokens()))
        self.workflows[name] = module
        self.config.workflows[name] = wf
        self.encoded_images.clear()
        return module

    def _add_tokens(self, tokens: list[str]) -> list[int]:
        """Add special tokens to the shared tokenizer (a no-op for those it has) and return their ids.
        Text without these strings tokenizes exactly as before, so `text` is unaffected."""
        new = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if new:
            self.tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        return self.tokenizer.convert_tokens_to_ids(tokens)

    def add_workflow(self, name: str, workflow: dict[str, Any] | WorkflowConfig) -> Family:
        """Add a new, freshly initialised workflow to a running model."""
        if name in self.workflows:
            raise ValueError(f"workflow {name!r} exists already; workflows: {self.tasks}")
        return self._attach(name, parse_workflow(name, workflow))

    @property
    def tasks(self) -> list[str]:
        return [TEXT_TASK, *self.workflows.keys()]

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def workflow(self, task: str) -> Family:
        if task == TEXT_TASK:
            raise ValueError("the 'text' workflow is the base LLM itself and has no family module")
        try:
            return self.workflows[task]
        except KeyError:
            raise ValueError(f"unknown task {task!r}; available tasks: {self.tasks}") from None

    def _check_task(self, task: str) -> None:
        if task != TEXT_TASK and task not in self.workflows:
            raise ValueError(f"unknown task {task!r}; available tasks: {self.tasks}")

    def train(self, mode: bool = True) -> "FrozenVLModel":
        # The frozen base stays in eval mode (no dropout) whatever the workflows do.
        super().train(mode)
        self.llm.eval()
        if self.vision is not None:
            self.vision.eval()
        return self

    def trainable_parameters(self, task: str) -> list[nn.Parameter]:
        """Every parameter the workflow owns (what an optimizer for it should hold)."""
        return [p for ps in self.workflow(task).parts().values() for p in ps]

    # ------------------------------------------------------------------ images
    def preprocessor(self, task: str) -> ImagePreprocessor:
        mode = self.workflow(task).cfg.image_mode
        if mode not in self._preprocessors:
            self._preprocessors[mode] = ImagePreprocessor.from_pretrained(
                self.config.vision, vision_config=self.vision.config, mode=mode
            )
        return self._preprocessors[mode]

    def tokens_per_image(self, task: str) -> int:
        if task == TEXT_TASK or self.vision is None:
            return 0
        family = self.workflow(task)
        return family.image_tokens_per_image(self.vision.num_tokens(family.cfg.keep_cls))

    def pixel_values(self, images: Any, task: str) -> torch.Tensor | None:
        """PIL images / paths / bytes (flat or one list per sample), or a ready [N,3,H,W] tensor."""
        if images is None:
            return None
        if isinstance(images, torch.Tensor):
            return images
        flat = _flatten(images)
        if not flat:
            return None
        return self.preprocessor(task)(flat)

    def _images_in(self, images: Any, n_rows: int, task: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values, image_rows) from user `images`: a ready tensor, a flat list, or one list per row."""
        if images is None:
            return None, None
        if task == TEXT_TASK:
            raise ValueError(NO_IMAGES_FOR_TEXT)
        if isinstance(images, torch.Tensor):
            return images, None
        rows = None
        if n_rows > 1 and _is_per_sample(images, n_rows):
            rows = torch.tensor([r for r, imgs in enumerate(images) for _ in imgs], dtype=torch.long)
        return self.pixel_values(images, task), rows

    def _image_embeds(self, task: str, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        if pixel_values is None:
            return None
        family = self.workflow(task)
        if not family.uses_images:
            raise ValueError(f"workflow {task!r} ({family.cfg.family}) takes no images")

        frames = pixel_values.shape[1] if pixel_values.dim() == 5 else None  # [n, frames, 3, H, W]: videos
        if frames is not None and frames > family.max_frames():
            options = [f.name for f in dataclasses.fields(family.cfg) if f.name.endswith("max_frames")]
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} hold {frames} frames per medium; workflow "
                f"{task!r} ({family.cfg.family}) takes at most {family.max_frames()}"
                + (f" (its config option: {', '.join(options)})" if options else "")
            )

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            flat = pixels.flatten(0, 1) if frames is not None else pixels
            feats = self.vision(flat, select_layer=family.cfg.select_layer, keep_cls=family.cfg.keep_cls)
            if frames is not None:
                feats = feats.view(pixels.shape[0], frames, *feats.shape[1:])
            return family.encode_images(feats)

        if torch.is_grad_enabled() or pixel_values.shape[0] == 0:
            return encode(pixel_values)
        return self.encoded_images.get(task, (self.vision, family), pixel_values, encode)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: Any = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task: str = TEXT_TASK,
        past_key_values: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
    ) -> ModelOutput:
        """One forward pass of workflow `task`. `labels` (-100 = ignored) gives `.loss`.

        Images are given flat, sample after sample; `image_rows` ([n_images]) names each image's
        batch row. It can be left out when the prompts hold vision-token slots (it is read off them)
        or the batch has one row; families that keep images out of the sequence need it otherwise.
        """
        self._check_task(task)
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if position_ids is None and task != TEXT_TASK:
            # Positions skip left padding. (`text` passes None on, exactly as the bare base model gets it.)
            position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(task)
        if pixel_values is None:
            pixel_values, rows = self._images_in(images, input_ids.shape[0], task)
            image_rows = image_rows if image_rows is not None else rows
        self._check_length(input_ids, attention_mask)

        if task == TEXT_TASK:
            if pixel_values is not None or image_embeds is not None:
                raise ValueError(NO_IMAGES_FOR_TEXT)
            if (input_ids == IMAGE_TOKEN_ID).any():
                raise ValueError("the 'text' workflow got image placeholders in input_ids")
            vocab = self.llm.get_input_embeddings().num_embeddings
            if int(input_ids.max()) >= vocab:
                raise ValueError(
                    f"the 'text' workflow got token id {int(input_ids.max())}, beyond the base vocabulary ({vocab}): "
                    "tokens a workflow added (e.g. <|endofchunk|>) belong to that workflow"
                )
            out = self.llm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{cache_kwarg(type(self.llm).forward): past_key_values},  # `cache` from transformers 5.24
            )
            logits = out.logits
        else:
            family = self.workflow(task)
            if image_embeds is None:
                image_embeds = self._image_embeds(task, pixel_values)
            if image_embeds is None and (input_ids == IMAGE_TOKEN_ID).any():
                raise ValueError("input_ids hold image placeholders but no images were given")
            h = family.embed(input_ids, image_embeds)
            ctx = DecodeContext(
                attention_mask=attention_mask,
                position_ids=position_ids.to(self.device),
                cache=past_key_values,
                image_mask=input_ids == IMAGE_TOKEN_ID,
            )
            ctx.state["image_embeds"] = image_embeds
            if image_embeds is not None:
                ctx.state["image_rows"] = self._image_rows(input_ids, image_embeds.shape[0], task, image_rows)
            h = family.decode(h, ctx)
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            logits = family.lm_head(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, past_key_values=past_key_values if use_cache else None)

    def _image_rows(
        self, input_ids: torch.Tensor, n_images: int, task: str, given: torch.Tensor | None
    ) -> torch.Tensor | None:
        if given is not None:
            given = torch.as_tensor(given, device=input_ids.device, dtype=torch.long)
            if given.shape != (n_images,) or (n_images and int(given.max()) >= input_ids.shape[0]):
                raise ValueError(f"image_rows {given.tolist()} does not fit {n_images} images in {input_ids.shape[0]} rows")
            return given
        if input_ids.shape[0] == 1:
            return torch.zeros(n_images, dtype=torch.long, device=input_ids.device)
        n_tok = self.tokens_per_image(task)
        if n_tok:
            per_row = (input_ids == IMAGE_TOKEN_ID).sum(-1) // n_tok
            if int(per_row.sum()) == n_images:
                return torch.repeat_interleave(torch.arange(len(per_row), device=input_ids.device), per_row)
            return None  # the splice reports the mismatch with its own message
        raise ValueError(
            f"workflow {task!r} keeps images out of the token sequence, so which of the {input_ids.shape[0]} rows "
            f"each of the {n_images} images belongs to is unknown: pass image_rows (prepare_inputs and the "
            "data collator return it), or images as one list per prompt"
        )

    def new_cache(self, task: str) -> DynamicCache:
        if task == TEXT_TASK:
            return DynamicCache(config=self.llm.config)
        return self.workflow(task).new_cache()

    def _check_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        total = attention_mask.shape[1]
        if limit is not None and total > limit:
            raise ValueError(
                f"sequence of {total} tokens (images included) exceeds the LLM's max_position_embeddings={limit}"
            )

    # ------------------------------------------------------------------ prompts
    def prepare_inputs(
        self,
        prompts: str | Sequence[str],
        images: Any = None,
        task: str = TEXT_TASK,
        *,
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """Tokenize prompts (with `<image>` placeholders), left-pad, and preprocess images.

        `images`: for one prompt, a list of its images; for several prompts, one list per prompt.
        """
        self._check_task(task)
        if isinstance(prompts, str):
            prompts = [prompts]
            images = [images] if images is not None and not _is_per_sample(images, 1) else images
        per_sample = _per_sample_images(images, len(prompts))
        n_tok = self.tokens_per_image(task)
        seqs = []
        for i, (text, imgs) in enumerate(zip(prompts, per_sample)):
            n_ph = count_placeholders(text)
            if task == TEXT_TASK and (n_ph or imgs):
                raise ValueError(f"prompt {i}: the 'text' workflow takes no images or <image> placeholders")
            if n_ph != len(imgs):
                raise ValueError(f"prompt {i} has {n_ph} <image> placeholder(s) but {len(imgs)} image(s) were given")
            seqs.append(tokenize_with_images(self.tokenizer, text, n_tok, add_special_tokens=add_special_tokens))
        input_ids, attention_mask = left_pad(seqs, self.tokenizer.pad_token_id)
        flat = [img for imgs in per_sample for img in imgs]
        pixel_values = self.pixel_values(flat, task) if flat else None
        image_rows = torch.tensor([row for row, imgs in enumerate(per_sample) for _ in imgs], dtype=torch.long)
        self._check_length(input_ids, attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_rows": image_rows if flat else None}

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; use generate() with a plain prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: Any = None,
        pixel_values: torch.Tensor | None = None,
        task: str = TEXT_TASK,
        prompt: str | Sequence[str] | None = None,
        image_rows: torch.Tensor | None = None,
        **gen_kwargs: Any,
    ) -> torch.Tensor:
        """Generate new tokens; returns [B, new_tokens] (rows finished early are padded)."""
        from .generation import GenerationConfig, generate

        if task == TEXT_TASK and pixel_values is not None:
            raise ValueError(NO_IMAGES_FOR_TEXT)
        if prompt is not None:
            inputs = self.prepare_inputs(prompt, images, task)
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
            pixel_values, image_rows = inputs["pixel_values"], inputs["image_rows"]
        if input_ids is None:
            raise ValueError("give input_ids or prompt")
        if pixel_values is None:
            pixel_values, rows = self._images_in(images, input_ids.shape[0], task)
            image_rows = image_rows if image_rows is not None else rows
        cfg = GenerationConfig.make(self, **gen_kwargs)
        input_ids = input_ids.to(self.device)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        if pixel_values is not None:
            image_rows = self._image_rows(input_ids, pixel_values.shape[0], task, image_rows)
        n_per_row = (
            torch.bincount(image_rows.cpu(), minlength=input_ids.shape[0])
            if image_rows is not None
            else torch.zeros(input_ids.shape[0], dtype=torch.long)
        )
        has_image = (n_per_row > 0).to(input_ids.device)
        if task != TEXT_TASK and self.workflow(task).cfg.text_fallback and 0 < int(has_image.sum()) < len(has_image):
            # A batch mixing image and image-free rows: each group runs its own workflow, so every
            # row gets exactly what it would get alone.
            out = torch.full((len(has_image), cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long)
            new_index = torch.cumsum(has_image.long(), 0) - 1  # row -> its index among image rows
            groups = ((has_image, task, pixel_values, new_index[image_rows.to(has_image.device)]),
                      (~has_image, TEXT_TASK, None, None))
            width = 0
            for rows, t, pv, rows_of_images in groups:
                part = generate(self, input_ids[rows], attention_mask[rows], pv, t, cfg, image_rows=rows_of_images).cpu()
                out[rows.cpu(), : part.shape[1]] = part
                width = max(width, part.shape[1])
            return out[:, :width].to(input_ids.device)
        task = self.route(task, input_ids, pixel_values)
        return generate(self, input_ids, attention_mask, pixel_values, task, cfg, image_rows=image_rows)

    def route(self, task: str, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> str:
        """The workflow that answers a request: `text` for an image-free request to a workflow with
        `text_fallback` (the default for frozen-LLM workflows), else `task` itself."""
        self._check_task(task)
        if task == TEXT_TASK or pixel_values is not None or (input_ids == IMAGE_TOKEN_ID).any():
            return task
        return TEXT_TASK if self.workflow(task).cfg.text_fallback else task

    def stream(
        self, prompt: str, images: Any = None, task: str = TEXT_TASK, *, add_special_tokens: bool = True,
        **gen_kwargs: Any,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece."""
        from .generation import GenerationConfig, stream_text

        inputs = self.prepare_inputs(prompt, images, task, add_special_tokens=add_special_tokens)
        cfg = GenerationConfig.make(self, **gen_kwargs)
        task = self.route(task, inputs["input_ids"], inputs["pixel_values"])
        return stream_text(self, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], task, cfg,
                           image_rows=inputs["image_rows"])

    def chat(
        self,
        messages: list[dict[str, Any]],
        images: Any = None,
        task: str = TEXT_TASK,
        *,
        stream: bool = False,
        **gen_kwargs: Any,
    ) -> str | Iterator[str]:
        """Render `messages` with the tokenizer's chat template and answer; `<image>` marks where images go."""
        # The template writes its own special tokens (bos included): none are added on top.
        pieces = self.stream(self.render_chat(messages), images, task, add_special_tokens=False, **gen_kwargs)
        return pieces if stream else "".join(pieces)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike, tasks: Sequence[str] | None = None) -> None:
        """Write frozenvl.json and one safetensors file per workflow, holding only its own weights."""
        os.makedirs(directory, exist_ok=True)
        names = list(tasks) if tasks is not None else list(self.workflows.keys())
        for name in names:
            state = {k: v.contiguous().cpu() for k, v in self.workflow(name).owned_state_dict().items()}
            save_file(state, os.path.join(directory, WEIGHTS_PATTERN.format(name=name)), metadata={"format": "pt"})
        cfg = ModelConfig.from_dict(self.config.to_dict())
        cfg.workflows = {n: cfg.workflows[n] for n in names}
        # Base models stored inside the model dir are recorded relative to it, so the dir can move.
        cfg.llm, cfg.vision = _relative_to(cfg.llm, directory), _relative_to(cfg.vision, directory)
        cfg.save(directory)

    def load_workflow(self, directory: str | os.PathLike, name: str, as_name: str | None = None) -> Family:
        """Load workflow `name` saved in `directory` into this running model (as `as_name`)."""
        saved = ModelConfig.load(directory)
        if name not in saved.workflows:
            raise ValueError(f"{directory} has no workflow {name!r}; it has {sorted(saved.workflows)}")
        target = as_name or name
        if target in self.workflows:
            del self.workflows[target]
        family = self._attach(target, saved.workflows[name])
        _load_weights(family, os.path.join(directory, WEIGHTS_PATTERN.format(name=name)))
        return family

    def info(self) -> dict[str, Any]:
        """Workflows, families and parameter counts (trainable = owned by a workflow)."""
        base = sum(p.numel() for p in self.llm.parameters())
        vis = sum(p.numel() for p in self.vision.parameters()) if self.vision is not None else 0
        return {
            "llm": self.config.llm,
            "vision": self.config.vision,
            "frozen_llm_params": base,
            "frozen_vision_params": vis,
            "workflows": {
                TEXT_TASK: {"family": "base LLM", "trainable_params": 0},
                **{
                    name: {
                        "family": wf.cfg.family,
                        "trainable_params": sum(p.numel() for p in self.trainable_parameters(name)),
                        "parts": {k: sum(p.numel() for p in v) for k, v in wf.parts().items()},
                    }
                    for name, wf in self.workflows.items()
                },
            },
        }


def load(directory: str | os.PathLike, *, dtype=None, device=None, attn_implementation=None) -> FrozenVLModel:
    """Open a frozenvl model directory: base models from the recorded ids/paths, workflows from safetensors."""
    cfg = ModelConfig.load(directory)
    cfg.llm, cfg.vision = _inside(cfg.llm, directory), _inside(cfg.vision, directory)
    model = FrozenVLModel.build(
        cfg.llm,
        cfg.vision,
        workflows={},
        dtype=dtype if dtype is not None else cfg.dtype,
        attn_implementation=attn_implementation or cfg.attn_implementation,
    )
    for name in cfg.workflows:
        model.load_workflow(directory, name)
    return model.to(device) if device is not None else model


def _relative_to(path: str | None, directory: str | os.PathLike) -> str | None:
    if path is None or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, os.path.abspath(directory))
    return rel if not rel.startswith("..") else path


def _inside(path: str | None, directory: str | os.PathLike) -> str | None:
    if path is None or os.path.isabs(path):
        return path
    local = os.path.join(os.path.abspath(directory), path)
    return local if os.path.isdir(local) else path


def _load_weights(family: Family, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} is missing")
    state = load_file(path, device=str(next(family.parameters()).device))
    expected = family.owned_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the workflow: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    params = dict(family.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not -100."""
    labels = labels.to(logits.device)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if not (shift_labels != -100).any():
        return shift_logits.sum() * 0.0  # nothing to learn here; keep the graph, no NaN
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100)


def _flatten(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [x for item in images for x in _flatten(item)]
    return [images]


def _is_per_sample(images: Any, n: int) -> bool:
    return isinstance(images, (list, tuple)) and len(images) == n and all(isinstance(x, (list, tuple)) for x in images)


def _per_sample_images(images: Any, n: int) -> list[list[Any]]:
    if images is None:
        return [[] for _ in range(n)]
    if _is_per_sample(images, n):
        return [list(x) for x in images]
    if n == 1:
        return [_flatten(images)]
    raise ValueError(f"{n} prompts: give images as a list of {n} lists (one per prompt, empty for none)")
