"""The processor: a conversation -> prompt text, token ids, media items and where each item goes.

Pure data work, no model: the tokenizer, the template and the config are inputs. The model
(:mod:`vila.model.vila`) turns the media items into embeddings and splices them in at the placements
computed here. A request flows: :func:`to_turns` -> :func:`plan_media` (cache look-ups, decoding) ->
:meth:`MediaPlan.preprocess` -> (the model encodes, :meth:`MediaPlan.fill`) -> :func:`render_prompt` ->
:func:`media_placements`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from .cache import FeatureCache, content_digest, media_key
from .config import VilaConfig
from .errors import UsageError
from .media import Image, Video, load_image, prompt_part
from .preprocess import ImageBatch, frame_transform, preprocess_frames, preprocess_images
from .prompt import IMAGE_TOKEN, VIDEO_TOKEN, Template, build_user_text


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
    # The context this request may fill; None means ``model.context_length``. VILA-HD raises it for large
    # look-close settings, as the reference CLI does.
    context_length: int | None = None


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


def iter_parts(turns: Sequence[Turn]) -> Iterator[Any]:
    for turn in turns:
        yield from turn.content


def check_parts(turns: Sequence[Turn]) -> list[Any]:
    """The conversation's parts in order, refusing unknown part types and a prompt with nothing in it."""
    parts = list(iter_parts(turns))
    for part in parts:
        if not isinstance(part, (str, Image, Video, PIL.Image.Image)):
            raise UsageError(
                f"unsupported prompt part {type(part).__name__}; use str, vila.Image, vila.Video or a PIL image"
            )
    if all(isinstance(part, str) and not part.strip() for part in parts):
        raise UsageError("the prompt is empty; give some text or at least one image or video")
    return parts


# -- media items ---------------------------------------------------------------------------------------


@dataclass
class ImageItem:
    """One image of a prompt: its encoded blocks (a cache hit, or after encoding) or its decoded pixels."""

    key: str | None
    blocks: list[torch.Tensor] | None = None  # one wrapped block per <image> token it occupies
    image: PIL.Image.Image | None = None


@dataclass
class VideoItem:
    key: str | None
    block: torch.Tensor | None = None
    duration: float = 0.0
    frames: list[Any] | None = None  # decoded frames, until preprocessed


@dataclass
class MediaPlan:
    """The media of one conversation on their way from parts to embedding blocks."""

    tiled: bool
    images: list[ImageItem] = field(default_factory=list)
    videos: list[VideoItem] = field(default_factory=list)
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

    def fill(
        self, image_blocks: Iterator[torch.Tensor], video_blocks: Iterator[torch.Tensor], cache: FeatureCache | None
    ) -> None:
        """Take the encoded blocks of this plan's missing media, in order, from the two iterators (which may hold
        later plans' blocks too) and remember them in ``cache``."""
        if self.batch is not None:
            missing = [item for item in self.images if item.blocks is None]
            for item, count in zip(missing, self.batch.tokens_per_image):
                item.blocks = [next(image_blocks) for _ in range(count)]
                item.image = None
                if cache is not None:
                    cache.put(item.key, item.blocks)
            self.batch = None
        for item in (v for v in self.videos if v.block is None):
            item.block = next(video_blocks)
            if cache is not None:
                cache.put(item.key, (item.block, item.duration))
        self.frame_pixels = []

    @property
    def image_blocks(self) -> list[torch.Tensor]:
        return [block for item in self.images for block in item.blocks or []]

    @property
    def video_blocks(self) -> list[torch.Tensor]:
        return [item.block for item in self.videos if item.block is not None]


def plan_media(
    parts: Sequence[Any],
    cfg: VilaConfig,
    *,
    num_frames: int,
    fps: float,
    cache: FeatureCache | None = None,
    cache_context: str = "",
) -> MediaPlan:
    """Look every media part up in ``cache`` (keys include ``cache_context``: what else the embeddings depend
    on) and decode the ones that miss."""
    num_images = sum(isinstance(part, (Image, PIL.Image.Image)) for part in parts)
    # The reference tiles an image only when it is the prompt's only one (`generate_content`, NVlabs/VILA
    # `llava/model/llava_arch.py`); video frames never count as images here.
    plan = MediaPlan(tiled=num_images == 1 and cfg.image_aspect_ratio in ("dynamic", "dynamic_s2"))
    for part in parts:
        if isinstance(part, (Image, PIL.Image.Image)):
            source = part.source if isinstance(part, Image) else part
            key = None
            if cache is not None:
                key = media_key("image-tiled" if plan.tiled else "image", content_digest(source), cache_context)
            blocks = cache.get(key) if cache is not None else None
            plan.images.append(ImageItem(key, blocks, None if blocks is not None else load_image(part)))
        elif isinstance(part, Video):
            key = None
            if cache is not None:
                key = media_key(f"video:{num_frames}:{fps}", content_digest(part.source), cache_context)
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                plan.videos.append(VideoItem(key, block=hit[0], duration=hit[1]))
                continue
            from .video import load_video  # PyAV / OpenCV are imported only when a video is asked for

            decoded = load_video(part, num_frames=num_frames, fps=fps, transform=frame_transform(cfg))
            plan.videos.append(VideoItem(key, duration=decoded.duration, frames=decoded.frames))
    return plan


def concat_image_batches(batches: Sequence[ImageBatch]) -> ImageBatch | None:
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


# -- prompt text and ids -------------------------------------------------------------------------------


def render_prompt(
    turns: Sequence[Turn], template: Template, tokenizer: Any, *, tiles: int | None = None
) -> tuple[str, list[int]]:
    """The prompt text (the assistant turn opened, as generation sees it) and its token ids.

    ``tiles``: the tile count of a lone image in ``dynamic`` mode, which the reference's ``generate_content``
    (NVlabs/VILA ``llava/model/llava_arch.py``) writes as ``"<image>\\n" * tiles`` — a newline after the token
    even for a single tile. None (every other case, ``dynamic_s2`` included): each image is one ``<image>``.
    """
    image_token = (IMAGE_TOKEN + "\n") * tiles if tiles is not None else IMAGE_TOKEN
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
    prompt_text = template.render(messages + [("assistant", None)], tokenizer)
    return prompt_text, list(tokenizer(prompt_text).input_ids)


def media_placements(input_ids: Sequence[int], media_token_ids: dict[str, int]) -> list[tuple[int, str]]:
    """``(position, kind)`` of every media token in ``input_ids``, in order; kind is "image" or "video". Each
    takes the next embedding block of its kind."""
    kind_of = {media_token_ids["image"]: "image", media_token_ids["video"]: "video"}
    return [(i, kind_of[t]) for i, t in enumerate(input_ids) if t in kind_of]


def continuation_ids(tokenizer: Any, prompt_text: str, continuation: str, prompt_len: int | None = None) -> list[int]:
    """The token ids of ``continuation`` after ``prompt_text``, as evaluation harnesses count them
    (lm-evaluation-harness's ``_encode_pair``): ``tok(prompt_text + continuation)[len(tok(prompt_text)):]``, so a
    merge across the boundary is counted in the continuation and the prompt keeps generation's own ids.
    ``prompt_len``: ``len(tok(prompt_text))`` when the caller has it already."""
    whole = tokenizer(prompt_text + continuation).input_ids
    if prompt_len is None:
        prompt_len = len(tokenizer(prompt_text).input_ids)
    return list(whole[prompt_len:])
