"""The VILA model: media embeddings spliced into the LLM input, then the LLM's ``generate``.

A request flows top-down: prompt parts -> decoded media -> preprocessing -> tower -> projector -> encoders
-> spliced ``inputs_embeds`` -> ``generate`` -> text. Everything constant (templates, stop tokens,
start/end token embeddings) is prepared once at load.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import nn

from ..cache import FeatureCache, content_digest, media_key
from ..checkpoint import assign_weights
from ..config import VilaConfig
from ..errors import CheckpointError, PromptTooLongError, UsageError, VilaError
from ..media import Image, Video, load_image, prompt_part
from ..preprocess import ImageBatch, frame_transform, preprocess_frames, preprocess_images
from ..prompt import IMAGE_TOKEN, VIDEO_TOKEN, Template, build_user_text, get_template
from ..streaming import TextStream, TokenClock
from ..structured import json_logits_processor, parse_response_format
from ..tokenizer import infer_stop_token_ids, media_token_ids
from .encoders import encode_images, encode_video, wrap
from .projector import MultimodalProjector

logger = logging.getLogger(__name__)
# tokenizer_config.json stores a huge sentinel when no limit was saved.
_NO_LIMIT = 10**9
VISION_CHUNK = 32  # tiles per vision-tower forward; bounds activation memory for long videos


@dataclass
class Turn:
    """One message of a conversation: ``role`` is "user" or "assistant"; content is text and media parts."""

    role: str
    content: list[Any]


@dataclass
class PreparedPrompt:
    """A request ready for the LLM."""

    input_ids: torch.Tensor  # (L,)
    inputs_embeds: torch.Tensor  # (L', D)
    prompt_text: str
    media_tokens: list[int]  # embedding positions per media item, prompt order
    video_durations: list[float]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerationResult:
    """What one ``generate`` call produced."""

    text: str
    token_ids: list[int]
    num_prompt_tokens: int  # LLM input positions (text + media embeddings)
    media_tokens: list[int]
    video_durations: list[float]
    timings: dict[str, float]


@dataclass
class _ImageItem:
    """One image of a prompt: its encoded blocks (a cache hit, or after encoding) or its decoded pixels."""

    key: str | None
    blocks: list[torch.Tensor] | None = None  # one wrapped block per <image> token it occupies
    image: PIL.Image.Image | None = None


@dataclass
class _VideoItem:
    key: str | None
    block: torch.Tensor | None = None
    duration: float = 0.0
    frames: list[Any] | None = None  # decoded frames, until preprocessed


@dataclass
class _MediaPlan:
    """The media of one conversation on their way from parts to embedding blocks."""

    tiled: bool
    images: list[_ImageItem] = field(default_factory=list)
    videos: list[_VideoItem] = field(default_factory=list)
    batch: ImageBatch | None = None  # the images still to encode, preprocessed
    frame_pixels: list[torch.Tensor] = field(default_factory=list)  # the videos still to encode

    def preprocess(self, cfg: VilaConfig) -> None:
        missing = [item.image for item in self.images if item.blocks is None]
        if missing and (self.tiled or len(missing) > 1 or cfg.image_aspect_ratio not in ("dynamic", "dynamic_s2")):
            self.batch = preprocess_images(missing, cfg)
        elif missing:  # one uncached image of a multi-image prompt: a single tile, like all images there
            self.batch = ImageBatch(preprocess_frames(missing, cfg), (1,), None, (1,))
        for item in self.videos:
            if item.frames is not None:
                self.frame_pixels.append(preprocess_frames(item.frames, cfg))
                item.frames = None


def _concat_image_batches(batches: Sequence[ImageBatch]) -> ImageBatch | None:
    """Several prompts' images as one batch for the vision tower (their tiles are independent)."""
    if len(batches) <= 1:
        return batches[0] if batches else None
    blocks = None
    if any(b.block_sizes is not None for b in batches):
        blocks = tuple(s for b in batches for s in (b.block_sizes or (None,) * len(b.tiles_per_image)))
    return ImageBatch(
        pixel_values=torch.cat([b.pixel_values for b in batches]),
        tiles_per_image=tuple(n for b in batches for n in b.tiles_per_image),
        block_sizes=blocks,
        tokens_per_image=tuple(n for b in batches for n in b.tokens_per_image),
    )


class VilaModel(nn.Module):
    """A loaded VILA / NVILA checkpoint. Create it with :func:`vila.load`."""

    def __init__(
        self,
        config: VilaConfig,
        tokenizer: Any,
        llm: nn.Module,
        vision_tower: nn.Module,
        mm_projector: MultimodalProjector,
        conv_mode: str,
    ):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.llm = llm
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.media_token_ids = media_token_ids(tokenizer)
        self.conv_mode = conv_mode
        self.template = get_template(conv_mode)
        self.stop_token_ids = infer_stop_token_ids(tokenizer, self.template)
        vocab = llm.get_input_embeddings().num_embeddings
        # The reference resizes the LM head to len(tokenizer) (`resize_token_embeddings` after extending the
        # tokenizer, NVlabs/VILA `llava/model/builder.py`): extra checkpoint rows are cut off
        # (we mask their logits instead), and missing rows would be *randomly* initialised, making its output
        # non-deterministic. We never add rows: media tokens are replaced by embeddings before the LLM sees
        # them, so every real token id keeps its exact logit and the output stays deterministic.
        self.num_generatable = min(len(tokenizer), vocab)
        self._token_embeds: dict[str, torch.Tensor] = {}
        # Positions a video of N frames takes under a config: a constant of the checkpoint, traced once per key.
        self._video_position_counts: dict[tuple[str, int], int | None] = {}
        for text in (
            config.image_encoder.start_tokens,
            config.image_encoder.end_tokens,
            config.video_encoder.start_tokens,
            config.video_encoder.end_tokens,
            config.video_encoder.sep_tokens,
        ):
            self.embed_text(text)

    # -- properties ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.mm_projector.parameters(), torch.empty(0)).device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def context_length(self) -> int:
        """The tokenizer's ``model_max_length`` (what the reference's default ``max_length`` is), else the
        LLM's position limit."""
        n = getattr(self.tokenizer, "model_max_length", None)
        if n and n < _NO_LIMIT:
            return int(n)
        return int(getattr(self.llm.config, "max_position_embeddings", 0) or _NO_LIMIT)

    # -- embeddings ------------------------------------------------------------------------------------
    def embed_text(self, text: str | None) -> torch.Tensor | None:
        """LLM embeddings of ``tokenizer(text)`` with default special tokens (a BOS, if the tokenizer adds
        one, is part of every start/end block, because the reference embeds ``tokenizer(text).input_ids``).
        Cached: these strings are constant."""
        if text is None:
            return None
        if text not in self._token_embeds:
            ids = torch.tensor(self.tokenizer(text).input_ids, device=self._embed_device)
            with torch.no_grad():
                self._token_embeds[text] = self.llm.get_input_embeddings()(ids)
        return self._token_embeds[text]

    @property
    def _embed_device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # -- prompt ----------------------------------------------------------------------------------------
    def prepare(
        self,
        turns: Sequence[Turn],
        *,
        template: Template | None = None,
        num_video_frames: int | None = None,
        fps: float | None = None,
        video_max_tiles: int | None = None,
        cache: FeatureCache | None = None,
    ) -> PreparedPrompt:
        """Decode and encode the media of a conversation and build the LLM input embeddings.

        ``cache`` (a :class:`vila.cache.FeatureCache`) skips decoding and encoding media it has seen.
        """
        (result,) = self.prepare_many(
            [turns],
            template=template,
            num_video_frames=num_video_frames,
            fps=fps,
            video_max_tiles=video_max_tiles,
            cache=cache,
        )
        return result

    def prepare_many(
        self,
        conversations: Sequence[Sequence[Turn]],
        *,
        template: Template | None = None,
        num_video_frames: int | None = None,
        fps: float | None = None,
        video_max_tiles: int | None = None,
        cache: FeatureCache | None = None,
        return_errors: bool = False,
    ) -> list[Any]:
        """:meth:`prepare` for several conversations: media not in ``cache`` go through the vision tower together.

        With ``return_errors`` a conversation that fails (bad media, empty prompt) gets its :class:`VilaError`
        in place of a :class:`PreparedPrompt` and the others go on. Timings are those of the whole call.
        """
        template = template or self.template
        cfg = self.config if video_max_tiles is None else self.config.with_overrides(video_max_tiles=video_max_tiles)
        results: list[Any] = [None] * len(conversations)

        def attempt(i: int, fn: Any) -> Any:
            try:
                return fn()
            except VilaError as e:
                if not return_errors:
                    raise
                results[i] = e
                return None

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        plans = [
            attempt(i, lambda t=turns: self._plan_media(t, cfg, num_video_frames, fps, cache))
            for i, turns in enumerate(conversations)
        ]
        timings["media_decode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i, plan in enumerate(plans):
            if plan is not None:
                attempt(i, lambda p=plan: p.preprocess(cfg))
        timings["preprocess_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        live = [i for i, plan in enumerate(plans) if plan is not None and results[i] is None]
        with torch.no_grad():
            try:
                self._encode_plans([plans[i] for i in live], cache)
            except VilaError:
                if not return_errors:
                    raise
                for i in live:  # find out which conversation fails
                    attempt(i, lambda p=plans[i]: self._encode_plans([p], cache))
        timings["vision_encode_s"] = time.perf_counter() - t0

        for i in live:
            if results[i] is None:
                prepared = attempt(i, lambda t=conversations[i], p=plans[i]: self._assemble(t, p, template, timings))
                if prepared is not None:
                    results[i] = prepared
        return results

    @property
    def supports_feature_cache(self) -> bool:
        """Whether :meth:`prepare` takes ``cache=`` (subclasses with their own media path, e.g. VILA-HD, do not)."""
        cls = type(self)
        return cls.prepare is VilaModel.prepare and cls._encode_media is VilaModel._encode_media

    def _plan_media(
        self,
        turns: Sequence[Turn],
        cfg: VilaConfig,
        num_video_frames: int | None,
        fps: float | None,
        cache: FeatureCache | None,
    ) -> _MediaPlan:
        """Look every media item up in ``cache`` and decode the ones that miss."""
        parts = [part for turn in turns for part in turn.content]
        for part in parts:
            if not isinstance(part, (str, Image, Video, PIL.Image.Image)):
                raise UsageError(
                    f"unsupported prompt part {type(part).__name__}; use str, vila.Image, vila.Video or a PIL image"
                )
        if all(isinstance(part, str) and not part.strip() for part in parts):
            raise UsageError("the prompt is empty; give some text or at least one image or video")
        num_frames = num_video_frames or cfg.num_video_frames
        video_fps = cfg.fps if fps is None else fps
        self._check_video_positions(sum(isinstance(part, Video) for part in parts), cfg, num_frames, video_fps)
        num_images = sum(isinstance(part, (Image, PIL.Image.Image)) for part in parts)
        # The reference tiles an image only when it is the prompt's only one (`generate_content`, NVlabs/VILA
        # `llava/model/llava_arch.py`); video frames never count as images here.
        plan = _MediaPlan(tiled=num_images == 1 and cfg.image_aspect_ratio in ("dynamic", "dynamic_s2"))
        context = f"{id(self)}|{self.dtype}|{self.device}|{cfg!r}" if cache is not None else ""
        for part in parts:
            if isinstance(part, (Image, PIL.Image.Image)):
                source = part.source if isinstance(part, Image) else part
                key = None
                if cache is not None:
                    key = media_key("image-tiled" if plan.tiled else "image", content_digest(source), context)
                blocks = cache.get(key) if cache is not None else None
                plan.images.append(_ImageItem(key, blocks, None if blocks is not None else load_image(part)))
            elif isinstance(part, Video):
                key = None
                if cache is not None:
                    key = media_key(f"video:{num_frames}:{video_fps}", content_digest(part.source), context)
                hit = cache.get(key) if cache is not None else None
                if hit is not None:
                    plan.videos.append(_VideoItem(key, block=hit[0], duration=hit[1]))
                    continue
                from ..video import load_video

                decoded = load_video(part, num_frames=num_frames, fps=video_fps, transform=frame_transform(cfg))
                plan.videos.append(_VideoItem(key, duration=decoded.duration, frames=decoded.frames))
        return plan

    def _encode_plans(self, plans: Sequence[_MediaPlan], cache: FeatureCache | None) -> None:
        """One :meth:`_encode_media` call for the missing media of all ``plans``; results go back into them."""
        batches = [p.batch for p in plans if p.batch is not None]
        frames = [pixels for p in plans for pixels in p.frame_pixels]
        image_blocks, video_blocks = self._encode_media(_concat_image_batches(batches), frames)
        images, videos = iter(image_blocks), iter(video_blocks)
        for plan in plans:
            if plan.batch is not None:
                missing = [item for item in plan.images if item.blocks is None]
                for item, count in zip(missing, plan.batch.tokens_per_image):
                    item.blocks = [next(images) for _ in range(count)]
                    item.image = None
                    if cache is not None:
                        cache.put(item.key, item.blocks)
                plan.batch = None
            for item in (v for v in plan.videos if v.block is None):
                item.block = next(videos)
                if cache is not None:
                    cache.put(item.key, (item.block, item.duration))
            plan.frame_pixels = []

    def _assemble(
        self, turns: Sequence[Turn], plan: _MediaPlan, template: Template, timings: dict[str, float]
    ) -> PreparedPrompt:
        """Render the conversation and splice the media blocks into its embeddings."""
        image_blocks = [block for item in plan.images for block in item.blocks]
        video_blocks = [item.block for item in plan.videos]
        # In `dynamic` mode a single image becomes one "<image>\n" per tile.
        image_token = IMAGE_TOKEN
        if plan.images and len(plan.images[0].blocks) > 1:
            image_token = (IMAGE_TOKEN + "\n") * len(plan.images[0].blocks)
        messages = []
        for turn in turns:
            text = build_user_text(
                turn.content,
                is_text=lambda p: isinstance(p, str),
                media_token=lambda p: VIDEO_TOKEN if isinstance(p, Video) else image_token,
            )
            messages.append((turn.role, text.strip()))
        if not any(text for _, text in messages):
            raise UsageError("the prompt is empty; give some text or at least one image or video")
        prompt_text = template.render(messages + [("assistant", None)], self.tokenizer)
        input_ids = torch.tensor(self.tokenizer(prompt_text).input_ids, dtype=torch.long)
        inputs_embeds = self._splice(input_ids, image_blocks, video_blocks)
        media_tokens = [b.shape[0] for b in image_blocks] + [b.shape[0] for b in video_blocks]
        logger.debug(
            "visual tokens: %s per image, %s per video; %d prompt positions in all",
            [sum(b.shape[0] for b in item.blocks) for item in plan.images],
            [item.block.shape[0] for item in plan.videos],
            inputs_embeds.shape[0],
        )
        return PreparedPrompt(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            prompt_text=prompt_text,
            media_tokens=media_tokens,
            video_durations=[item.duration for item in plan.videos],
            timings=dict(timings),
        )

    def _encode_media(
        self, batch: Any, frame_pixels: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cfg = self.config
        image_blocks: list[torch.Tensor] = []
        if batch is not None:
            pixels = batch.pixel_values.to(self.device, self.dtype)
            blocks = list(batch.block_sizes) if batch.block_sizes is not None else None
            feats = encode_images(self.vision_tower, self.mm_projector, cfg.vision, pixels, blocks, VISION_CHUNK)
            start, end = self.embed_text(cfg.image_encoder.start_tokens), self.embed_text(cfg.image_encoder.end_tokens)
            image_blocks = [wrap(f, start, end) for f in feats]
        video_blocks = []
        for pixels in frame_pixels:
            pixels = pixels.to(self.device, self.dtype)
            feats = torch.stack(
                encode_images(self.vision_tower, self.mm_projector, cfg.vision, pixels, None, VISION_CHUNK)
            )
            video_blocks.append(encode_video(feats, cfg.video_encoder, self.embed_text))
        return image_blocks, video_blocks

    def _splice(
        self, input_ids: torch.Tensor, image_blocks: list[torch.Tensor], video_blocks: list[torch.Tensor]
    ) -> torch.Tensor:
        """Replace each media token by the next embedding block of its kind, as the reference's ``_embed``
        (NVlabs/VILA ``llava/model/llava_arch.py``) does."""
        kind_of = {self.media_token_ids["image"]: "image", self.media_token_ids["video"]: "video"}
        queues = {"image": deque(image_blocks), "video": deque(video_blocks)}
        is_media = torch.isin(input_ids, torch.tensor(list(kind_of)))
        rows = self.llm.get_input_embeddings().num_embeddings
        unknown = (input_ids >= rows) & ~is_media
        if unknown.any():
            token = self.tokenizer.convert_ids_to_tokens(int(input_ids[unknown][0]))
            raise UsageError(
                f"the prompt contains {token!r}, a token this model has no embedding for; remove it from the text"
            )
        # Media ids may lie beyond the embedding table (added tokens); their rows are never used.
        safe_ids = input_ids.masked_fill(is_media, 0).to(self._embed_device)
        with torch.no_grad():
            text = self.llm.get_input_embeddings()(safe_ids)
        pieces, start = [], 0
        for pos in is_media.nonzero().flatten().tolist():
            pieces.append(text[start:pos])
            queue = queues[kind_of[int(input_ids[pos])]]
            if not queue:
                raise UsageError(
                    "the prompt has more media tokens than media; do not type <image> or <vila/video> in text"
                )
            pieces.append(queue.popleft().to(text.device, text.dtype))
            start = pos + 1
        pieces.append(text[start:])
        for kind, queue in queues.items():
            if queue:
                raise RuntimeError(f"not all {kind} embeddings were consumed")
        return torch.cat(pieces)

    # -- generation ------------------------------------------------------------------------------------
    def generation_config(
        self,
        *,
        max_new_tokens: int | None,
        do_sample: bool,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        prompt_len: int,
        stop_token_ids: Sequence[int],
    ) -> Any:
        """A fully specified ``GenerationConfig``: the reference's defaults (greedy, stop tokens, pad = pad or
        eos), never back-filled from ``llm/generation_config.json``: the reference builds its model without
        reading that file, while transformers >= 4.50 would fill unset values (sampling) from it."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        # The reference's max_length = model_max_length counts the prompt too.
        max_new_tokens = cap_new_tokens(max_new_tokens, self.context_length, prompt_len)
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_beams=1,
            temperature=temperature if do_sample else 1.0,
            top_p=top_p if do_sample else 1.0,
            top_k=top_k if do_sample else 50,
            repetition_penalty=1.0,
            eos_token_id=list(stop_token_ids),
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
            bos_token_id=tok.bos_token_id or tok.eos_token_id,
        )

    def generate(
        self,
        prompt: Any,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        generation_config: Any = None,
        conv_mode: str | None = None,
        num_video_frames: int | None = None,
        fps: float | None = None,
        video_max_tiles: int | None = None,
        decode_time_tokens: bool = False,
        streamer: Any = None,
        logits_processor: Any = None,
        response_format: Any = None,
        cache: FeatureCache | None = None,
        stopping_criteria: Any = None,
        template: Template | None = None,
    ) -> GenerationResult:
        """Like :meth:`generate_content`, returning token ids, counts and timings as well.

        ``template`` (a :class:`vila.prompt.Template`, e.g. the model's with another system prompt) wins over
        ``conv_mode``."""
        t_start = time.perf_counter()
        validate_generation_args(max_new_tokens, temperature, top_p, top_k, num_video_frames, fps)
        if video_max_tiles is not None and (not isinstance(video_max_tiles, int) or video_max_tiles < 1):
            raise UsageError(f"video_max_tiles must be a positive integer, got {video_max_tiles!r}")
        json_format = parse_response_format(response_format)  # fail before any media work
        if temperature is not None and temperature == 0:
            do_sample = False
        custom = template is not None or bool(conv_mode)
        template = template or (get_template(conv_mode) if conv_mode else self.template)
        stop_ids = infer_stop_token_ids(self.tokenizer, template) if custom else self.stop_token_ids
        turns = to_turns(prompt)
        extra = {"cache": cache} if cache is not None and self.supports_feature_cache else {}
        prepared = self.prepare(
            turns,
            template=template,
            num_video_frames=num_video_frames,
            fps=fps,
            video_max_tiles=video_max_tiles,
            **extra,
        )
        n = prepared.inputs_embeds.shape[0]
        self.check_fits(prepared)
        if generation_config is None:
            generation_config = self.generation_config(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                top_k=50 if top_k is None else top_k,
                prompt_len=n,
                stop_token_ids=stop_ids,
            )
        processors = self._logits_processors(logits_processor)
        if json_format is not None:
            budget = generation_config.max_new_tokens or (generation_config.max_length - n)
            processors.append(json_logits_processor(self, json_format, [budget], stop_ids))
        if seed is not None:
            torch.manual_seed(seed)

        clock = TokenClock(streamer)
        t0 = time.perf_counter()
        embeds = prepared.inputs_embeds[None].to(self._embed_device)
        with torch.no_grad():
            out = self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                generation_config=generation_config,
                logits_processor=processors,
                stopping_criteria=stopping_criteria,
                streamer=clock,
            )
        timings = dict(prepared.timings, generate_s=time.perf_counter() - t0, **clock.timings(t_start, t0))
        ids = out[0].tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if decode_time_tokens:
            text = self.decode_time_tokens(text, prepared.video_durations)
        return GenerationResult(
            text=text,
            token_ids=ids,
            num_prompt_tokens=n,
            media_tokens=prepared.media_tokens,
            video_durations=prepared.video_durations,
            timings=timings,
        )

    def _check_video_positions(self, num_videos: int, cfg: VilaConfig, num_frames: int, fps: float) -> None:
        """Raise :class:`PromptTooLongError` before any frame is decoded when the videos alone outgrow the context.

        Uniform sampling returns ``num_frames`` frames whatever the video's length (indices repeat on a short
        clip, as in the reference), so their positions are known from shapes alone; fps sampling counts one
        frame. Text and images count nothing here: this only refuses prompts that :meth:`check_fits` would
        refuse after decoding and encoding every frame (``-nf 500`` on a 3-second clip), unless frames fail
        to decode.
        """
        if num_videos == 0:
            return
        key = (repr(cfg), num_frames if fps <= 0 else 1)
        if key not in self._video_position_counts:
            if len(self._video_position_counts) >= 64:  # frame counts vary per request; keep the newest
                self._video_position_counts.pop(next(iter(self._video_position_counts)))
            self._video_position_counts[key] = self._video_positions(cfg, key[1])
        positions = self._video_position_counts[key]
        if positions is not None and num_videos * positions >= self.context_length:
            media = ", ".join([str(positions)] * num_videos)
            raise PromptTooLongError(
                f"the prompt needs {num_videos * positions} positions (media: {media}) or more but the model's "
                f"context is {self.context_length}; use fewer video frames (num_video_frames / --num-video-frames) "
                "or a lower fps"
            )

    def _video_positions(self, cfg: VilaConfig, num_frames: int) -> int | None:
        """Positions one video of ``num_frames`` one-tile frames takes, traced with fake tensors (shapes only, no
        arithmetic); None where the tower cannot be traced that way."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        def embed(text: str | None) -> torch.Tensor | None:
            # Only what load already embedded: a fake tensor must never enter the embedding cache.
            return None if text is None else self._token_embeds.get(text)

        try:
            pixels = preprocess_frames([PIL.Image.new("RGB", (2, 2))], cfg).to(self.device, self.dtype)
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                feats = encode_images(self.vision_tower, self.mm_projector, cfg.vision, pixels[:1])[0]
                block = encode_video(feats.expand(num_frames, *feats.shape), cfg.video_encoder, embed)
            return int(block.shape[0])
        except Exception as e:  # noqa: BLE001 - a tower fake tensors cannot trace: the check after encoding remains
            logger.debug("video positions not traced: %s", e)
            return None

    def check_fits(self, prepared: PreparedPrompt) -> None:
        """Raise :class:`PromptTooLongError` when the prompt leaves no room for an answer."""
        n = prepared.inputs_embeds.shape[0]
        if n >= self.context_length:
            media = ", ".join(str(m) for m in prepared.media_tokens) or "none"
            raise PromptTooLongError(
                f"the prompt needs {n} positions (media: {media}) but the model's context is {self.context_length}; "
                "use fewer or smaller images, fewer video frames (num_video_frames / --num-video-frames) or a lower fps"
            )

    def stream_content(self, prompt: Any, **kwargs: Any) -> TextStream:
        """Like :meth:`generate_content`, but an iterator over pieces of the answer as they are generated.

        The pieces joined equal ``generate_content``'s answer. After the iteration, ``.result`` holds the
        :class:`GenerationResult` (token ids, timings). Pieces come as soon as tokens decode to whole
        characters. Generation runs at most one token ahead of the reader; leaving the loop early (or
        ``close()``, or dropping the stream) stops it within one token.
        """
        if kwargs.get("streamer") is not None:
            raise UsageError("stream_content makes its own streamer; call generate(streamer=...) to use yours")
        if kwargs.get("decode_time_tokens"):
            raise UsageError("time tokens cannot be rewritten while streaming; call generate_content for video answers")
        return TextStream(self, prompt, kwargs)

    def chat(self, **kwargs: Any) -> Any:
        """A multi-turn :class:`vila.chat.ChatSession` with this model (history, media cache, streaming).

        Keyword arguments are generation settings used for every turn (``max_new_tokens``, ``temperature``, ...).
        """
        from ..chat import ChatSession

        return ChatSession(self, **kwargs)

    def decode_time_tokens(self, text: str, video_durations: Sequence[float]) -> str:
        """Rewrite time tokens ``<tK>`` to seconds of the last video, as the reference CLI does (NVlabs/VILA
        ``llava/cli/infer.py``).

        A no-op for checkpoints without time tokens and for prompts without a video.
        """
        cfg = self.config
        if not video_durations or cfg.num_time_tokens is None or cfg.time_token_format is None:
            return text
        from ..video import rewrite_time_tokens

        return rewrite_time_tokens(
            text,
            duration=video_durations[-1],
            num_time_tokens=cfg.num_time_tokens,
            time_token_format=cfg.time_token_format,
        )

    def generate_content(self, prompt: Any, **kwargs: Any) -> str:
        """Answer a prompt: a string, or a list of strings, :class:`vila.Image`, :class:`vila.Video` and PIL
        images in the order they should appear (or a list of ``{"role", "content"}`` turns).

        Greedy by default, like the reference. Keyword arguments: ``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``, ``generation_config`` (a ``transformers.GenerationConfig``,
        used as is), ``conv_mode``, ``num_video_frames``, ``fps``, ``video_max_tiles``, ``decode_time_tokens``
        (rewrite time tokens ``<tK>`` of video answers to seconds, as ``vila-infer`` does), ``response_format``
        (``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema": {...}}}``: JSON mode,
        needs ``vila[json]``) and ``cache`` (a :class:`vila.cache.FeatureCache` reused across calls).
        See also :meth:`stream_content` and :meth:`chat`.
        """
        return self.generate(prompt, **kwargs).text

    def _logits_processors(self, extra: Any) -> Any:
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList(list(extra or []))
        vocab = self.llm.get_output_embeddings().weight.shape[0]
        if self.num_generatable < vocab:
            processors.append(_MaskTail(self.num_generatable))
        return processors


class _MaskTail:
    """Never emit ids at or beyond ``len(tokenizer)``: the reference's ``resize_token_embeddings`` cut those
    LM-head rows off, so a padded vocabulary can never produce them."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.limit :] = -float("inf")
        return scores


def to_turns(prompt: Any) -> list[Turn]:
    """Normalise a prompt (str, one part, a list of parts, or a list of role/content dicts) to turns."""
    if isinstance(prompt, (str, Image, Video, PIL.Image.Image, os.PathLike)):
        return [Turn("user", [prompt_part(prompt)])]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, dict) for t in prompt):
        turns = []
        for t in prompt:
            role = {"human": "user", "gpt": "assistant"}.get(t.get("role"), t.get("role"))
            if role not in ("user", "assistant"):
                raise UsageError(f"a turn's role must be 'user' or 'assistant', got {t.get('role')!r}")
            content = t.get("content", "")
            parts = content if isinstance(content, (list, tuple)) else [content]
            turns.append(Turn(role, [prompt_part(p) for p in parts]))
        if turns[-1].role != "user":
            raise UsageError("the last turn of a conversation must be the user's")
        return turns
    if isinstance(prompt, Sequence):
        return [Turn("user", [prompt_part(p) for p in prompt])]
    raise UsageError(f"unsupported prompt type {type(prompt).__name__}; pass a string or a list of parts")


def cap_new_tokens(max_new_tokens: int | None, context_length: int, prompt_len: int) -> int:
    """``max_new_tokens``, or what the context leaves after the prompt when that is less (None: all of it).
    Past the context the model is outside the positions it was trained on and the answer is noise, so a larger
    request is capped, with a warning (worded the same for every prompt, so it is shown once)."""
    room = context_length - prompt_len
    if max_new_tokens is None:
        return room
    if max_new_tokens > room:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} is more than the model's context ({context_length} positions, "
            "prompt included) has room for; the answer stops when the context is full",
            stacklevel=2,
        )
        return room
    return max_new_tokens


def validate_generation_args(
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    num_video_frames: int | None,
    fps: float | None,
) -> None:
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is not None and not (0 <= temperature <= 100):
        raise UsageError(f"temperature must be between 0 and 100 (0 = greedy), got {temperature!r}")
    if top_p is not None and not (0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise UsageError(f"top_k must be a non-negative integer, got {top_k!r}")
    if num_video_frames is not None and (not isinstance(num_video_frames, int) or num_video_frames < 1):
        raise UsageError(f"num_video_frames must be a positive integer, got {num_video_frames!r}")
    if fps is not None and not fps >= 0:
        raise UsageError(f"fps must be >= 0 (0 = uniform sampling), got {fps!r}")


# -- loading -------------------------------------------------------------------------------------------


def load_projector(
    cfg: VilaConfig, folder: Path | None, dtype: torch.dtype, device: torch.device
) -> MultimodalProjector:
    """Built on the meta device, weights assigned straight from safetensors (no random init)."""
    with torch.device("meta"):
        projector = MultimodalProjector(cfg.projector_type, cfg.vision.mm_hidden_size, cfg.llm_hidden_size)
    if folder is None:
        return projector
    hint = (
        f" (type {cfg.projector_type!r}, mm_hidden_size {cfg.vision.mm_hidden_size}, LLM hidden {cfg.llm_hidden_size})"
    )
    return assign_weights(projector, folder, dtype=dtype, device=device, what="projector", hint=hint)


def load_llm(cfg: VilaConfig, dtype: torch.dtype, device_map: Any, extra: dict[str, Any] | None = None) -> nn.Module:
    """The LLM through transformers: built on the meta device (no random init), weights read straight into
    place, converted one tensor at a time (peak RSS ~ the weights, see ``open_safetensors``)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..checkpoint import close_all, open_safetensors

    # One device, nothing extra: read tensors on demand instead of through transformers' mmap (peak RSS).
    single = isinstance(device_map, dict) and set(device_map) == {""} and not extra
    lazy = open_safetensors(cfg.llm_dir) if single else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if lazy is not None:
                config = AutoConfig.from_pretrained(cfg.llm_dir)
                llm = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
                    None,
                    config=config,
                    state_dict=lazy[0],
                    dtype=dtype,
                    device_map=device_map,
                    attn_implementation="sdpa",
                )
                if (cfg.llm_dir / "generation_config.json").exists():
                    llm.generation_config = GenerationConfig.from_pretrained(cfg.llm_dir)
            else:
                llm = AutoModelForCausalLM.from_pretrained(
                    cfg.llm_dir, dtype=dtype, device_map=device_map, attn_implementation="sdpa", **(extra or {})
                )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the language model from {cfg.llm_dir}: {e}") from e
    finally:
        if lazy is not None:
            close_all(lazy[1])
    # Never let llm/generation_config.json (e.g. Qwen2.5-Instruct's sampling defaults) leak into decoding.
    g = llm.generation_config
    llm.generation_config = GenerationConfig(
        bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id
    )
    return llm.eval()


def iter_parts(turns: Sequence[Turn]) -> Iterator[Any]:
    for turn in turns:
        yield from turn.content
