"""The Python API: prompt forms, generation options, devices/dtypes and typed errors."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from conftest import INPUTS, TINY
from transformers import GenerationConfig

import vila
from vila.errors import CheckpointError, MediaError, UsageError
from vila.model.vila import to_turns

DEMO = INPUTS / "demo_img.png"


def test_public_api_is_small():
    assert set(vila.__all__) == {"GenerationResult", "Image", "Video", "VilaModel", "errors", "load", "__version__"}


def test_parts_keep_the_users_order(tiny_model):
    model = tiny_model("nvila-tiny")
    img = PIL.Image.new("RGB", (64, 48), (10, 200, 30))
    prepared = model.prepare(to_turns(["Compare", img, "with", vila.Image(DEMO)]))
    assert "<|im_start|>user\nCompare<image>with<image><|im_end|>" in prepared.prompt_text
    assert prepared.media_tokens == [257, 257]  # two images: one 448 tile each (the reference tiles only a lone image)


def test_pil_and_path_images_are_the_same(tiny_model):
    model = tiny_model("nvila-tiny")
    a = model.generate([vila.Image(DEMO), "Describe"], max_new_tokens=4)
    b = model.generate([PIL.Image.open(DEMO), "Describe"], max_new_tokens=4)
    c = model.generate([vila.Image(DEMO.read_bytes()), "Describe"], max_new_tokens=4)
    assert a.token_ids == b.token_ids == c.token_ids


def test_generation_options(tiny_model):
    model = tiny_model("nvila-tiny")
    assert len(model.generate("Hello", max_new_tokens=3).token_ids) == 3
    s1 = model.generate("Hello", max_new_tokens=6, do_sample=True, temperature=100.0, seed=123).token_ids
    s2 = model.generate("Hello", max_new_tokens=6, do_sample=True, temperature=100.0, seed=123).token_ids
    greedy = model.generate("Hello", max_new_tokens=6).token_ids
    assert s1 == s2 and s1 != greedy  # the tiny logits are ~100s apart: only a high temperature samples
    assert model.generate("Hello", max_new_tokens=6, temperature=0, do_sample=True).token_ids == greedy
    cfg = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=[model.tokenizer.eos_token_id])
    assert len(model.generate("Hello", generation_config=cfg).token_ids) == 2
    assert isinstance(model.generate_content("Hello", max_new_tokens=2), str)


def test_conv_mode_override_changes_prompt_and_stops(tiny_model):
    model = tiny_model("nvila-tiny")
    prepared = model.prepare(to_turns("Hi"), template=vila.prompt.get_template("hermes-2"))
    assert prepared.prompt_text.startswith("<|im_start|>system\nAnswer the questions.")
    assert model.generate("Hi", conv_mode="hermes-2", max_new_tokens=2).num_prompt_tokens == len(prepared.input_ids)


def test_multi_turn_conversation(tiny_model):
    model = tiny_model("nvila-tiny")
    turns = [
        {"role": "user", "content": [vila.Image(DEMO), "What is it?"]},
        {"role": "assistant", "content": "A tiger."},
        {"role": "user", "content": "Sure?"},
    ]
    prepared = model.prepare(to_turns(turns))
    assert prepared.prompt_text.endswith(
        "<|im_start|>user\n<image>What is it?<|im_end|>\n<|im_start|>assistant\nA tiger.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prepared.media_tokens == [2305]  # the single image of the conversation is tiled


def test_bfloat16_on_cpu():
    model = vila.load(TINY / "nvila-lite-tiny", device="cpu", dtype="bfloat16")
    assert model.llm.dtype == torch.bfloat16
    assert next(model.vision_tower.parameters()).dtype == torch.bfloat16
    assert len(model.generate([vila.Image(DEMO), "Hi"], max_new_tokens=2).token_ids) == 2


def test_typed_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError):
        vila.load(tmp_path)
    with pytest.raises(UsageError):
        vila.load(TINY / "nvila-tiny", device="cpu", dtype="float8")
    with pytest.raises(UsageError):
        vila.load(TINY / "nvila-tiny", device="tpu")
    model = tiny_model("nvila-tiny")
    with pytest.raises(MediaError, match="not found"):
        model.generate_content([vila.Image(tmp_path / "missing.png"), "x"])
    with pytest.raises(UsageError, match="empty"):
        model.generate_content("   ")
    with pytest.raises(UsageError, match="max_new_tokens"):
        model.generate_content("x", max_new_tokens=-1)
    with pytest.raises(UsageError, match="unsupported prompt part"):
        model.generate_content(["x", 3])
    with pytest.raises(UsageError, match="unsupported prompt part"):
        model.chat().send("x", 3.5)


def test_no_random_rows_in_the_lm_head(tiny_model):
    """Logits exist only for real token ids; the LLM is never resized (the reference's
    ``resize_token_embeddings(len(tokenizer))`` is emulated by masking)."""
    model = tiny_model("nvila-tiny")
    assert model.llm.get_output_embeddings().weight.shape[0] == model.config.llm_vocab_size
    assert model.num_generatable == len(model.tokenizer)


def test_help_lists_the_public_api():
    import pydoc

    text = pydoc.render_doc(vila, renderer=pydoc.plaintext)
    functions = text.split("FUNCTIONS", 1)[1].split("DATA", 1)[0]
    assert "load(" in functions and "__getattr__" not in functions
    for name in ("class Image", "class Video", "class VilaModel", "class GenerationResult"):
        assert name in text
    assert vila.VilaModel.__name__ == "VilaModel" and vila.GenerationResult.__name__ == "GenerationResult"


def test_import_vila_stays_light():
    import subprocess
    import sys

    code = "import sys, vila; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_path_parts_are_media_and_str_parts_are_text(tmp_path, tiny_model):
    import warnings
    from pathlib import Path

    model = tiny_model("nvila-tiny")
    image = Path(INPUTS / "demo_img.png")
    by_path = model.generate([image, "Describe."], max_new_tokens=3)
    by_image = model.generate([vila.Image(str(image)), "Describe."], max_new_tokens=3)
    assert by_path.token_ids == by_image.token_ids and by_path.media_tokens == by_image.media_tokens
    assert by_path.media_tokens  # really an image, not text

    video = Path(INPUTS / "video_160x120_64f_16fps.mp4")
    result = model.generate([video, "What happens?"], max_new_tokens=2, num_video_frames=2)
    assert result.video_durations and result.video_durations[0] > 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        as_text = model.generate([str(image), "Describe."], max_new_tokens=3)
    assert as_text.media_tokens == []  # a str stays text...
    messages = [str(w.message) for w in caught]
    assert any("strings are text" in m and "vila.Image(" in m for m in messages), messages  # ...and says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(["a photo.png of nothing", "Describe."], max_new_tokens=1)
    assert not [w for w in caught if "strings are text" in str(w.message)]

    with pytest.raises(MediaError, match="not found"):
        model.generate([tmp_path / "missing.png", "x"])


def test_importing_the_loading_module_never_shadows_vila_load():
    import vila.loading

    assert callable(vila.load) and vila.load is vila.loading.load


# -- logits and scoring ----------------------------------------------------------------------------------


def hand_log_likelihood(model, prompt, continuation: str) -> float:
    """The continuation's log-probability, computed here step by step: the prompt's embeddings (media spliced)
    followed by the continuation tokens' embeddings through ``model.llm``, one sequence, no padding."""
    prepared = model.prepare(to_turns(prompt))
    tok = model.tokenizer
    ids = tok(prepared.prompt_text + continuation).input_ids[len(tok(prepared.prompt_text).input_ids) :]
    with torch.no_grad():
        tail = model.llm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
        logits = model.llm(inputs_embeds=torch.cat([prepared.inputs_embeds, tail])[None]).logits[0]
    logprobs = torch.log_softmax(logits[:, : min(len(tok), logits.shape[-1])].double(), dim=-1)
    n = prepared.inputs_embeds.shape[0]
    return sum(float(logprobs[n - 1 + k, t]) for k, t in enumerate(ids))


@pytest.mark.parametrize("with_image", [False, True])
def test_score_equals_a_hand_computation(tiny_model, with_image):
    model = tiny_model("nvila-tiny")
    prompt = [vila.Image(DEMO), "What is it?"] if with_image else "What is it?"
    continuations = ["A tiger.", " no", "It is a large striped cat sitting in the grass", ""]
    scores = model.score(prompt, continuations)
    want = [hand_log_likelihood(model, prompt, c) for c in continuations]
    assert scores[-1] == want[-1] == 0.0
    assert all(s < 0 for s in scores[:-1])
    for got, expected in zip(scores, want):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_score_ranks_the_greedy_answer_first(tiny_model):
    model = tiny_model("nvila-tiny")
    prompt = [vila.Image(DEMO), "Describe the image."]
    greedy = model.tokenizer.decode(model.generate(prompt, max_new_tokens=4).token_ids)
    gen = torch.Generator().manual_seed(0)
    random = model.tokenizer.decode(torch.randint(0, 5000, (4,), generator=gen).tolist())
    best, other = model.score(prompt, [greedy, random])
    assert best > other


def test_forward_returns_the_llm_logits(tiny_model):
    model = tiny_model("nvila-tiny")
    prepared = model.prepare(to_turns([vila.Image(DEMO), "Hi"]))
    with torch.no_grad():
        logits = model(inputs_embeds=prepared.inputs_embeds[None])
        ids = torch.tensor([model.tokenizer("Hi there").input_ids])
        assert torch.equal(model(input_ids=ids), model.llm(input_ids=ids).logits)
    assert logits.shape == (1, prepared.inputs_embeds.shape[0], model.llm.config.vocab_size)
    with pytest.raises(UsageError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=prepared.inputs_embeds[None])
    with pytest.raises(UsageError, match="non-empty list"):
        model.score("Hi", "yes")
