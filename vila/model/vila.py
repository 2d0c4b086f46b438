"""The VILA model: media embeddings spliced into the LLM input, then the LLM's ``generate``.

A request flows top-down: prompt parts -> decoded media -> preprocessing -> tower -> projector -> encoders
-> spliced ``inputs_embeds`` -> ``generate`` -> text. Everything constant (templates, stop tokens,
start/end token embeddings) is prepared once at load.
"""

from __future__ import annotations

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

from ..config import VilaConfig
from ..errors import CheckpointError, MediaError, PromptTooLongError, UsageError
from ..media import Image, Video, load_image
from ..preprocess import preprocess_frames, preprocess_images
from ..prompt import IMAGE_TOKEN, VIDEO_TOKEN, Template, build_user_text, get_template
from ..tokenizer import infer_stop_token_ids, media_token_ids
from .encoders import encode_images, encode_video, wrap
from .projector import MultimodalProjector

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
        # The reference resizes the LM head to len(tokenizer) (spec §6.7): extra checkpoint rows are cut off
        # (we mask their logits instead), and missing rows would be *randomly* initialised, making its output
        # non-deterministic. We never add rows: media tokens are replaced by embeddings before the LLM sees
        # them, so every real token id keeps its exact logit and the output stays deterministic.
        self.num_generatable = min(len(tokenizer), vocab)
        self._token_embeds: dict[str, torch.Tensor] = {}
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
        one, is part of every start/end block: quirk #4). Cached: these strings are constant."""
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
    ) -> PreparedPrompt:
        """Decode and encode the media of a conversation and build the LLM input embeddings."""
        template = template or self.template
        cfg = self.config if video_max_tiles is None else self.config.with_overrides(video_max_tiles=video_max_tiles)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        images: list[PIL.Image.Image] = []
        videos = []
        for turn in turns:
            for part in turn.content:
                if isinstance(part, (Image, PIL.Image.Image)):
                    images.append(load_image(part))
                elif isinstance(part, Video):
                    from ..video import load_video

                    videos.append(
                        load_video(
                            part,
                            num_frames=num_video_frames or cfg.num_video_frames,
                            fps=cfg.fps if fps is None else fps,
                        )
                    )
                elif not isinstance(part, str):
                    raise UsageError(
                        f"unsupported prompt part {type(part).__name__}; use str, vila.Image, vila.Video or a PIL image"
                    )
        timings["media_decode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        batch = preprocess_images(images, cfg) if images else None
        frame_pixels = [preprocess_frames(v.frames, cfg) for v in videos]
        timings["preprocess_s"] = time.perf_counter() - t0

        # Render the conversation. In `dynamic` mode a single image becomes one "<image>\n" per tile.
        image_token = IMAGE_TOKEN
        if batch is not None and batch.tokens_per_image[0] > 1:
            image_token = (IMAGE_TOKEN + "\n") * batch.tokens_per_image[0]
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

        t0 = time.perf_counter()
        with torch.no_grad():
            image_blocks, video_blocks = self._encode_media(batch, frame_pixels)
        timings["vision_encode_s"] = time.perf_counter() - t0

        inputs_embeds = self._splice(input_ids, image_blocks, video_blocks)
        media_tokens = [b.shape[0] for b in image_blocks] + [b.shape[0] for b in video_blocks]
        return PreparedPrompt(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            prompt_text=prompt_text,
            media_tokens=media_tokens,
            video_durations=[v.duration for v in videos],
            timings=timings,
        )

    def _encode_media(self, batch: Any, frame_pixels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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
            feats = torch.stack(encode_images(self.vision_tower, self.mm_projector, cfg.vision, pixels, None, VISION_CHUNK))
            video_blocks.append(encode_video(feats, cfg.video_encoder, self.embed_text))
        return image_blocks, video_blocks

    def _splice(self, input_ids: torch.Tensor, image_blocks: list[torch.Tensor], video_blocks: list[torch.Tensor]) -> torch.Tensor:
        """Replace each media token by the next embedding block of its kind (spec §5.6)."""
        kind_of = {self.media_token_ids["image"]: "image", self.media_token_ids["video"]: "video"}
        queues = {"image": deque(image_blocks), "video": deque(video_blocks)}
        is_media = torch.isin(input_ids, torch.tensor(list(kind_of)))
        rows = self.llm.get_input_embeddings().num_embeddings
        unknown = (input_ids >= rows) & ~is_media
        if unknown.any():
            token = self.tokenizer.convert_ids_to_tokens(int(input_ids[unknown][0]))
            raise UsageError(f"the prompt contains {token!r}, a token this model has no embedding for; remove it from the text")
        # Media ids may lie beyond the embedding table (added tokens); their rows are never used.
        safe_ids = input_ids.masked_fill(is_media, 0).to(self._embed_device)
        with torch.no_grad():
            text = self.llm.get_input_embeddings()(safe_ids)
        pieces, start = [], 0
        for pos in is_media.nonzero().flatten().tolist():
            pieces.append(text[start:pos])
            queue = queues[kind_of[int(input_ids[pos])]]
            if not queue:
                raise UsageError("the prompt has more media tokens than media; do not type <image> or <vila/video> in text")
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
        eos), never back-filled from ``llm/generation_config.json`` (spec generation.md §8.2)."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        if max_new_tokens is None:
            # The reference's max_length = model_max_length counts the prompt too.
            max_new_tokens = self.context_length - prompt_len
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
    ) -> GenerationResult:
        """Like :meth:`generate_content`, returning token ids, counts and timings as well."""
        validate_generation_args(max_new_tokens, temperature, top_p, top_k, num_video_frames, fps)
        if video_max_tiles is not None and (not isinstance(video_max_tiles, int) or video_max_tiles < 1):
            raise UsageError(f"video_max_tiles must be a positive integer, got {video_max_tiles!r}")
        if temperature is not None and temperature == 0:
            do_sample = False
        template = get_template(conv_mode) if conv_mode else self.template
        stop_ids = infer_stop_token_ids(self.tokenizer, template) if conv_mode else self.stop_token_ids
        turns = to_turns(prompt)
        prepared = self.prepare(
            turns, template=template, num_video_frames=num_video_frames, fps=fps, video_max_tiles=video_max_tiles
        )
        n = prepared.inputs_embeds.shape[0]
        if n >= self.context_length:
            media = ", ".join(str(m) for m in prepared.media_tokens) or "none"
            raise PromptTooLongError(
                f"the prompt needs {n} positions (media: {media}) but the model's context is {self.context_length}; "
                "use fewer or smaller images, fewer video frames (num_video_frames / --num-video-frames) or a lower fps"
            )
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
        if seed is not None:
            torch.manual_seed(seed)

        t0 = time.perf_counter()
        embeds = prepared.inputs_embeds[None].to(self._embed_device)
        with torch.no_grad():
            out = self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                generation_config=generation_config,
                logits_processor=processors,
                streamer=streamer,
            )
        timings = dict(prepared.timings, generate_s=time.perf_counter() - t0)
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

    def decode_time_tokens(self, text: str, video_durations: Sequence[float]) -> str:
        """Rewrite time tokens ``<tK>`` to seconds of the last video, as the reference CLI does (spec §7.6).

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
        (rewrite time tokens ``<tK>`` of video answers to seconds, as ``vila-infer`` does).
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
    LM-head rows off (quirk #11)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.limit :] = -float("inf")
        return scores


def to_turns(prompt: Any) -> list[Turn]:
    """Normalise a prompt (str, one part, a list of parts, or a list of role/content dicts) to turns."""
    if isinstance(prompt, (str, Image, Video, PIL.Image.Image)):
        return [Turn("user", [prompt])]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, dict) for t in prompt):
        turns = []
        for t in prompt:
            role = {"human": "user", "gpt": "assistant"}.get(t.get("role"), t.get("role"))
            if role not in ("user", "assistant"):
                raise UsageError(f"a turn's role must be 'user' or 'assistant', got {t.get('role')!r}")
            content = t.get("content", "")
            turns.append(Turn(role, list(content) if isinstance(content, (list, tuple)) else [content]))
        if turns[-1].role != "user":
            raise UsageError("the last turn of a conversation must be the user's")
        return turns
    if isinstance(prompt, Sequence):
        return [Turn("user", list(prompt))]
    raise UsageError(f"unsupported prompt type {type(prompt).__name__}; pass a string or a list of parts")


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


def load_projector(cfg: VilaConfig, folder: Path | None, dtype: torch.dtype, device: torch.device) -> MultimodalProjector:
    """Built on the meta device, weights assigned straight from safetensors (no random init)."""
    from safetensors.torch import load_file

    with torch.device("meta"):
        projector = MultimodalProjector(cfg.projector_type, cfg.vision.mm_hidden_size, cfg.llm_hidden_size)
    if folder is None:
        return projector
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {folder}; the checkpoint is incomplete (re-download it)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device=str(device)))
    state = {k: v.to(dtype) for k, v in state.items()}
    expected = projector.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: projector weights do not match type {cfg.projector_type!r} "
            f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})"
        )
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise CheckpointError(
                f"{folder}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)} "
                f"(mm_hidden_size {cfg.vision.mm_hidden_size}, LLM hidden {cfg.llm_hidden_size})"
            )
    projector.load_state_dict(state, assign=True)
    return projector.eval()


def load_llm(cfg: VilaConfig, dtype: torch.dtype, device_map: Any, extra: dict[str, Any] | None = None) -> nn.Module:
    """The LLM through ``AutoModelForCausalLM`` (meta-device init, weights loaded straight into place)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            llm = AutoModelForCausalLM.from_pretrained(
                cfg.llm_dir, dtype=dtype, device_map=device_map, attn_implementation="sdpa", **(extra or {})
            )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the language model from {cfg.llm_dir}: {e}") from e
    # Never let llm/generation_config.json (e.g. Qwen2.5-Instruct's sampling defaults) leak into decoding.
    g = llm.generation_config
    llm.generation_config = GenerationConfig(bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id)
    return llm.eval()


def iter_parts(turns: Sequence[Turn]) -> Iterator[Any]:
    for turn in turns:
        yield from turn.content
