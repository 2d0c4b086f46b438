"""VILA-HD (``llava_topdown_llama``): VILA with the PS3 tower, which looks closer at the image patches that
matter for the question (NVlabs/VILA ``llava/model/llava_arch.py``, ``LlavaTopDownMetaForCausalLM``, and
``llava/model/language_model/llava_topdown_llama.py``).

Per request, on top of :class:`~vila.model.vila.VilaModel`:

1. every image goes through PS3's low-res pass; its tokens alone make a first set of image embeddings;
2. ``after_prompt``: the LLM reads the prompt with those embeddings up to the end of the user turn, and the
   projector's ``top_down_prompt_head`` turns the last hidden state into a "top-down prompt";
   ``after_image``: PS3's learned prior prompt is used instead;
3. PS3 selects high-res patches for that prompt and encodes them (``num_look_close`` passes); each image
   becomes ``[low-res tokens, selected high-res tokens, "\\n"]`` and generation proceeds as usual.

The five selection settings are keyword arguments of ``generate`` / ``generate_content`` / ``prepare_many``
(``vila-infer`` flags, or the reference's environment variables). They travel with the request: nothing about a
request is stored on the model, so two threads may use one model with different settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import assign_weights, stored_keys
from ..config import TopDownConfig, VilaConfig
from ..errors import UnsupportedModelError, UsageError, VilaError
from ..families import ps3_projectors
from ..media import Video
from ..processor import PreparedPrompt, Turn, iter_parts
from ..prompt import Template
from .encoders import wrap
from .projector import DownSample, MultimodalProjector
from .ps3 import LookClose, Mlp, PS3Config, PS3Tower, plan_passes
from .vila import VilaModel

LOOK_CLOSE_MODES = ("after_prompt", "after_image")
# Projector types VILA-HD can combine with PS3 (the reference's encode_images_ps3 branches).
PS3_PROJECTORS = ps3_projectors()
_SETTINGS = (
    "num_look_close",
    "num_token_look_close",
    "select_num_each_scale",
    "look_close_mode",
    "smooth_selection_prob",
)
_DUMMY_USER_TEXT = "Here is the prompt."  # the reference's probe for where a user turn ends


def context_floor(num_look_close: int | None = None, num_token_look_close: int | None = None) -> int:
    """The context length the reference's CLI raises the tokenizer limit to for these settings
    (``configure_ps3_and_context_length`` in NVlabs/VILA ``llava/cli/infer.py``; 2560 is its fixed per-pass
    estimate)."""
    floor = 0
    if num_look_close is not None:
        floor = max(floor, num_look_close * 2560 // 4 + 1024)
    if num_token_look_close is not None:
        floor = max(floor, num_token_look_close // 4 + 1024)
    return floor


@dataclass(frozen=True)
class LookCloseSettings:
    """The five VILA-HD settings of one request, resolved against the checkpoint's defaults."""

    look_close_mode: str
    num_look_close: int
    num_token_look_close: int | None  # wins over num_look_close when set
    select_num_each_scale: tuple[int, ...]  # patches per look-close at each high-res scale
    smooth_selection_prob: bool
    min_context: int = 0  # context_floor of the settings the caller passed explicitly


@dataclass
class LookCloseInfo:
    """What one request selected, for inspection (``model.prepare(...).look_close``)."""

    settings: LookCloseSettings
    top_down_position: int | None  # index in input_ids of the token whose hidden state made the prompt
    prompt_pass_positions: int | None  # LLM positions of the prompt pass
    prompt: torch.Tensor | None  # (mm_hidden,) top-down prompt; None = PS3's prior prompt (after_image)
    num_passes: int
    probs: list[torch.Tensor]  # per high-res scale (images, fh, fw)
    selected: list[list[torch.Tensor]]  # per image, per high-res scale: selected flat cell indices, ascending
    tokens: list[tuple[int, list[int]]]  # per image: (low-res LLM tokens, high-res LLM tokens per scale)


@dataclass
class LookClosePrompt(PreparedPrompt):
    """A VILA-HD request ready for the LLM, with what its look-close selected."""

    look_close: LookCloseInfo | None = None


class TopDownProjector(MultimodalProjector):
    """The projector plus VILA-HD's extras, stored in the same ``mm_projector/`` folder: the top-down prompt
    head (only in checkpoints trained ``after_prompt``) and the high-res position / scale embeddings."""

    def __init__(
        self,
        kind: str,
        mm_hidden: int,
        hidden: int,
        td: TopDownConfig,
        low_res_tokens: int,
        num_scales: int,
        with_head: bool,
    ):
        super().__init__(kind, mm_hidden, hidden)
        if with_head:
            if td.prompt_head_type == "linear":
                self.top_down_prompt_head: nn.Module = nn.Linear(hidden, mm_hidden)
            else:  # timm Mlp: fc1, exact GELU, LayerNorm(2*mm_hidden), fc2
                self.top_down_prompt_head = Mlp(hidden, 2 * mm_hidden, mm_hidden, norm_eps=1e-5)
        if td.high_res_pos_embed:
            self.high_res_pos_embed = nn.Parameter(torch.empty(1, low_res_tokens, hidden))
            self.high_res_scale_embed = nn.ParameterList(
                nn.Parameter(torch.empty(1, 1, hidden)) for _ in range(num_scales)
            )

    @property
    def has_prompt_head(self) -> bool:
        return hasattr(self, "top_down_prompt_head")

    @property
    def has_pos_embed(self) -> bool:
        return hasattr(self, "high_res_pos_embed")


class VilaHDModel(VilaModel):
    """A loaded VILA-HD checkpoint (PS3 vision tower, top-down patch selection). Create it with :func:`vila.load`."""

    vision_tower: PS3Tower
    mm_projector: TopDownProjector
    media_settings = (*VilaModel.media_settings, *_SETTINGS)
    # The selected patches, hence the image embeddings, depend on the question.
    supports_feature_cache = False

    def __init__(
        self,
        config: VilaConfig,
        tokenizer: Any,
        llm: nn.Module,
        vision_tower: PS3Tower,
        mm_projector: TopDownProjector,
        conv_mode: str,
    ):
        super().__init__(config, tokenizer, llm, vision_tower, mm_projector, conv_mode)
        assert config.top_down is not None
        self.top_down = config.top_down

    # -- settings --------------------------------------------------------------------------------------
    def look_close_settings(
        self,
        *,
        num_look_close: int | None = None,
        num_token_look_close: int | None = None,
        select_num_each_scale: Sequence[int] | None = None,
        look_close_mode: str | None = None,
        smooth_selection_prob: bool | None = None,
    ) -> LookCloseSettings:
        """Validate per-request settings and fill the rest from the checkpoint (the five settings the reference
        CLI reads from ``NUM_LOOK_CLOSE``, ``NUM_TOKEN_LOOK_CLOSE``, ``SELECT_NUM_EACH_SCALE``, ``LOOK_CLOSE_MODE``
        and ``SMOOTH_SELECTION_PROB``)."""
        td, ps3 = self.top_down, self.vision_tower.config
        mode = look_close_mode if look_close_mode is not None else td.look_close_mode
        if mode is None:
            raise UsageError(
                "this checkpoint's config.json sets no look_close_mode; pass look_close_mode (--look-close-mode) after_prompt or after_image"
            )
        if mode not in LOOK_CLOSE_MODES:
            raise UsageError(f"look_close_mode must be 'after_prompt' or 'after_image', got {mode!r}")
        if mode == "after_prompt" and not self.mm_projector.has_prompt_head:
            raise UsageError(
                "look_close_mode 'after_prompt' needs the top-down prompt head, which this checkpoint does not have; use after_image"
            )
        for name, value in (("num_look_close", num_look_close), ("num_token_look_close", num_token_look_close)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        n = num_look_close if num_look_close is not None else td.num_look_close
        t = num_token_look_close if num_token_look_close is not None else td.num_token_look_close
        if t is None and n < 1:
            # The reference raises TypeError on 0 (the tower returns no selection maps), so there is no
            # low-res-only answer to reproduce.
            raise UsageError(
                f"num_look_close must be at least 1, the checkpoint says {n}; pass num_look_close (--num-look-close) 1 or more"
            )
        if select_num_each_scale is None:
            budgets = ps3.max_select_num_each_scale
        else:
            budgets = tuple(select_num_each_scale)
            k = ps3.num_high_res_scales
            if (
                len(budgets) != k
                or any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in budgets)
                or sum(budgets) < 1
            ):
                scales = "+".join(str(s) for s in ps3.scales[1:])
                raise UsageError(
                    f"select_num_each_scale must be {k} non-negative integers (one per high-res scale {scales}, "
                    f"e.g. {list(ps3.max_select_num_each_scale)}), got {select_num_each_scale!r}"
                )
        if smooth_selection_prob is not None and not isinstance(smooth_selection_prob, bool):
            raise UsageError(f"smooth_selection_prob must be True or False, got {smooth_selection_prob!r}")
        return LookCloseSettings(
            look_close_mode=mode,
            num_look_close=n,
            num_token_look_close=t,
            select_num_each_scale=budgets,
            smooth_selection_prob=bool(smooth_selection_prob),
            min_context=context_floor(num_look_close, num_token_look_close),
        )

    # -- API -------------------------------------------------------------------------------------------
    def generate_content(self, prompt: Any, **kwargs: Any) -> str:
        """Answer a prompt with at least one image (see :meth:`VilaModel.generate_content`). VILA-HD settings,
        each defaulting to the checkpoint's:

        * ``num_look_close``: high-res passes (each selects ``sum(select_num_each_scale)`` patches);
        * ``num_token_look_close``: total high-res patches instead (wins over ``num_look_close``);
        * ``select_num_each_scale``: patches per pass at each high-res scale, e.g. ``[512, 2048]`` (1.5K);
        * ``look_close_mode``: ``"after_prompt"`` (selection guided by the question) or ``"after_image"``;
        * ``smooth_selection_prob``: select larger regions (probabilities averaged over a 6x6 grid).
        """
        return self.generate(prompt, **kwargs).text

    # -- prompt ----------------------------------------------------------------------------------------
    def prepare(self, turns: Sequence[Turn], **kwargs: Any) -> LookClosePrompt:
        """:meth:`VilaModel.prepare` with the VILA-HD steps; takes the settings of :meth:`generate_content` too.
        The result's ``look_close`` says what was selected."""
        (result,) = self.prepare_many([turns], **kwargs)
        return result

    def prepare_many(
        self,
        conversations: Sequence[Sequence[Turn]],
        *,
        template: Template | None = None,
        num_video_frames: int | None = None,
        fps: float | None = None,
        video_max_tiles: int | None = None,
        cache: Any = None,
        return_errors: bool = False,
        num_look_close: int | None = None,
        num_token_look_close: int | None = None,
        select_num_each_scale: Sequence[int] | None = None,
        look_close_mode: str | None = None,
        smooth_selection_prob: bool | None = None,
    ) -> list[Any]:
        """One conversation at a time (the top-down prompt depends on each one's text), with the VILA-HD
        settings of :meth:`generate_content`. ``num_video_frames``, ``fps`` and ``video_max_tiles`` are accepted
        for a uniform call but unused: a video is refused."""
        settings = self.look_close_settings(
            num_look_close=num_look_close,
            num_token_look_close=num_token_look_close,
            select_num_each_scale=select_num_each_scale,
            look_close_mode=look_close_mode,
            smooth_selection_prob=smooth_selection_prob,
        )
        if cache is not None:
            raise UsageError(
                "VILA-HD checkpoints cannot use a feature cache (the selected patches depend on the question)"
            )
        results: list[Any] = []
        for turns in conversations:
            try:
                results.append(self._prepare_one(turns, template or self.template, settings))
            except VilaError as e:
                if not return_errors:
                    raise
                results.append(e)
        return results

    def _prepare_one(self, turns: Sequence[Turn], template: Template, settings: LookCloseSettings) -> LookClosePrompt:
        """The prompt with low-res image embeddings, then the top-down prompt pass and the high-res look-close,
        whose embeddings replace the low-res ones (the reference's ``generate`` of ``LlavaTopDownMetaForCausalLM``)."""
        if any(isinstance(part, Video) for part in iter_parts(turns)):
            raise UsageError(
                "VILA-HD checkpoints answer about images only; pass frames as vila.Image parts instead of a video"
            )
        cfg, timings = self.config, {}
        t0 = time.perf_counter()
        plan = self._plan_media(turns, cfg, None, None, None)
        timings["media_decode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan.preprocess(cfg)
        timings["preprocess_s"] = time.perf_counter() - t0
        if plan.batch is None:
            # The reference treats the empty media dict as media and fails with an AssertionError.
            raise UsageError(
                "VILA-HD checkpoints need at least one image in the prompt; add an image (vila.Image / --media)"
            )
        t0 = time.perf_counter()
        tower = self.vision_tower
        start = self.embed_text(cfg.image_encoder.start_tokens)
        end = self.embed_text(cfg.image_encoder.end_tokens)
        with torch.no_grad():
            pixels = plan.batch.pixel_values.to(self.device, self.dtype)
            # The reference embeds the prompt with low-res image tokens alone for the top-down prompt pass.
            low = tower.low_res(pixels)
            low_feats, _ = embed_images(self.mm_projector, tower.low_res_features(low), None)
        plan.fill(iter([wrap(f, start, end) for f in low_feats]), iter(()), None)
        timings["vision_encode_s"] = time.perf_counter() - t0
        low_prompt = self._assemble(turns, plan, template, timings)

        with torch.no_grad():
            t0 = time.perf_counter()
            prompt, position, positions = None, None, None
            if settings.look_close_mode == "after_prompt":
                prompt, position, positions = self._top_down_prompt(low_prompt, template)
            timings["top_down_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            prompts = None if prompt is None else prompt[None].expand(pixels.shape[0], -1)
            probs = tower.selection_probs(pixels, low, prompts, settings.smooth_selection_prob)
            passes = plan_passes(
                tower.total_cells(*pixels.shape[-2:]),
                settings.select_num_each_scale,
                settings.num_look_close,
                settings.num_token_look_close,
            )
            look = tower.look_close(pixels, low, probs, settings.select_num_each_scale, passes)
            feats, tokens = embed_images(self.mm_projector, tower.low_res_features(low), look)
            timings["look_close_s"] = time.perf_counter() - t0
        blocks = [wrap(f, start, end) for f in feats]
        info = LookCloseInfo(
            settings=settings,
            top_down_position=position,
            prompt_pass_positions=positions,
            prompt=prompt,
            num_passes=len(passes),
            probs=probs,
            selected=[[m[i].flatten().nonzero().flatten() for m in look.maps] for i in range(pixels.shape[0])],
            tokens=tokens,
        )
        base = {f.name: getattr(low_prompt, f.name) for f in fields(PreparedPrompt)}
        return LookClosePrompt(
            **base
            | {
                "inputs_embeds": self._splice(low_prompt.input_ids, blocks, []),
                "media_tokens": [b.shape[0] for b in blocks],
                "timings": timings,
                "context_length": max(self.context_length, settings.min_context),
            },
            look_close=info,
        )

    def top_down_position(self, input_ids: torch.Tensor, template: Template | None = None) -> int:
        """Index of the last token of the user turn: just before the template's text that closes a user turn
        and opens the answer (Qwen2: ``<|im_end|>\\n<|im_start|>assistant``), else the last token.

        The reference takes the first occurrence; prompts it can run have one user turn, where that is also the
        last. For a multi-turn conversation the last user turn (the question being answered) is used."""
        template = template or self.template
        text = template.render([("user", _DUMMY_USER_TEXT), ("assistant", None)], self.tokenizer)
        ending = self.tokenizer(text.split(_DUMMY_USER_TEXT)[-1].strip()).input_ids
        ids, n = input_ids.tolist(), len(ending)
        starts = [i for i in range(len(ids) - n + 1) if ids[i : i + n] == ending] if n else []
        return starts[-1] - 1 if starts else len(ids) - 1

    def _top_down_prompt(self, low_prompt: PreparedPrompt, template: Template) -> tuple[torch.Tensor, int, int]:
        """The LLM over the prompt with low-res images, up to the end of the user turn; the top-down prompt
        head maps the last hidden state (after the final norm) to PS3's channel space."""
        ids = low_prompt.input_ids
        p = self.top_down_position(ids, template)
        images = int((ids[: p + 1] == self.media_token_ids["image"]).sum())
        # The reference shifts by the low-res token count per image, assuming a one-token end token and no
        # start tokens (true for every Qwen2 VILA-HD); reproduced as is.
        n_low = self._low_res_llm_tokens()
        last = min(p + n_low * images, low_prompt.inputs_embeds.shape[0] - 1)
        embeds = low_prompt.inputs_embeds[None, : last + 1].to(self._embed_device)
        hidden = self.llm.base_model(inputs_embeds=embeds).last_hidden_state[0, -1]
        head = self.mm_projector.top_down_prompt_head
        return head(hidden.to(self.device, self.dtype)), p, last + 1

    def _low_res_llm_tokens(self) -> int:
        g, r = self.vision_tower.config.low_res_grid, self.mm_projector.downsample
        return math.ceil(g / r) ** 2


# -- image embeddings ----------------------------------------------------------------------------------


def embed_images(
    proj: TopDownProjector, low_feats: torch.Tensor, look: LookClose | None
) -> tuple[list[torch.Tensor], list[tuple[int, list[int]]]]:
    """Tower features -> per image ``[low-res tokens, kept high-res tokens]`` (``encode_images_ps3``,
    NVlabs/VILA ``llava/model/llava_arch.py``). With a downsampling projector, a high-res LLM token is kept
    only if every cell under it was selected; only those are projected (the reference projects whole
    zero-filled grids, then drops the rest: the same tokens)."""
    r = proj.downsample
    low = proj(low_feats)  # (B, n_low, D)
    b = low.shape[0]
    pe_map = None
    if proj.has_pos_embed:
        pe = proj.high_res_pos_embed
        g = math.isqrt(pe.shape[1])
        pe_map = pe.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        if r > 1:
            side = math.isqrt(low.shape[1])
            low = low + _area_tokens(pe_map, (side, side)) + proj.high_res_scale_embed[0]
        else:
            low = low + pe + proj.high_res_scale_embed[0]
    if look is None:
        return list(low), [(low.shape[1], []) for _ in range(b)]

    per_scale: list[list[torch.Tensor]] = []  # [scale][image] -> (k, D)
    for s, (feats, m) in enumerate(zip(look.features, look.maps)):
        fh, fw = m.shape[-2:]
        if r > 1:
            size = (math.ceil(fh / r), math.ceil(fw / r))
            keep = F.interpolate(m[:, None], size=size, mode="area")[:, 0].flatten(1) == 1  # (B, n')
            assert isinstance(proj.layers[0], DownSample)
            grouped = proj.layers[0](feats)  # (B, n', r*r*C)
            tokens = proj.layers[1:](grouped[keep])
        else:
            size = (fh, fw)
            keep = m.flatten(1).bool()
            tokens = proj(feats[keep])
        if pe_map is not None:
            pos = (_area_tokens(pe_map, size) + proj.high_res_scale_embed[s + 1]).expand(b, -1, -1)
            tokens = tokens + pos[keep]
        per_scale.append(list(tokens.split(keep.sum(dim=1).tolist())))

    out, counts = [], []
    for i in range(b):
        high = torch.cat([scale[i] for scale in per_scale])
        if high.shape[0] == 0:
            high = low[i, :1]  # the reference's fallback when no whole group was selected
        out.append(torch.cat([low[i], high]))
        counts.append((low.shape[1], [scale[i].shape[0] for scale in per_scale]))
    return out, counts


def _area_tokens(pe_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, D, g, g)`` position embedding area-resized to ``size``, as ``(1, h*w, D)`` tokens."""
    return F.interpolate(pe_map, size=size, mode="area").flatten(2).transpose(1, 2)


# -- loading -------------------------------------------------------------------------------------------


def load_topdown_projector(
    cfg: VilaConfig, ps3: PS3Config, dtype: torch.dtype, device: torch.device
) -> TopDownProjector:
    """Projector and VILA-HD extras from ``mm_projector/*.safetensors``, built on the meta device. The prompt
    head is built when its weights are there (the reference builds it when trained ``after_prompt``)."""
    assert cfg.top_down is not None
    if cfg.projector_type not in PS3_PROJECTORS:
        raise UnsupportedModelError(
            f"mm_projector_type {cfg.projector_type!r} cannot be used with PS3; supported: {', '.join(PS3_PROJECTORS)}"
        )
    source = cfg.projector_source
    with_head = any(k.startswith("top_down_prompt_head.") for k in stored_keys(source))
    with torch.device("meta"):
        projector = TopDownProjector(
            cfg.projector_type,
            cfg.vision.mm_hidden_size,
            cfg.llm_hidden_size,
            cfg.top_down,
            ps3.low_res_token_num,
            len(ps3.scales),
            with_head,
        )
    hint = f" (type {cfg.projector_type!r}, high_res_pos_embed {cfg.top_down.high_res_pos_embed})"
    return assign_weights(projector, source, dtype=dtype, device=device, what="VILA-HD projector", hint=hint)


def load_vila_hd(
    cfg: VilaConfig, tokenizer: Any, llm: nn.Module, dtype: torch.dtype, device: torch.device, conv_mode: str
) -> VilaHDModel:
    """The PS3 tower and the projector of a VILA-HD checkpoint around an already loaded LLM."""
    if cfg.image_aspect_ratio not in ("resize", "pad", None):
        raise UnsupportedModelError(
            f"config.json: image_aspect_ratio {cfg.image_aspect_ratio!r} cannot be used with PS3 (use resize)"
        )
    if cfg.vision.select_feature != "cls_patch":
        # 'patch' drops token 0, which for PS3 is a real low-res token: PS3 has no class token
        raise UnsupportedModelError("config.json: PS3 checkpoints need mm_vision_select_feature 'cls_patch'")
    ps3 = PS3Config.from_dict(cfg.vision.raw)
    tower = PS3Tower.build(ps3, cfg.vision_source, dtype, device, select_layer=cfg.vision.select_layer)
    projector = load_topdown_projector(cfg, ps3, dtype, device)
    return VilaHDModel(cfg, tokenizer, llm, tower, projector, conv_mode)
