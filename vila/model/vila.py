"""The VILA model: media embeddings spliced into the LLM input, logits (``forward``, ``score``); answers come
from the engine (:mod:`vila.engine`).

A request flows top-down: the processor (:mod:`vila.processor`: turns, decoded media, prompt ids) ->
preprocessing -> tower -> projector -> encoders -> spliced ``inputs_embeds`` -> the engine -> text.
Everything constant (templates, stop tokens, start/end token embeddings) is prepared once at load; nothing
about a request is stored on the model.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torch import nn

from .. import engine
from ..cache import FeatureCache
from ..chat import ChatSession
from ..config import VilaConfig
from ..engine import GenerationResult
from ..errors import PromptTooLongError, UsageError, VilaError
from ..media import Video
from ..preprocess import preprocess_frames
from ..processor import (
    MediaPlan,
    PreparedPrompt,
    Turn,
    check_parts,
    concat_image_batches,
    continuation_ids,
    media_placements,
    plan_media,
    render_prompt,
    to_turns,
)
from ..prompt import Template, get_template
from ..streaming import TextStream
from ..tokenizer import infer_stop_token_ids, media_token_ids
from .encoders import encode_images, encode_video, wrap
from .projector import MultimodalProjector

logger = logging.getLogger(__name__)
# tokenizer_config.json stores a huge sentinel when no limit was saved.
_NO_LIMIT = 10**9
VISION_CHUNK = 32  # tiles per vision-tower forward; bounds activation memory for long videos


class VilaModel(nn.Module):
    """A loaded VILA / NVILA checkpoint. Create it with :func:`vila.load`."""

    # Keyword arguments of ``generate`` that are settings of the media path (``prepare_many`` takes them).
    media_settings: tuple[str, ...] = ("num_video_frames", "fps", "video_max_tiles")
    # Whether ``prepare_many`` takes ``cache=`` (False where media embeddings depend on the question, VILA-HD).
    supports_feature_cache: bool = True

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

    def _plan_media(
        self,
        turns: Sequence[Turn],
        cfg: VilaConfig,
        num_video_frames: int | None,
        fps: float | None,
        cache: FeatureCache | None,
    ) -> MediaPlan:
        """The processor's media plan, after refusing videos that cannot fit before any frame is decoded."""
        parts = check_parts(turns)
        num_frames = num_video_frames or cfg.num_video_frames
        video_fps = cfg.fps if fps is None else fps
        self._check_video_positions(sum(isinstance(part, Video) for part in parts), cfg, num_frames, video_fps)
        # Cached embeddings are only valid for this model, dtype, device and media config.
        context = f"{id(self)}|{self.dtype}|{self.device}|{cfg!r}" if cache is not None else ""
        return plan_media(parts, cfg, num_frames=num_frames, fps=video_fps, cache=cache, cache_context=context)

    def _encode_plans(self, plans: Sequence[MediaPlan], cache: FeatureCache | None) -> None:
        """One :meth:`_encode_media` call for the missing media of all ``plans``; results go back into them."""
        batches = [p.batch for p in plans if p.batch is not None]
        frames = [pixels for p in plans for pixels in p.frame_pixels]
        image_blocks, video_blocks = self._encode_media(concat_image_batches(batches), frames)
        images, videos = iter(image_blocks), iter(video_blocks)
        for plan in plans:
            plan.fill(images, videos, cache)

    def _assemble(
        self, turns: Sequence[Turn], plan: MediaPlan, template: Template, timings: dict[str, float]
    ) -> PreparedPrompt:
        """Render the conversation (the processor) and splice the media blocks into its embeddings."""
        image_blocks, video_blocks = plan.image_blocks, plan.video_blocks
        tiles = None
        if plan.tiled and self.config.image_aspect_ratio == "dynamic":
            tiles = len(plan.images[0].blocks or ())
        prompt_text, ids = render_prompt(turns, template, self.tokenizer, tiles=tiles)
        input_ids = torch.tensor(ids, dtype=torch.long)
        inputs_embeds = self._splice(input_ids, image_blocks, video_blocks)
        logger.debug(
            "visual tokens: %s per image, %s per video; %d prompt positions in all",
            [sum(b.shape[0] for b in item.blocks or ()) for item in plan.images],
            [b.shape[0] for b in video_blocks],
            inputs_embeds.shape[0],
        )
        return PreparedPrompt(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            prompt_text=prompt_text,
            media_tokens=[b.shape[0] for b in image_blocks] + [b.shape[0] for b in video_blocks],
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
        placements = media_placements(input_ids.tolist(), self.media_token_ids)
        queues = {"image": deque(image_blocks), "video": deque(video_blocks)}
        is_media = torch.zeros_like(input_ids, dtype=torch.bool)
        is_media[[pos for pos, _ in placements]] = True
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
        for pos, kind in placements:
            pieces.append(text[start:pos])
            if not queues[kind]:
                raise UsageError(
                    "the prompt has more media tokens than media; do not type <image> or <vila/video> in text"
                )
            pieces.append(queues[kind].popleft().to(text.device, text.dtype))
            start = pos + 1
        pieces.append(text[start:])
        for kind, queue in queues.items():
            if queue:
                raise RuntimeError(f"not all {kind} embeddings were consumed")
        return torch.cat(pieces)

    # -- logits ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The LLM's logits ``(batch, positions, vocab)`` for token ids or for input embeddings (e.g. a
        :class:`PreparedPrompt`'s ``inputs_embeds[None]``, media spliced in). ``kwargs`` go to the LLM."""
        if (input_ids is None) == (inputs_embeds is None):
            raise UsageError("pass exactly one of input_ids and inputs_embeds")
        device = self._embed_device
        return self.llm(
            input_ids=None if input_ids is None else input_ids.to(device),
            inputs_embeds=None if inputs_embeds is None else inputs_embeds.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            **kwargs,
        ).logits

    def score(
        self, prompt: Any, continuations: Sequence[str], *, template: Template | None = None, **media: Any
    ) -> list[float]:
        """The log-likelihood (natural log, summed over tokens) of each continuation as the answer to ``prompt``.

        The prompt is rendered as generation sees it (the assistant turn opened) and its media are encoded once;
        all continuations go through the LLM in one batched forward. A continuation's tokens are those
        evaluation harnesses take (lm-evaluation-harness's ``_encode_pair``): ``tok(prompt_text + c)`` minus the
        first ``len(tok(prompt_text))`` ids, so the prompt keeps generation's own ids. Log-probabilities are over
        the ids generation can emit (``len(tokenizer)``). ``media``: the settings of :attr:`media_settings`.
        """
        if isinstance(continuations, str) or not continuations:
            raise UsageError("continuations must be a non-empty list of strings")
        prepared = self.prepare(to_turns(prompt), template=template, **media)
        known = len(prepared.input_ids)  # the prompt's own ids, tokenised once
        conts = [continuation_ids(self.tokenizer, prepared.prompt_text, c, known) for c in continuations]
        n, longest = prepared.inputs_embeds.shape[0], max(len(c) for c in conts)
        context = prepared.context_length or self.context_length
        if n + longest > context:
            raise PromptTooLongError(
                f"the prompt and the longest continuation need {n + longest} positions but the model's context is "
                f"{context}; shorten the prompt or the continuations"
            )
        if longest == 0:
            return [0.0] * len(conts)
        device = self._embed_device
        # Right padding: under causal attention a real position never sees the pads after it.
        ids = torch.zeros(len(conts), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(conts), n + longest, dtype=torch.long, device=device)
        for i, c in enumerate(conts):
            ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : n + len(c)] = 1
        with torch.no_grad():
            tail = self.llm.get_input_embeddings()(ids)
            head = prepared.inputs_embeds.to(device, tail.dtype)[None].expand(len(conts), -1, -1)
            # Only the last longest + 1 positions' logits (position n - 1 + k predicts continuation token k): the
            # prompt's would be (positions x vocabulary) floats that nothing reads.
            logits = self.forward(
                inputs_embeds=torch.cat([head, tail], dim=1), attention_mask=mask, logits_to_keep=longest + 1
            )
            logprobs = logits[:, :longest, : self.num_generatable].float().log_softmax(-1)
            picked = logprobs.gather(-1, ids[..., None].clamp(max=self.num_generatable - 1))[..., 0]
        return [float(picked[i, : len(c)].sum()) for i, c in enumerate(conts)]

    # -- generation (the engine, vila/engine.py) ------------------------------------------------------------
    def generate(self, prompt: Any, **settings: Any) -> GenerationResult:
        """Like :meth:`generate_content`, returning token ids, counts, timings and the finish reason as well.

        ``template`` (a :class:`vila.prompt.Template`, e.g. the model's with another system prompt) wins over
        ``conv_mode``; ``streamer``, ``logits_processor`` and ``stopping_criteria`` take transformers-style
        objects (criteria see the new tokens only, and ``scores=None``). Further media settings of this model
        are its :attr:`media_settings` (e.g. VILA-HD's)."""
        return engine.generate(self, prompt, **settings)

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

    def stream_content(self, prompt: Any, **kwargs: Any) -> TextStream:
        """Like :meth:`generate_content`, but an iterator over pieces of the answer as they are generated.

        The pieces joined equal ``generate_content``'s answer. After the iteration, ``.result`` holds the
        :class:`GenerationResult` (token ids, timings). Pieces come as soon as tokens decode to whole
        characters. Generation runs at most one token ahead of the reader; leaving the loop early (or
        ``close()``, or dropping the stream) stops it within one token.
        """
        return engine.stream_content(self, prompt, **kwargs)

    def chat(self, **kwargs: Any) -> Any:
        """A multi-turn :class:`vila.chat.ChatSession` with this model (history, media cache, streaming).

        Keyword arguments are generation settings used for every turn (``max_new_tokens``, ``temperature``, ...).
        """
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
