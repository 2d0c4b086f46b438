"""InternViT-6B, the vision tower of VILA1.5-40b (selected when ``vision_tower/config.json``
names an ``intern`` architecture).

A compact re-implementation of the reference ``InternVisionModel`` (NVlabs/VILA
``llava/model/multimodal_encoder/intern/modeling_intern_vit.py``). Module attribute names mirror the reference, so
``state_dict()`` keys equal the keys stored in the released ``vision_tower/model*.safetensors`` (no prefix), e.g.
``embeddings.class_embedding`` or ``encoder.layers.0.attn.q_norm.weight``.

Differences from the reference that do not change inference results: attention runs through
``scaled_dot_product_attention`` (the reference uses flash-attention or an eager softmax, same math), drop-path and
dropout are left out (training only), and the forward stops after the requested layer instead of collecting every
hidden state.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from vila.checkpoint import ComponentSource
from vila.errors import CheckpointError, UsageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InternVisionConfig",
    "InternVisionModel",
    "load_intern_vit",
    "preprocess_intern",
]

# The reference preprocessor (`InternVisionPreprocessor`) hard-codes ImageNet statistics and ignores
# preprocessor_config.json (a 57-byte stub in the release).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InternVisionConfig:
    """The fields of ``vision_tower/config.json`` that shape the model; defaults are the reference's."""

    hidden_size: int = 3200
    intermediate_size: int = 12800
    num_hidden_layers: int = 48
    num_attention_heads: int = 25
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    # VILA's copy has no `norm_type` (always RMSNorm); later InternViT releases add "layer_norm".
    norm_type: str = "rms_norm"
    initializer_factor: float = 0.1
    initializer_range: float = 0.02
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    use_flash_attn: bool = True
    model_type: str = "intern_vit_6b"

    @classmethod
    def from_dict(cls, d: dict) -> InternVisionConfig:
        """Build from a config dict; keys this class does not know (transformers bookkeeping) are ignored."""
        if "vision_config" in d:  # the reference accepts a composite InternVL config too
            d = d["vision_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(
                f"InternViT hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                f"{cfg.num_attention_heads}; the vision_tower config is malformed"
            )
        if cfg.norm_type not in ("rms_norm", "layer_norm"):
            raise CheckpointError(f"InternViT norm_type {cfg.norm_type!r} is not supported (rms_norm or layer_norm)")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        """CLS token plus one position per patch of the square training resolution."""
        return (self.image_size // self.patch_size) ** 2 + 1


class InternRMSNorm(nn.Module):
    """RMSNorm as the reference computes it: normalise in float32, cast back, *then* multiply by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _make_norm(config: InternVisionConfig) -> nn.Module:
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return InternRMSNorm(config.hidden_size, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    """Conv patch embedding, a learned CLS token in front, learned absolute positions (never interpolated)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.num_positions = config.num_positions
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        # The reference hard-codes 3 input channels.
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size = pixel_values.shape[0]
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype))  # (batch, dim, grid, grid)
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # (batch, grid*grid, dim)
        if patch_embeds.shape[1] + 1 != self.num_positions:
            raise UsageError(
                f"InternViT expects {self.num_positions - 1} patches per image but got {patch_embeds.shape[1]} "
                f"from pixel_values of shape {tuple(pixel_values.shape)}; resize images to the tower's image_size"
            )
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(target_dtype)  # (batch, 1, dim)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)  # (batch, 1 + grid*grid, dim)
        return embeddings + self.position_embedding.to(target_dtype)


class InternAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional q/k RMSNorm over the full width."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qk_normalization = config.qk_normalization
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        if self.qk_normalization:
            self.q_norm = _make_norm(config)
            self.k_norm = _make_norm(config)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, dim)  # (batch, tokens, 3, dim); rows = [q | k | v]
        q, k, v = qkv.unbind(2)  # each (batch, tokens, dim)
        if self.qk_normalization:
            # Normalised over all heads at once, before the split into heads.
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = q.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        k = k.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        v = v.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (batch, heads, tokens, head_dim)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)  # (batch, tokens, dim)
        return self.proj(out)


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block with per-channel layer scales: ``x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))``."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = _make_norm(config)
        self.norm2 = _make_norm(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Same operand order as the reference (`attn(...) * ls1`) so low-precision rounding matches.
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states)) * self.ls1
        return hidden_states + self.mlp(self.norm2(hidden_states)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class InternVisionModel(nn.Module):
    """InternViT returning one entry of the reference's ``hidden_states`` tuple (no final norm, no pooling)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Return ``hidden_states[num_layers]`` of the reference for ``(batch, 3, H, W)`` pixels.

        ``num_layers`` counts encoder layers to run: 0 gives the embedding output, ``None`` runs all layers, and a
        negative value indexes the ``L + 1`` hidden states like Python (``-2`` = after ``L - 1`` layers), so
        ``mm_vision_select_layer`` can be passed straight through. Only the needed layers are computed.
        """
        total = len(self.encoder.layers)
        n = total if num_layers is None else num_layers
        if n < 0:
            n += total + 1
        if not 0 <= n <= total:
            raise UsageError(f"num_layers={num_layers} is out of range for an InternViT with {total} layers")
        if pixel_values.ndim != 4:
            raise UsageError(
                f"InternViT expects pixel_values of shape (batch, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        hidden_states = self.embeddings(pixel_values)  # (batch, tokens, dim)
        for layer in self.encoder.layers[:n]:
            hidden_states = layer(hidden_states)
        return hidden_states


def preprocess_intern(image: PIL.Image.Image, image_size: int = 448) -> torch.Tensor:
    """Reference ``InternVisionPreprocessor`` for one image: ``(3, image_size, image_size)`` float32.

    RGB conversion, PIL bicubic resize to a square (what torchvision ``Resize`` does on a PIL image), ``/255``, then
    ImageNet normalisation in float32. Pass the tower config's ``image_size`` (448 for VILA1.5-40b).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((image_size, image_size), PIL.Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # (height, width, 3)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)  # (3, height, width)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean).div(std)


def load_intern_vit(
    source: ComponentSource | str | os.PathLike, *, dtype: torch.dtype, device: str | torch.device
) -> InternVisionModel:
    """Build the tower on the meta device and load ``source``'s safetensors straight into place (no random init).

    ``source`` is the tower's component source, or a ``vision_tower/`` directory with ``config.json`` and either ``model.safetensors`` or index-sharded
    ``model-*.safetensors``. Every tensor is cast to ``dtype`` and put on ``device`` one at a time, so peak host
    memory stays around one tensor beyond the final model. The returned model is in eval mode without gradients.
    """
    from ..checkpoint import assign_weights
    from ..config import folder_source

    if not isinstance(source, ComponentSource):
        source = folder_source(Path(source), "vision tower")
    config = InternVisionConfig.from_dict(source.config)
    with torch.device("meta"):
        model = InternVisionModel(config)
    return assign_weights(model, replace(source, what="InternViT"), dtype=dtype, device=device)
