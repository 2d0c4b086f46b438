"""InternViT-6B tower (VILA1.5-40b): checkpoint key layout, forward math, layer selection, size, preprocessing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from vila.errors import CheckpointError, UsageError
from vila.model.intern_vit import (
    InternRMSNorm,
    InternVisionConfig,
    InternVisionModel,
    load_intern_vit,
    preprocess_intern,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
CONFIG_40B = FIXTURES / "Efficient-Large-Model__VILA1.5-40b" / "vision_tower" / "config.json"

# Hub listing of Efficient-Large-Model/VILA1.5-40b vision_tower (LISTINGS.md): 3 bf16 shards + a 43.8 kB index.
SHARDS_40B_GB = (4.99, 4.94, 1.15)
INDEX_40B_KB = 43.8


def tiny_config_dict(qk_normalization: bool, qkv_bias: bool = False) -> dict:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 56,
        "patch_size": 14,
        "num_channels": 3,
        "qkv_bias": qkv_bias,
        "qk_normalization": qk_normalization,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "initializer_factor": 0.1,
        "use_flash_attn": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }


def reference_keys(num_layers: int, qk_normalization: bool, qkv_bias: bool) -> list[str]:
    """Tensor names the reference `InternVisionModel.save_pretrained` writes (attribute paths, no prefix)."""
    keys = [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.patch_embedding.bias",
        "embeddings.position_embedding",
    ]
    for i in range(num_layers):
        layer = ["attn.qkv.weight"]
        layer += ["attn.qkv.bias"] if qkv_bias else []
        layer += ["attn.q_norm.weight", "attn.k_norm.weight"] if qk_normalization else []
        layer += ["attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight"]
        layer += ["mlp.fc2.bias", "norm1.weight", "norm2.weight", "ls1", "ls2"]
        keys += [f"encoder.layers.{i}.{name}" for name in layer]
    return keys


def random_state(model: InternVisionModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor, norms and layer scales included, so each one affects the output."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
            state[name] = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
        elif name.endswith(("ls1", "ls2")):
            state[name] = 0.5 + 0.3 * torch.rand(t.shape, generator=g)
        else:
            state[name] = 0.2 * torch.randn(t.shape, generator=g)
    return state


def save_sharded(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """Write the released layout: config.json, 2 shards and model.safetensors.index.json (HF format)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = list(state)
    half = len(names) // 2
    weight_map, total = {}, 0
    for i, chunk in enumerate((names[:half], names[half:]), start=1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k].to(torch.bfloat16).contiguous() for k in chunk}, folder / fname, {"format": "pt"})
        for k in chunk:
            weight_map[k] = fname
            total += state[k].numel() * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build(config: dict, seed: int = 0) -> InternVisionModel:
    model = InternVisionModel(InternVisionConfig.from_dict(config))
    model.load_state_dict(random_state(model, seed))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Independent float64 implementation of the reference math (eager path of modeling_intern_vit.py).


def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_forward(state: dict[str, torch.Tensor], cfg: InternVisionConfig, pixels: torch.Tensor) -> list[torch.Tensor]:
    """All hidden states (embeddings, then every layer output) in float64, heads attended one at a time."""
    s = {k: v.to(torch.float64) for k, v in state.items()}
    x = pixels.to(torch.float64)
    b, _, h, w = x.shape
    p, d, nh = cfg.patch_size, cfg.hidden_size, cfg.num_attention_heads
    hd = d // nh
    gh, gw = h // p, w // p
    # Patch embedding as an explicit matmul over flattened (channel, ky, kx) patches, raster order.
    patches = x.reshape(b, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3 * p * p)
    tokens = patches @ s["embeddings.patch_embedding.weight"].reshape(d, -1).T + s["embeddings.patch_embedding.bias"]
    cls = s["embeddings.class_embedding"].reshape(1, 1, d).expand(b, 1, d)
    x = torch.cat([cls, tokens], 1) + s["embeddings.position_embedding"]
    states = [x]
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        y = ref_rmsnorm(x, s[pre + "norm1.weight"], cfg.layer_norm_eps)
        qkv = y @ s[pre + "attn.qkv.weight"].T
        if cfg.qkv_bias:
            qkv = qkv + s[pre + "attn.qkv.bias"]
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        if cfg.qk_normalization:
            q = ref_rmsnorm(q, s[pre + "attn.q_norm.weight"], cfg.layer_norm_eps)
            k = ref_rmsnorm(k, s[pre + "attn.k_norm.weight"], cfg.layer_norm_eps)
        heads = []
        for j in range(nh):
            sl = slice(j * hd, (j + 1) * hd)
            scores = (q[..., sl] * hd**-0.5) @ k[..., sl].transpose(-1, -2)
            scores = torch.exp(scores - scores.max(-1, keepdim=True).values)
            heads.append((scores / scores.sum(-1, keepdim=True)) @ v[..., sl])
        attn = torch.cat(heads, -1) @ s[pre + "attn.proj.weight"].T + s[pre + "attn.proj.bias"]
        x = x + attn * s[pre + "ls1"]
        y = ref_rmsnorm(x, s[pre + "norm2.weight"], cfg.layer_norm_eps)
        y = y @ s[pre + "mlp.fc1.weight"].T + s[pre + "mlp.fc1.bias"]
        y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))  # exact (erf) GELU = ACT2FN["gelu"]
        y = y @ s[pre + "mlp.fc2.weight"].T + s[pre + "mlp.fc2.bias"]
        x = x + y * s[pre + "ls2"]
        states.append(x)
    return states


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_normalization", [True, False])
def test_sharded_checkpoint_roundtrip_and_key_names(tmp_path: Path, qk_normalization: bool) -> None:
    config = tiny_config_dict(qk_normalization)
    source = build(config)
    expected = reference_keys(3, qk_normalization, qkv_bias=False)
    assert sorted(source.state_dict()) == sorted(expected)

    folder = tmp_path / "vision_tower"
    state = random_state(source)
    save_sharded(folder, config, state)
    model = load_intern_vit(folder, dtype=torch.float32, device="cpu")

    assert sorted(model.state_dict()) == sorted(expected)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name
        assert torch.equal(tensor, state[name].to(torch.bfloat16).to(torch.float32)), name
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_qkv_bias_key_and_single_file(tmp_path: Path) -> None:
    config = tiny_config_dict(True, qkv_bias=True)
    model = build(config)
    assert sorted(model.state_dict()) == sorted(reference_keys(3, True, qkv_bias=True))
    folder = tmp_path / "vt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    loaded = load_intern_vit(folder, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert loaded.dtype == torch.bfloat16
    pixels = torch.randn(1, 3, 56, 56)
    assert loaded(pixels).dtype == torch.bfloat16


def test_load_errors(tmp_path: Path) -> None:
    config = tiny_config_dict(True)
    state = random_state(build(config))

    missing_shard = tmp_path / "missing_shard"
    save_sharded(missing_shard, config, state)
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing InternViT weight shard"):
        load_intern_vit(missing_shard, dtype=torch.float32, device="cpu")

    missing_key = tmp_path / "missing_key"
    save_sharded(missing_key, config, {k: v for k, v in state.items() if k != "encoder.layers.1.ls2"})
    with pytest.raises(CheckpointError, match="1 missing.*encoder.layers.1.ls2"):
        load_intern_vit(missing_key, dtype=torch.float32, device="cpu")

    prefixed = tmp_path / "prefixed"
    save_sharded(prefixed, config, {"vision_model." + k: v for k, v in state.items()})
    with pytest.raises(CheckpointError, match="unexpected") as info:
        load_intern_vit(prefixed, dtype=torch.float32, device="cpu")
    assert "\n" not in str(info.value)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_intern_vit(no_weights, dtype=torch.float32, device="cpu")
    with pytest.raises(CheckpointError, match="config.json"):
        load_intern_vit(tmp_path / "nowhere", dtype=torch.float32, device="cpu")

    corrupt = tmp_path / "corrupt"
    save_sharded(corrupt, config, state)
    (corrupt / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_intern_vit(corrupt, dtype=torch.float32, device="cpu")

    wrong_shape = tmp_path / "wrong_shape"
    save_sharded(wrong_shape, {**config, "intermediate_size": 48}, state)
    with pytest.raises(CheckpointError, match="shape"):
        load_intern_vit(wrong_shape, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("qk_normalization", [True, False])
def test_forward_matches_float64_reference(qk_normalization: bool) -> None:
    torch.manual_seed(1)
    config = tiny_config_dict(qk_normalization)
    model = build(config, seed=2)
    pixels = torch.randn(2, 3, 56, 56)
    states = ref_forward(model.state_dict(), model.config, pixels)
    assert len(states) == 4
    with torch.no_grad():
        for n, expected in enumerate(states):
            got = model(pixels, num_layers=n)
            assert got.shape == (2, 17, 32) and got.dtype == torch.float32
            assert (got.double() - expected).abs().max().item() < 1e-4, n
        assert torch.equal(model(pixels), model(pixels, num_layers=3))


def test_num_layers_selection_runs_only_needed_layers() -> None:
    model = build(tiny_config_dict(True), seed=3)
    pixels = torch.randn(1, 3, 56, 56)
    calls: list[int] = []
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        second_last = model(pixels, num_layers=-2)  # mm_vision_select_layer = -2
        assert calls == [0, 1]
        calls.clear()
        assert torch.equal(second_last, model(pixels, num_layers=2))
        # Running L-1 layers of the full model equals a model truncated to L-1 layers.
        truncated = InternVisionModel(InternVisionConfig.from_dict({**tiny_config_dict(True), "num_hidden_layers": 2}))
        truncated.load_state_dict({k: v for k, v in model.state_dict().items() if ".layers.2." not in k})
        assert torch.equal(second_last, truncated.eval()(pixels))
        calls.clear()
        assert torch.equal(model(pixels, num_layers=0), model(pixels, num_layers=-4))
        assert calls == []
    for bad in (4, -5):
        with pytest.raises(UsageError):
            model(pixels, num_layers=bad)
    with pytest.raises(UsageError, match="patches"):
        model(torch.randn(1, 3, 42, 42))


def test_rmsnorm_casts_before_weight_multiply() -> None:
    norm = InternRMSNorm(8, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(4, 8).to(torch.bfloat16)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_vila15_40b_tower_size_on_meta() -> None:
    raw = json.loads(CONFIG_40B.read_text())
    cfg = InternVisionConfig.from_dict(raw)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size) == (3200, 45, 25, 448)
    assert cfg.qk_normalization and not cfg.qkv_bias and cfg.norm_type == "rms_norm"
    with torch.device("meta"):
        model = InternVisionModel(cfg)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    n = sum(p.numel() for p in params)
    # 5.17 M embedding params + 45 layers x 122.9184 M.
    assert n == 5_536_496_000
    # bf16 = 2 bytes/param; each listed shard size is rounded to 10 MB and carries a small JSON header.
    published = sum(SHARDS_40B_GB) * 1e9
    assert abs(2 * n - published) <= len(SHARDS_40B_GB) * 0.005e9 + 1e6
    assert model.embeddings.position_embedding.shape == (1, 1025, 3200)

    # The 43.8 kB index fits exactly these names with no prefix ("vision_model." would make it 51.5 kB).
    keys = list(model.state_dict())
    assert sorted(keys) == sorted(reference_keys(45, True, qkv_bias=False))
    shard = "model-00001-of-00003.safetensors"
    index = {"metadata": {"total_size": 2 * n}, "weight_map": dict.fromkeys(keys, shard)}
    assert round(len(json.dumps(index, indent=2, sort_keys=True) + "\n") / 1000, 1) == INDEX_40B_KB


def test_preprocess_intern_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8))
    out = preprocess_intern(image, 448)
    assert out.shape == (3, 448, 448) and out.dtype == torch.float32

    resized = np.asarray(image.resize((448, 448), PIL.Image.BICUBIC)).astype(np.float32) / np.float32(255)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    expected = ((resized - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)

    # Non-RGB input is converted first; the size follows the argument (the tower config's image_size).
    gray = PIL.Image.fromarray(rng.integers(0, 256, size=(20, 20), dtype=np.uint8), mode="L")
    small = preprocess_intern(gray, 56)
    assert small.shape == (3, 56, 56)
    assert torch.equal(small, preprocess_intern(gray.convert("RGB"), 56))
    g = np.asarray(gray.convert("RGB").resize((56, 56), PIL.Image.BICUBIC))[..., 0].astype(np.float32) / 255
    np.testing.assert_allclose(small[2].numpy(), (g - np.float32(0.406)) / np.float32(0.225), atol=1e-6)
