"""PS3, the VILA-HD vision tower: a SigLIP ViT that looks at a low-resolution view, then encodes only the
high-resolution patches a prompt selects.

This is the inference subset of the ``ps3-torch`` package (github NVlabs/PS3), written for this project
with plain torch modules. Module and parameter names equal the checkpoint's (``vision_model.trunk.blocks.0.
attn.qkv.weight``, ``vision_model.highres_selection_feature_module.blocks.0.weight``, ...), so the published
``vision_tower/model.safetensors`` loads as is. ``ps3-torch`` itself pins ``transformers<=4.49`` and builds its
ViT with ``timm``; neither is needed here. The ViT dimensions come from the timm model name in the config
(only the names PS3 was released with are known, see ``TIMM_VITS``).

One forward of the reference is split in steps the caller drives, so that VILA-HD's two tower calls (the
low-res pass for the top-down prompt, then the full pass) share one low-res pass:

* :meth:`PS3Tower.low_res` — resize to the first scale, run the ViT, keep block outputs and keys/values;
* :meth:`PS3Tower.selection_probs` — per high-res scale, the probability of looking closer at each patch;
* :meth:`PS3Tower.look_close` — pick the top patches (several passes), encode them attending to the low-res
  keys/values, and put their features back on each scale's grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ComponentSource, assign_weights
from ..errors import CheckpointError, UnsupportedModelError

# timm ViT presets PS3 was released with: (width, depth, heads, mlp_ratio, patch, img_size). SigLIP and
# SigLIP2 PS3 towers both use the so400m-378 geometry; no class token, qkv bias, LayerNorm eps 1e-6.
TIMM_VITS: dict[str, tuple[int, int, int, float, int, int]] = {
    "vit_so400m_patch14_siglip_378": (1152, 27, 16, 3.7362, 14, 378),
}
# The trunk's final norm and pooling head are stored but never used by VILA-HD, so they are not built.
UNUSED_PREFIXES = ("vision_model.trunk.norm.", "vision_model.trunk.attn_pool.")
# Keys of the test-only ``timm_model_kwargs`` override (shared/fixtures vilahd-tiny) mapped to our fields.
_TIMM_OVERRIDES = {"embed_dim": "width", "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio"}


# -- configuration -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PS3Config:
    """The PS3 tower, from ``vision_tower/config.json`` (flat ``ps3_vision_model``) or a ``PS3Model`` config
    (its ``vision_config``)."""

    model_name: str
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    pos_grid: int  # side of the stored position-embedding grid (27 for 378 px)
    scales: tuple[int, ...]  # ascending; scales[0] is the low-res view
    select_based_on_layer: tuple[int, ...]
    max_select_num: int
    max_select_num_each_scale: tuple[int, ...]  # per high-res scale, derived from max_select_num when null
    separate_pos_emb: bool = True
    highres_selection_feature: bool = True
    selection_hidden_dim: int = 512
    selection_out_dim: int = 512
    selection_depth: int = 3
    selection_kernel_size: int = 28

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PS3Config:
        if d.get("model_type") == "ps3" and isinstance(d.get("vision_config"), dict):
            d = d["vision_config"]
        if d.get("radio"):
            raise UnsupportedModelError(
                "PS3 towers with a C-RADIO trunk (radio: true) are not supported; use a SigLIP PS3 checkpoint"
            )
        name = str(d.get("model_name") or "")
        if name not in TIMM_VITS:
            raise UnsupportedModelError(
                f"vision_tower/config.json: unknown PS3 trunk {name!r}; supported: {', '.join(TIMM_VITS)}"
            )
        width, depth, heads, mlp_ratio, patch, img_size = TIMM_VITS[name]
        dims = {"width": width, "depth": depth, "num_heads": heads, "mlp_ratio": mlp_ratio}
        for key, value in (d.get("timm_model_kwargs") or {}).items():
            if key not in _TIMM_OVERRIDES:
                raise UnsupportedModelError(f"vision_tower/config.json: unsupported timm_model_kwargs key {key!r}")
            dims[_TIMM_OVERRIDES[key]] = value
        if d.get("img_size"):
            img_size = int(d["img_size"])
        if d.get("class_token"):
            raise UnsupportedModelError("PS3 towers with a class token are not supported (the released ones have none)")
        scales = tuple(
            sorted(int(s) for s in (d.get("ps3_scales") or d.get("s3_scales") or ()))
        )  # renamed in ps3-torch 0.1.2
        if len(scales) < 2:
            raise CheckpointError("vision_tower/config.json: ps3_scales needs at least two scales (low-res + high-res)")
        max_select = int(d.get("max_select_num") or 1280)
        per_scale = d.get("max_select_num_each_scale")
        if per_scale is None:
            per_scale = derive_budgets(scales, max_select)
        hidden_size = d.get("hidden_size")
        if hidden_size is not None and int(hidden_size) != int(dims["width"]):
            raise CheckpointError(
                f"vision_tower/config.json: hidden_size {hidden_size} differs from the {name} width {dims['width']}"
            )
        return cls(
            model_name=name,
            width=int(dims["width"]),
            depth=int(dims["depth"]),
            num_heads=int(dims["num_heads"]),
            mlp_ratio=float(dims["mlp_ratio"]),
            patch_size=patch,
            pos_grid=img_size // patch,
            scales=scales,
            select_based_on_layer=tuple(int(i) for i in d.get("select_based_on_layer") or (0, 9, 18, 26)),
            max_select_num=max_select,
            max_select_num_each_scale=tuple(int(x) for x in per_scale),
            separate_pos_emb=bool(d.get("separate_pos_emb", True)),
            highres_selection_feature=bool(d.get("highres_selection_feature", True)),
            selection_hidden_dim=int(d.get("highres_selection_module_hidden_dim") or 512),
            selection_out_dim=int(d.get("highres_selection_module_out_dim") or 512),
            selection_depth=int(d.get("highres_selection_module_depth") or 3),
            selection_kernel_size=int(d.get("highres_selection_module_kernel_size") or 28),
        )

    @property
    def num_high_res_scales(self) -> int:
        return len(self.scales) - 1

    @property
    def low_res_grid(self) -> int:
        return self.scales[0] // self.patch_size

    @property
    def low_res_token_num(self) -> int:
        return self.low_res_grid**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def image_size(self, scale_idx: int, h: int, w: int) -> tuple[int, int]:
        """Pixel size of scale ``scale_idx`` for an ``h x w`` input: the low-res view is square, high-res
        views keep the aspect ratio at whole patches (``image_size_scale_i`` of the reference)."""
        s0, p = self.scales[0], self.patch_size
        if scale_idx == 0:
            return s0, s0
        zoom = self.scales[scale_idx] // s0
        if h >= w:
            return s0 * zoom, max(int(s0 / h * w) // p, 1) * p * zoom
        return max(int(s0 / w * h) // p, 1) * p * zoom, s0 * zoom

    def feature_grid(self, scale_idx: int, h: int, w: int) -> tuple[int, int]:
        size = self.image_size(scale_idx, h, w)
        return max(size[0] // self.patch_size, 1), max(size[1] // self.patch_size, 1)


def derive_budgets(scales: Sequence[int], max_select_num: int) -> tuple[int, ...]:
    """Patches per look-close at each high-res scale, proportional to its pixel count, truncated as ``ps3-torch``
    derives ``max_select_num_each_scale`` when the config leaves it null."""
    pixels = [s * s for s in scales]
    total = sum(pixels[1:])
    return tuple(int(max_select_num * p / total) for p in pixels[1:])


def plan_passes(
    total_cells: int, budgets: Sequence[int], num_look_close: int | None, num_token_look_close: int | None
) -> list[int | None]:
    """How many look-close passes run and what each may select: ``None`` = the full per-scale budgets,
    an int ``n`` = budgets scaled to ``n`` tokens (``num_token_look_close`` wins over ``num_look_close``, as in
    the reference's ``LlavaTopDownMetaForCausalLM``, NVlabs/VILA ``llava/model/llava_arch.py``)."""
    per_pass = sum(budgets)
    if num_token_look_close is not None:
        t = min(num_token_look_close, total_cells)
        n = math.ceil(t / per_pass)
        last = t % per_pass or per_pass
        plan: list[int | None] = [t if t <= per_pass else None]
        plan += [last if k == n - 2 else None for k in range(n - 1)]
        return plan
    if num_look_close is None or num_look_close < 1:
        raise ValueError(f"num_look_close must be >= 1, got {num_look_close}")
    return [None] * min(num_look_close, math.ceil(total_cells / per_pass))


# -- modules (names follow the checkpoint) ---------------------------------------------------------------


class Mlp(nn.Module):
    """timm ``Mlp``: fc1, exact GELU, optional LayerNorm on the hidden width, fc2."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


class Attention(nn.Module):
    """timm ViT attention whose keys/values can be prefixed with the low-res pass's (a KV cache)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=-2), torch.cat([prefix[1], v], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), (k, v)


class Block(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-6, no layer scale)."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(
        self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, kv = self.attn(self.norm1(x), prefix)
        x = x + h
        return x + self.mlp(self.norm2(x)), kv


class PatchEmbed(nn.Module):
    def __init__(self, cfg: PS3Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)


class Trunk(nn.Module):
    """The ViT. ``norm`` and ``attn_pool`` of the checkpoint are never used by VILA and are not built."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.pos_grid**2, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm ConvNeXt block; the layer scale is stored as ``weight`` (renamed from ``gamma`` by PS3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return h.mul(self.weight.reshape(1, -1, 1, 1)) + x


class ShallowConvNet(nn.Module):
    """The high-res selection feature module: a strided stem and a few ConvNeXt blocks on a 1512 px view."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        hidden, k = cfg.selection_hidden_dim, cfg.selection_kernel_size
        self.stem = nn.Sequential(nn.Conv2d(3, hidden, k, stride=k), LayerNorm2d(hidden, eps=1e-6))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(hidden) for _ in range(cfg.selection_depth)))
        self.out_proj = nn.Conv2d(hidden, cfg.selection_out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.blocks(self.stem(x)))


class PS3Encoder(nn.Module):
    """Parameters of ``PS3VisionEncoder`` (the checkpoint's ``vision_model.*``)."""

    def __init__(self, cfg: PS3Config):
        super().__init__()
        n_sel, n_high, c = len(cfg.select_based_on_layer), cfg.num_high_res_scales, cfg.width
        self.trunk = Trunk(cfg)
        self.selection_feature_proj = Mlp(c * n_sel, c * n_sel, c * n_high, norm_eps=1e-5)
        self.prior_prompt = nn.Parameter(torch.empty(c))
        if cfg.separate_pos_emb:
            self.pos_emb_residual = nn.ParameterList(
                nn.Parameter(torch.empty(1, (s // cfg.patch_size) ** 2, c)) for s in cfg.scales[1:]
            )
        if cfg.highres_selection_feature:
            self.highres_selection_feature_module = ShallowConvNet(cfg)
            self.prompt_proj_for_highres = nn.Linear(c, cfg.selection_out_dim * n_high)


# -- the tower ------------------------------------------------------------------------------------------


@dataclass
class LowRes:
    """Result of the low-res pass: block outputs ``(B, N0, C)`` and keys/values ``(B, heads, N0, hd)``."""

    hidden: list[torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LookClose:
    """High-res result per image: features on each scale's full grid (zeros where nothing was selected),
    the union of the selected cells per scale, and each pass's own selection (for inspection)."""

    features: list[torch.Tensor]  # per high-res scale (B, fh*fw, C), raster order
    maps: list[torch.Tensor]  # per high-res scale (B, fh, fw), 1 = selected
    passes: list[list[torch.Tensor]]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, no antialias, in float32: PS3 resizes with plain ``F.interpolate`` in float32."""
    return F.interpolate(x.float(), size=size, mode="bicubic").to(x.dtype)


class PS3Tower(nn.Module):
    """The VILA-HD vision tower. ``select_layer`` is VILA's ``mm_vision_select_layer`` (-2: penultimate)."""

    def __init__(self, cfg: PS3Config, select_layer: int = -2):
        super().__init__()
        if not -2 <= select_layer <= -1:
            # VILA asks PS3 for only its last two block outputs, so no other layer exists to select
            raise UnsupportedModelError(
                f"config.json: mm_vision_select_layer {select_layer} is not supported with PS3 (use -1 or -2)"
            )
        self.config = cfg
        self.out_block = cfg.depth + select_layer
        self.vision_model = PS3Encoder(cfg)

    @property
    def width(self) -> int:
        return self.config.width

    # -- low-res ---------------------------------------------------------------------------------------
    def low_res(self, pixels: torch.Tensor) -> LowRes:
        """The whole image at the first scale, through every block that selection or VILA needs."""
        cfg, trunk = self.config, self.vision_model.trunk
        s0 = cfg.scales[0]
        x = trunk.patch_embed.proj(_resize(pixels, (s0, s0)))  # (B, C, g, g)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self._pos_embed(grid)
        needed = max(self.out_block, *(self._layer(i) for i in cfg.select_based_on_layer)) + 1
        hidden, kv = [], []
        for block in trunk.blocks[:needed]:
            x, cache = block(x)
            hidden.append(x)
            kv.append(cache)
        return LowRes(hidden, kv)

    def low_res_features(self, low: LowRes) -> torch.Tensor:
        """What VILA takes from the low-res pass: the selected block's output ``(B, N0, C)``."""
        return low.hidden[self.out_block]

    def _layer(self, i: int) -> int:
        return i if i >= 0 else self.config.depth + i

    def _pos_embed(self, grid: Sequence[int]) -> torch.Tensor:
        """The 27x27 position embedding, resampled (bicubic with antialias, in float32) to ``grid`` and
        cropped for non-square grids, as timm's ``resample_abs_pos_embed``."""
        pe = self.vision_model.trunk.pos_embed
        h, w = int(grid[0]), int(grid[1])
        g = self.config.pos_grid
        if h == w == g:
            return pe
        # antialiased bicubic has no MPS kernel; the table is small, so resample it on the CPU there
        x = pe.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        x = x.cpu() if x.device.type == "mps" else x
        side = max(h, w)
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True)[:, :, :h, :w]
        return x.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pe.device, pe.dtype)

    # -- selection -------------------------------------------------------------------------------------
    def selection_probs(
        self, pixels: torch.Tensor, low: LowRes, prompt: torch.Tensor | None = None, smooth: bool = False
    ) -> list[torch.Tensor]:
        """Per high-res scale ``(B, fh, fw)``: how much each patch matters for ``prompt`` (``(B, C)``; the
        learned ``prior_prompt`` when None), as ``PS3VisionEncoder.get_selection_probs`` computes them
        (NVlabs/PS3 ``ps3/modeling_ps3.py``)."""
        cfg, enc = self.config, self.vision_model
        b, (h, w) = pixels.shape[0], pixels.shape[-2:]
        g = cfg.low_res_grid
        feats = torch.cat([low.hidden[self._layer(i)] for i in cfg.select_based_on_layer], dim=-1)
        feats = enc.selection_feature_proj(feats.reshape(b, g, g, -1))  # (B, g, g, n_high*C)
        # PS3 slices only selection channel 0 and upsamples it to every scale, so the other channels of
        # `selection_feature_proj` never influence the result; reproduced.
        fmap = feats[..., : cfg.width].permute(0, 3, 1, 2)  # (B, C, g, g)
        if prompt is None:
            prompt = enc.prior_prompt[None].repeat(b, 1)
        logits = (F.normalize(fmap, dim=1) * F.normalize(prompt, dim=-1)[..., None, None]).sum(dim=1)  # (B, g, g)
        if cfg.highres_selection_feature:
            side = 1512  # PS3 hard-codes this resize, whatever the scales
            hmap = enc.highres_selection_feature_module(_resize(pixels, (side, side)))  # (B, D, 54, 54)
            hprompt = enc.prompt_proj_for_highres(prompt)[:, : cfg.selection_out_dim]
            hlogits = (F.normalize(hmap, dim=1) * F.normalize(hprompt, dim=-1)[..., None, None]).sum(dim=1)
            logits = (logits + F.adaptive_max_pool2d(hlogits[:, None], logits.shape[-2:])[:, 0]) / 2
        logits = (logits * 5.0).clamp(-10, 10)
        probs = F.softmax(F.pad(logits[..., None], (0, 1)), dim=-1)[..., 0]  # sigmoid against a zero logit
        out = []
        for i in range(1, len(cfg.scales)):
            size = cfg.feature_grid(i, h, w)
            p = F.interpolate(probs[:, None].float(), size=size, mode="nearest")[:, 0].to(probs.dtype)
            if smooth:
                p = F.interpolate(F.interpolate(p[:, None], size=(6, 6), mode="area"), size=size, mode="nearest")[:, 0]
            out.append(p)
        return out

    def select(
        self,
        probs: list[torch.Tensor],
        budgets: Sequence[int],
        taken: list[torch.Tensor] | None = None,
        num_tokens: int | None = None,
    ) -> list[torch.Tensor]:
        """One pass's selection maps (``get_selection_maps`` of NVlabs/PS3 ``ps3/modeling_ps3.py``): per image, the
        top cells of each scale among those not ``taken``; a scale short of cells hands its rest to the next.
        ``torch.topk`` as the reference, because tied probabilities make its choice implementation-defined and
        only the same call resolves them the same way."""
        b = probs[0].shape[0]
        maps = [torch.zeros_like(p) for p in probs]
        for i in range(b):
            flat = [p[i].reshape(-1) for p in probs]
            if taken is not None:
                flat = [f * (1 - t[i].reshape(-1)) + (-1) * t[i].reshape(-1) for f, t in zip(flat, taken)]
            counts = list(budgets)
            if num_tokens is not None:
                counts = [int(x * num_tokens / sum(budgets)) for x in budgets]
            for s, f in enumerate(flat):
                free = int((f != -1).sum())
                if free < counts[s]:
                    if s < len(flat) - 1:
                        counts[s + 1] += counts[s] - free
                    counts[s] = free
            for s, f in enumerate(flat):
                ids = f.reshape(1, -1).topk(k=counts[s], dim=-1).indices[0]  # (1, N) as the reference
                maps[s][i].view(-1)[ids] = 1
        return maps

    # -- high-res --------------------------------------------------------------------------------------
    def _tokenize(
        self, pixels: torch.Tensor, maps: list[torch.Tensor], cache: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Embed only the selected patches of every high-res scale, in raster order, scales concatenated.
        ``cache`` keeps each scale's patches and position embedding across passes (the same every pass)."""
        cfg, trunk = self.config, self.vision_model.trunk
        b, (h, w), p = pixels.shape[0], pixels.shape[-2:], cfg.patch_size
        weight, bias = trunk.patch_embed.proj.weight, trunk.patch_embed.proj.bias
        tokens = []
        for s, m in enumerate(maps):
            if torch.all(m == 0):
                continue
            if s not in cache:
                x = _resize(pixels, cfg.image_size(s + 1, h, w))
                gh, gw = x.shape[-2] // p, x.shape[-1] // p
                # patches as rows, in F.unfold's (channel, row, col) order: the conv becomes a matmul
                patches = (
                    x[..., : gh * p, : gw * p]
                    .reshape(b, 3, gh, p, gw, p)
                    .permute(0, 2, 4, 1, 3, 5)
                    .reshape(b, gh * gw, -1)
                )
                cache[s] = (patches, self._pos_embed((gh, gw)).repeat(b, 1, 1))
            patches, pos = cache[s]
            sel = m.reshape(b, -1).bool()
            t = patches[sel].view(b, -1, patches.shape[-1]) @ weight.reshape(weight.shape[0], -1).transpose(0, 1)[None]
            t += bias[None, None]
            t = t + pos[sel].view(b, -1, cfg.width)
            if cfg.separate_pos_emb:
                res = self.vision_model.pos_emb_residual[s]
                side = math.isqrt(res.shape[1])
                gh, gw = m.shape[-2:]
                res = res.reshape(1, side, side, -1)[:, :gh, :gw].reshape(1, gh * gw, -1)
                t = t + res.repeat(b, 1, 1)[sel].view(b, -1, cfg.width)
            tokens.append(t)
        return torch.cat(tokens, dim=1)

    def _high_res_pass(
        self,
        pixels: torch.Tensor,
        maps: list[torch.Tensor],
        low: LowRes,
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Selected tokens through the blocks up to VILA's layer, attending to the low-res keys/values."""
        x = self._tokenize(pixels, maps, cache)
        for block, prefix in zip(self.vision_model.trunk.blocks[: self.out_block + 1], low.kv):
            x, _ = block(x, prefix)
        return x

    def look_close(
        self,
        pixels: torch.Tensor,
        low: LowRes,
        probs: list[torch.Tensor],
        budgets: Sequence[int],
        plan: Sequence[int | None],
    ) -> LookClose:
        """Run the planned passes (:func:`plan_passes`). Each pass encodes new patches only; features land at
        their cells, so the result is independent of which pass produced them: the reference re-orders the
        high-res tokens by position after all passes."""
        b = pixels.shape[0]
        sizes = [p.shape[1] * p.shape[2] for p in probs]
        full = torch.zeros(b, sum(sizes), self.config.width, dtype=pixels.dtype, device=pixels.device)
        taken: list[torch.Tensor] | None = None
        passes = []
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for num_tokens in plan:
            maps = self.select(probs, budgets, taken, num_tokens)
            feats = self._high_res_pass(pixels, maps, low, cache)
            full[torch.cat([m.reshape(b, -1) for m in maps], dim=1).bool()] = feats.flatten(0, 1).to(full.dtype)
            taken = maps if taken is None else [t + m for t, m in zip(taken, maps)]
            passes.append(maps)
        assert taken is not None
        return LookClose(features=list(full.split(sizes, dim=1)), maps=taken, passes=passes)

    def total_cells(self, h: int, w: int) -> int:
        """High-res cells of an ``h x w`` input over all high-res scales (``max_highres_token_num``)."""
        cfg = self.config
        return sum(math.prod(cfg.feature_grid(i, h, w)) for i in range(1, len(cfg.scales)))

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        cfg: PS3Config,
        source: ComponentSource | None,
        dtype: torch.dtype,
        device: torch.device | str,
        select_layer: int = -2,
    ) -> PS3Tower:
        """Built on the meta device; weights assigned straight from the tower's safetensors (no source: stays on
        meta, for shape checks from a config alone)."""
        with torch.device("meta"):
            tower = cls(cfg, select_layer)
        if source is None:
            return tower
        return assign_weights(tower, source, dtype=dtype, device=device, what="PS3", skip=UNUSED_PREFIXES)
