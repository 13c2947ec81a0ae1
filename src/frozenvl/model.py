"""FrozenVLModel: one frozen base LLM + one frozen vision tower (optional) + named workflows."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from . import checkpoint_io, inputs
from .checkpoint_io import WEIGHTS_PATTERN  # noqa: F401  (re-exported: the file name of a workflow's weights)
from .config import ModelConfig, WorkflowConfig, parse_workflow
from .constants import IMAGE_TOKEN_ID, TEXT_TASK
from .data.prompt import position_ids_from_mask
from .families import get_family
from .families.architectures import cache_kwarg
from .families.base import DecodeContext, Family
from .image_cache import EncodedImageCache
from .inputs import NO_IMAGES_FOR_TEXT
from .losses import causal_lm_loss
from .vision.connectors import add_layout_embeddings, layout_embeddings, takes_pixels
from .vision.encoder import VisionTower
from .vision.images import ImagePreprocessor
from .vision.mixed import MixedVisionTower, build_vision, map_paths, primary_path
from .vision.tiling import TiledMedia, TiledPixels, TiledPreprocessor, arrange_tokens


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


class FrozenVLModel(nn.Module):
    """Use :func:`frozenvl.build` or :func:`frozenvl.load` to make one."""

    def __init__(
        self,
        config: ModelConfig,
        llm: PreTrainedModel,
        tokenizer,
        vision: VisionTower | MixedVisionTower | None,
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
        # The Rust tokenizer's truncation/padding settings are shared mutable state: frozenvl's own
        # tokenizer calls on the inference path take this lock (see docs/architecture.md, thread safety).
        self._tokenizer_lock = threading.RLock()
        self._preprocessors_lock = threading.Lock()
        for name, wf in config.workflows.items():
            self._attach(name, wf)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        llm: str,
        vision: str | list[str | dict[str, Any]] | None = None,
        workflows: dict[str, dict[str, Any] | WorkflowConfig] | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | torch.device | None = None,
    ) -> FrozenVLModel:
        dt = _dtype(dtype)
        config = ModelConfig(
            llm=_resolve(llm),
            vision=map_paths(vision, _resolve),
            workflows=dict(workflows or {}),
            dtype=str(dt).removeprefix("torch.") if dt is not None else None,
            attn_implementation=attn_implementation,
        )
        needs_vision = [n for n, wf in config.workflows.items() if _needs_vision_tower(wf)]
        if needs_vision and config.vision is None:
            raise ValueError(
                f"workflow(s) {needs_vision} take images through a vision encoder: give one (vision=hub id or local "
                "dir), or use a connector that embeds pixels itself (connector: monolithic)"
            )
        kwargs: dict[str, Any] = {}
        if dt is not None:
            kwargs["dtype"] = dt
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        base = AutoModelForCausalLM.from_pretrained(config.llm, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(config.llm)
        tower = build_vision(config.vision, dt, attn_implementation) if config.vision else None
        model = cls(config, base, tokenizer, tower)
        return model.to(device) if device is not None else model

    def _attach(self, name: str, wf: WorkflowConfig) -> Family:
        family_cls = get_family(wf.family)
        vision_hidden = self.vision.hidden_size if self.vision is not None else None
        if _needs_vision_tower(wf) and self.vision is None:
            raise ValueError(
                f"workflow {name!r} ({wf.family}, connector {wf.connector!r}) takes images through a vision encoder "
                "but the model has none (connector: monolithic embeds pixels itself)"
            )
        module = family_cls(wf, self.llm, vision_hidden).to(self.llm.device)
        if wf.tiling is not None and not module.tiles_as_media:
            if type(module).embed is not Family.embed or module.connector is None:
                raise ValueError(
                    f"workflow {name!r}: tiling needs a family that splices image tokens into the sequence "
                    f"(prefix, inner_adaptor, ...) or reads them by cross-attention; {wf.family} does neither"
                )
            add_layout_embeddings(module.connector, wf.image_newline, wf.skip_token)
        if module.extra_tokens():
            module.set_token_ids(self._add_tokens(module.extra_tokens()))
        if module.location_tokens():
            module.set_location_ids(self._add_tokens(module.location_tokens(), special=False))
        self.workflows[name] = module
        self.config.workflows[name] = wf
        self.encoded_images.clear()
        return module

    def _add_tokens(self, tokens: list[str], *, special: bool = True) -> list[int]:
        """Add tokens to the shared tokenizer (a no-op for those it has) and return their ids: special
        ones (decoding with skip_special_tokens drops them) or plain ones (kept in decoded text).
        Text without these strings tokenizes exactly as before, so `text` is unaffected."""
        from tokenizers import AddedToken

        new = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if new and special:
            self.tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        elif new:
            self.tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
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

    def train(self, mode: bool = True) -> FrozenVLModel:
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
    def pixel_embedding(self, task: str) -> nn.Module | None:
        """The workflow's connector when it embeds pixels itself (`monolithic`), else None.

        The one switch between the two ways images enter: such a workflow's images skip the vision
        tower (there may be none) and get the embedding's own preprocessing and patch grid."""
        if task == TEXT_TASK:
            return None
        connector = self.workflow(task).connector
        return connector if getattr(connector, "takes_pixels", False) else None

    def preprocessor(self, task: str) -> ImagePreprocessor | TiledPreprocessor:
        cfg = self.workflow(task).cfg
        mode = cfg.image_mode
        own = self.pixel_embedding(task)
        key = mode if own is None else (mode, own.image_size)
        with self._preprocessors_lock:  # built once per mode, also when threads ask at the same time
            if key not in self._preprocessors:
                self._preprocessors[key] = (
                    own.preprocessor(mode) if own is not None
                    else ImagePreprocessor.from_pretrained(primary_path(self.config.vision),
                                                           vision_config=self.vision.config, mode=mode)
                )
            base = self._preprocessors[key]
        if cfg.tiling is None:
            return base
        return TiledPreprocessor(base, cfg.tiling, cfg.max_tiles, cfg.min_tiles, cfg.use_thumbnail, cfg.grid_pinpoints,
                                 skip_padding=cfg.skip_token, newline=cfg.image_newline, unpad=cfg.unpad)

    def tokens_per_image(self, task: str) -> int:
        """Placeholder slots of one image (of one tile, for a tiled workflow: see `image_token_counts`)."""
        own = self.pixel_embedding(task)
        if task == TEXT_TASK or (self.vision is None and own is None):
            return 0
        family = self.workflow(task)
        patches = own.num_patches if own is not None else self.vision.num_tokens(family.cfg.keep_cls)
        return family.image_tokens_per_image(patches)

    def image_token_counts(self, task: str, pixel_values: Any) -> int | list[int]:
        """Placeholder slots per image: one number for every image, or one per image for tiled images
        (their tile layouts decide); checked against the workflow's `max_image_tokens`."""
        per_tile = self.tokens_per_image(task)
        if not isinstance(pixel_values, TiledPixels) or self.workflow(task).tiles_as_media:
            return per_tile
        counts = [layout.num_tokens(per_tile) for layout in pixel_values.layouts]
        limit = self.workflow(task).cfg.max_image_tokens
        if limit is not None and counts and max(counts) > limit:
            k = max(range(len(counts)), key=counts.__getitem__)
            raise ValueError(
                f"image {k} takes {counts[k]} tokens ({pixel_values.layouts[k].num_tiles} tiles of {per_tile}), over "
                f"max_image_tokens={limit} of workflow {task!r}: lower max_tiles or raise max_image_tokens"
            )
        return counts

    def pixel_values(self, images: Any, task: str) -> torch.Tensor | None:
        """PIL images / paths / bytes / [3, H, W] tensors (flat or one list per sample), or a ready
        [N, 3, H, W] tensor -> pixel_values."""
        if images is None:
            return None
        if isinstance(images, (torch.Tensor, TiledPixels)):
            return images
        flat = inputs.flatten_images(images)
        if not flat:
            return None
        pre = self.preprocessor(task)
        return pre(flat) if isinstance(pre, TiledPreprocessor) else inputs.to_pixel_values(flat, pre)

    def caches_vision_features(self, task: str) -> bool:
        """Whether workflow `task` reads its images through the frozen vision tower alone, one
        [n, 3, H, W] image at a time (no tiles, video frames or pixel-embedding connector): then an
        image's :meth:`vision_features` are the same at every training step, and a trainer may keep them."""
        family = self.workflow(task)
        return (self.vision is not None and family.uses_images and self.pixel_embedding(task) is None
                and family.cfg.tiling is None and family.max_frames() == 0)

    @torch.no_grad()
    def vision_features(self, task: str, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen vision tower's features of [n, 3, H, W] images as workflow `task` selects them
        (its layer, CLS kept or not): what its connector reads. See :meth:`caches_vision_features`."""
        return self._tower_features(self.workflow(task), pixel_values)

    def _tower_features(self, family: Family, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixels, select_layer=family.cfg.select_layer, keep_cls=family.cfg.keep_cls)

    def _image_embeds(self, task: str, pixel_values: torch.Tensor | None,
                      vision_features: torch.Tensor | None = None) -> torch.Tensor | None:
        if vision_features is not None:  # computed (and kept) by the caller: the connector on from there
            if not self.caches_vision_features(task):
                raise ValueError(f"workflow {task!r} does not read plain vision-tower features: pass pixel_values")
            return self.workflow(task).encode_images(vision_features.to(self.device))
        if pixel_values is None:
            return None
        family = self.workflow(task)
        if not family.uses_images:
            raise ValueError(f"workflow {task!r} ({family.cfg.family}) takes no images")
        if isinstance(pixel_values, TiledPixels):
            return self._tiled_embeds(task, family, pixel_values)

        frames = pixel_values.shape[1] if pixel_values.dim() == 5 else None  # [n, frames, 3, H, W]: videos
        if frames is not None and frames > family.max_frames():
            options = [f.name for f in dataclasses.fields(family.cfg) if f.name.endswith("max_frames")]
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} hold {frames} frames per medium; workflow "
                f"{task!r} ({family.cfg.family}) takes at most {family.max_frames()}"
                + (f" (its config option: {', '.join(options)})" if options else "")
            )

        own = self.pixel_embedding(task)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            if own is not None:  # the connector embeds the pixels itself
                return family.encode_images(pixels)
            flat = pixels.flatten(0, 1) if frames is not None else pixels
            feats = self._tower_features(family, flat)
            if frames is not None:
                feats = feats.view(pixels.shape[0], frames, *feats.shape[1:])
            return family.encode_images(feats)

        if torch.is_grad_enabled() or pixel_values.shape[0] == 0:
            return encode(pixel_values)
        modules = (family,) if own is not None else (self.vision, family)
        return self.encoded_images.get(task, modules, pixel_values, encode)

    def _tiled_embeds(self, task: str, family: Family, pixel_values: TiledPixels) -> torch.Tensor | TiledMedia:
        """Every tiled image's tokens, concatenated in order: [1, total tokens, hidden] (or, for a family
        that reads images by cross-attention, one medium per image: TiledMedia). Each image is one entry
        of the encoded-image cache (keyed by its tile set); only its non-skipped tiles are encoded."""
        if family.cfg.tiling is None:
            raise ValueError(f"workflow {task!r} has no tiling option but was given tiled images")
        newline, skip = layout_embeddings(family.connector)
        own = self.pixel_embedding(task)

        def encode(tiled: TiledPixels) -> list[torch.Tensor]:
            # a pixel-embedding connector (monolithic) takes the tiles themselves
            feats = tiled.tiles if own is not None else self._tower_features(family, tiled.tiles)
            tokens = family.encode_images(feats).split(tiled.counts)
            if family.tiles_as_media:  # an image's tiles, in the layout's order, are its medium
                return [t.flatten(0, 1) for t in tokens]
            return [arrange_tokens(lay, t, newline, skip) for lay, t in zip(tiled.layouts, tokens)]

        modules = (family,) if own is not None else (self.vision, family)
        per_image = encode(pixel_values) if torch.is_grad_enabled() else self.encoded_images.get(
            task, modules, pixel_values, encode)
        return TiledMedia.pad(per_image) if family.tiles_as_media else torch.cat(per_image)[None]

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
        logits_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> ModelOutput:
        """One forward pass of workflow `task`. `labels` (-100 = ignored) gives `.loss`.

        `vision_features` ([n_images, tokens, C], from :meth:`vision_features`) stand in for the
        images' pixels (a trainer that keeps each image's features passes them; `image_rows` then
        names each image's row).

        `logits_mask` ([batch, seq] bool) computes the logits of the marked positions only, as one
        [marked, vocab] tensor in row-major order (what training needs: the positions that predict a
        label; see :func:`frozenvl.losses.label_positions`). With it, `labels` are not accepted.

        Images are given flat, sample after sample; `image_rows` ([n_images]) names each image's
        batch row. It can be left out when the prompts hold vision-token slots (it is read off them)
        or the batch has one row; families that keep images out of the sequence need it otherwise.
        """
        self._check_task(task)
        input_ids = input_ids.to(self.device)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        if vision_features is not None and (pixel_values is not None or images is not None):
            raise ValueError("vision_features stand in for the images: pass them instead of images/pixel_values")
        if pixel_values is None and vision_features is None:
            pixel_values, rows = inputs.images_in(self, images, input_ids.shape[0], task)
            image_rows = image_rows if image_rows is not None else rows
        inputs.check_length(self.llm.config, attention_mask.shape[1])
        if task == TEXT_TASK:
            if pixel_values is not None or image_embeds is not None or vision_features is not None:
                raise ValueError(NO_IMAGES_FOR_TEXT)
            self._check_text_ids(input_ids)
        else:
            if image_embeds is None:
                image_embeds = self._image_embeds(task, pixel_values, vision_features)
            if image_embeds is None and (input_ids == IMAGE_TOKEN_ID).any():
                raise ValueError("input_ids hold image placeholders but no images were given")
            # (tiled tokens given directly hold every image in one row: their rows are the caller's;
            # tiled media hold one entry per image, like untiled images)
            spliced = self.workflow(task).cfg.tiling is not None and not isinstance(image_embeds, TiledMedia)
            if image_embeds is not None and (pixel_values is not None or not spliced):
                n_images = len(pixel_values) if pixel_values is not None else len(image_embeds)
                image_rows = self._image_rows(input_ids, n_images, task, image_rows, pixel_values)
        if logits_mask is not None and (labels is not None or logits_to_keep):
            raise ValueError("logits_mask selects the positions itself: pass neither labels nor logits_to_keep with it")
        out = self._step(input_ids, attention_mask, task, past_key_values, position_ids, use_cache, logits_to_keep,
                         image_embeds, image_rows, logits_mask)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels)
        return out

    def _step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task: str,
        past_key_values: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The forward pass proper, without `forward`'s input checks (they read values back to the host):
        inputs already on the model's device, `image_rows` resolved. Generation's decode steps call it
        with the tokens the model itself produced."""
        if position_ids is None and task != TEXT_TASK:
            # Positions skip left padding. (`text` passes None on, exactly as the bare base model gets it.)
            position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(task)
        if task == TEXT_TASK:
            logits = self.llm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{cache_kwarg(type(self.llm).forward): past_key_values},  # `cache` from transformers 5.24
            ).logits
            if logits_mask is not None:  # the bare base computes them all (`text` is never trained)
                logits = logits[logits_mask.to(logits.device)]
        else:
            family = self.workflow(task)
            if family.cfg.tiling is not None and image_embeds is not None and not family.tiles_as_media:
                h = _splice(family.embed(input_ids, None), input_ids, image_embeds)  # per-image token counts
            else:
                h = family.embed(input_ids, image_embeds)
            ctx = DecodeContext(
                attention_mask=attention_mask,
                position_ids=position_ids.to(self.device),
                cache=past_key_values,
                image_mask=input_ids == IMAGE_TOKEN_ID,
            )
            ctx.state["image_embeds"] = image_embeds
            if image_embeds is not None:
                ctx.state["image_rows"] = image_rows
            h = family.decode(h, ctx)
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            if logits_mask is not None:  # the head only where a loss is taken: [marked, hidden]
                h = h[logits_mask.to(h.device)]
            logits = family.logits(h)
        return ModelOutput(logits=logits, past_key_values=past_key_values if use_cache else None)

    def _check_text_ids(self, input_ids: torch.Tensor) -> None:
        if (input_ids == IMAGE_TOKEN_ID).any():
            raise ValueError("the 'text' workflow got image placeholders in input_ids")
        vocab = self.llm.get_input_embeddings().num_embeddings
        if int(input_ids.max()) >= vocab:
            raise ValueError(
                f"the 'text' workflow got token id {int(input_ids.max())}, beyond the base vocabulary ({vocab}): "
                "tokens a workflow added (e.g. <|endofchunk|>) belong to that workflow"
            )

    def _image_rows(
        self, input_ids: torch.Tensor, n_images: int, task: str, given: torch.Tensor | None, pixel_values: Any = None
    ) -> torch.Tensor | None:
        counts = self.image_token_counts(task, pixel_values) if task != TEXT_TASK else 0
        return inputs.resolve_image_rows(input_ids, n_images, counts, task, given)

    def new_cache(self, task: str) -> DynamicCache:
        if task == TEXT_TASK:
            return DynamicCache(config=self.llm.config)
        return self.workflow(task).new_cache()

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

        `images`: for one prompt, a list of its images; for several prompts, one list per prompt; or a
        ready pixel tensor [N, 3, H, W] holding every prompt's images in order.
        Returns input_ids, attention_mask, pixel_values and image_rows (each image's batch row).
        """
        return inputs.prepare_inputs(self, prompts, images, task, add_special_tokens=add_special_tokens)

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
        text_fallback: bool | None = None,
        **gen_kwargs: Any,
    ) -> torch.Tensor:
        """Generate new tokens; returns [B, new_tokens] (rows finished early are padded).

        `text_fallback` overrides the workflow's own setting for this call only (False: image-free
        rows run through the workflow's own path, as evaluations of that path need)."""
        from .generation import GenerationConfig, generate

        cfg = GenerationConfig.make(self, **gen_kwargs)
        if images is not None and pixel_values is not None:
            raise ValueError("give images or pixel_values, not both")
        if task == TEXT_TASK and pixel_values is not None:
            raise ValueError(NO_IMAGES_FOR_TEXT)
        if prompt is not None:
            if input_ids is not None:
                raise ValueError("give input_ids or prompt, not both")
            batch = self.prepare_inputs(prompt, images if images is not None else pixel_values, task)
            input_ids, attention_mask, pixel_values = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
            image_rows = image_rows if image_rows is not None else batch["image_rows"]
        elif input_ids is None:
            raise ValueError("give input_ids or prompt")
        elif pixel_values is None:
            pixel_values, rows = inputs.images_in(self, images, input_ids.shape[0], task)
            image_rows = image_rows if image_rows is not None else rows
        self._check_task(task)
        input_ids = input_ids.to(self.device)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        inputs.check_length(self.llm.config, input_ids.shape[1], cfg.max_new_tokens)  # before any compute
        if pixel_values is not None:
            image_rows = self._image_rows(input_ids, len(pixel_values), task, image_rows, pixel_values)
        n_per_row = (
            torch.bincount(image_rows.cpu(), minlength=input_ids.shape[0])
            if image_rows is not None
            else torch.zeros(input_ids.shape[0], dtype=torch.long)
        )
        has_image = (n_per_row > 0).to(input_ids.device)
        if self._falls_back(task, text_fallback) and 0 < int(has_image.sum()) < len(has_image):
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
        task = self.route(task, input_ids, pixel_values, text_fallback)
        return generate(self, input_ids, attention_mask, pixel_values, task, cfg, image_rows=image_rows)

    def _falls_back(self, task: str, text_fallback: bool | None) -> bool:
        """Whether image-free requests to `task` go to the base: the per-call override, else the
        workflow's config. The config is never written per call, so concurrent calls don't interfere."""
        if task == TEXT_TASK:
            return False
        return bool(self.workflow(task).cfg.text_fallback if text_fallback is None else text_fallback)

    def route(
        self, task: str, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, text_fallback: bool | None = None
    ) -> str:
        """The workflow that answers a request: `text` for an image-free request to a workflow with
        `text_fallback` (the default for frozen-LLM workflows; `text_fallback` overrides it for this
        call), else `task` itself."""
        self._check_task(task)
        if task == TEXT_TASK or pixel_values is not None or (input_ids == IMAGE_TOKEN_ID).any():
            return task
        return TEXT_TASK if self._falls_back(task, text_fallback) else task

    def stream(
        self, prompt: str, images: Any = None, task: str = TEXT_TASK, *, add_special_tokens: bool = True,
        text_fallback: bool | None = None, **gen_kwargs: Any,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece (`text_fallback`: as in :meth:`generate`)."""
        from .generation import GenerationConfig, stream_text

        cfg = GenerationConfig.make(self, **gen_kwargs)
        batch = self.prepare_inputs(prompt, images, task, add_special_tokens=add_special_tokens)
        inputs.check_length(self.llm.config, batch["input_ids"].shape[1], cfg.max_new_tokens)  # before any compute
        task = self.route(task, batch["input_ids"], batch["pixel_values"], text_fallback)
        return stream_text(self, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], task, cfg,
                           image_rows=batch["image_rows"])

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
        checkpoint_io.save_model(self, directory, tasks)

    def load_workflow(self, directory: str | os.PathLike, name: str, as_name: str | None = None) -> Family:
        """Load workflow `name` saved in `directory` into this running model (as `as_name`)."""
        saved = ModelConfig.load(directory)
        if name not in saved.workflows:
            raise ValueError(f"{directory} has no workflow {name!r}; it has {sorted(saved.workflows)}")
        target = as_name or name
        if target in self.workflows:
            del self.workflows[target]
        family = self._attach(target, saved.workflows[name])
        checkpoint_io.load_weights(family, checkpoint_io.weights_path(directory, name))
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


def _splice(h: torch.Tensor, input_ids: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Image tokens [1, n, hidden] (every image's, in order) into the image slots of embeddings `h`."""
    is_image = input_ids == IMAGE_TOKEN_ID
    n_slots = int(is_image.sum())
    if n_slots != flat.shape[0] * flat.shape[1]:
        raise ValueError(
            f"input has {n_slots} image-token positions but the images give {flat.shape[0] * flat.shape[1]} tokens: "
            "prepare the prompt with the same images (a tiled image's slot count follows its tiles)"
        )
    return h.masked_scatter(is_image.unsqueeze(-1), flat.to(h.dtype))


def _needs_vision_tower(wf: WorkflowConfig) -> bool:
    return get_family(wf.family).uses_images and not takes_pixels(wf.connector)


def load(directory: str | os.PathLike, *, dtype=None, device=None, attn_implementation=None) -> FrozenVLModel:
    """Open a frozenvl model directory: base models from the recorded ids/paths, workflows from safetensors."""
    cfg = checkpoint_io.load_config(directory)
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
