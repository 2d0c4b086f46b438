"""vila.decode against transformers' own generate: greedy and seeded sampling, one row and mixed batches, the
dynamic, static and compiled paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from vila import decode as decode_mod
from vila.decode import DecodeRow, Sampling, decode

TINY_LLM = Path(__file__).parent / "fixtures" / "tiny" / "nvila-lite-tiny" / "llm"
LENGTHS = (7, 12, 3, 20)
BUDGETS = (30, 25, 40, 10)
NEVER = 100_000  # a stop id beyond every vocabulary here: the row runs to its budget


@pytest.fixture(scope="module")
def llm():
    return AutoModelForCausalLM.from_pretrained(TINY_LLM, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def random_llm():
    """A randomly initialised Qwen2: its next-token distributions are flat enough for sampling to vary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def embeds(llm):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, llm.config.hidden_size, generator=g) * 0.5 for n in LENGTHS]


@pytest.fixture(scope="module")
def stop(llm, embeds):
    """A stop id that the greedy answers actually emit, so that rows end at different steps."""
    first = reference(llm, embeds[0], 30, [NEVER])
    return first[len(first) // 2]


def reference(llm, e, n, stops, processors=(), **kw):
    """One row through ``llm.generate`` with inputs_embeds, as VilaModel.generate calls it."""
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        out = llm.generate(
            inputs_embeds=e[None],
            attention_mask=torch.ones(1, e.shape[0], dtype=torch.long),
            max_new_tokens=n,
            eos_token_id=list(stops),
            pad_token_id=0,
            logits_processor=LogitsProcessorList(processors),
            **kw,
        )
    ids = out[0].tolist()
    end = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
    return ids[:end]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_greedy_matches_generate_one_by_one_and_batched(llm, embeds, stop, static):
    want = [reference(llm, e, n, [stop]) for e, n in zip(embeds, BUDGETS)]
    assert len({len(w) for w in want}) > 1, "rows should end at different steps"
    assert any(w[-1] == stop for w in want) and any(w[-1] != stop for w in want)
    for e, n, w in zip(embeds, BUDGETS, want):
        assert decode(llm, [DecodeRow(e, n, [stop])], static=static) == [w]
    rows = [DecodeRow(e, n, [stop]) for e, n in zip(embeds, BUDGETS)]
    assert decode(llm, rows, static=static) == want


def test_finished_rows_leave_the_batch(llm, embeds, stop):
    sizes: list[int] = []
    hook = llm.model.register_forward_pre_hook(
        lambda m, args, kw: sizes.append(
            (kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[0]
        ),
        with_kwargs=True,
    )
    try:
        out = decode(llm, [DecodeRow(e, n, [stop]) for e, n in zip(embeds, BUDGETS)])
    finally:
        hook.remove()
    # One prefill, then one forward per further token of the longest row, each over the rows still alive.
    assert len(sizes) == max(len(o) for o in out)
    assert sizes == [sum(len(o) > k for o in out) for k in range(len(sizes))]
    assert sizes[-1] < sizes[0] == len(embeds)


def test_budgets_stops_and_on_token_are_per_row(llm, embeds, stop):
    full = decode(llm, [DecodeRow(e, 40, [NEVER]) for e in embeds])
    seen: list[int] = []

    def cancel_after_three(t: int) -> bool:
        seen.append(t)
        return len(seen) == 3

    rows = [
        DecodeRow(embeds[0], 5, [NEVER]),
        DecodeRow(embeds[1], 40, [full[1][2]]),
        DecodeRow(embeds[2], 40, [NEVER], on_token=cancel_after_three),
        DecodeRow(embeds[3], 1, [NEVER]),
    ]
    out = decode(llm, rows)
    assert out[0] == full[0][:5]
    assert out[1] == full[1][: full[1].index(full[1][2]) + 1]
    assert out[2] == full[2][:3] == seen
    assert out[3] == full[3][:1]


def test_processors_and_vocab_limit_as_generate(llm, embeds):
    calls: list[tuple[int, ...]] = []

    class BanFirstChoice:
        """Bans whatever greedy picked first at step 0, and records the ids it is given (new tokens only)."""

        def __init__(self, banned: int):
            self.banned = banned

        def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(ids.shape))
            scores[:, self.banned] = float("-inf")
            return scores

    plain = decode(llm, [DecodeRow(embeds[0], 12, [NEVER])])[0]
    banned = plain[0]
    want = reference(llm, embeds[0], 12, [NEVER], processors=[BanFirstChoice(banned)])
    calls.clear()
    got = decode(llm, [DecodeRow(embeds[0], 12, [NEVER], processors=[BanFirstChoice(banned)])])[0]
    assert got == want and banned not in got
    assert calls == [(1, k) for k in range(12)]

    limit = min(plain)  # every greedy choice is at or above it, so the mask must change all of them
    out = decode(llm, [DecodeRow(e, 8, [NEVER]) for e in embeds], vocab_limit=limit)
    assert all(t < limit for row in out for t in row)


def test_seeded_sampling_matches_generate(random_llm, embeds):
    llm = random_llm
    s = Sampling(temperature=1.7, top_p=0.9, top_k=40)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = reference(llm, embeds[1], 20, [NEVER], do_sample=True, temperature=1.7, top_p=0.9, top_k=40)
        torch.manual_seed(seed)
        got = decode(llm, [DecodeRow(embeds[1], 20, [NEVER], sampling=s)])[0]
        assert got == want
        draws.append(got)
    assert draws[0] != draws[1], "the seed should matter at this temperature"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = decode(llm, [DecodeRow(embeds[1], 20, [NEVER], sampling=Sampling(1.7, 0.9, 40, g1))])
    torch.manual_seed(99)
    assert decode(llm, [DecodeRow(embeds[1], 20, [NEVER], sampling=Sampling(1.7, 0.9, 40, g2))]) == a


def test_static_cache_is_bucketed_and_pooled(llm, embeds):
    assert decode_mod.bucket(1) == decode_mod.bucket(decode_mod.BUCKET) == decode_mod.BUCKET
    assert decode_mod.bucket(decode_mod.BUCKET + 1) == 2 * decode_mod.BUCKET
    decode(llm, [DecodeRow(embeds[0], 4, [NEVER])], static=True)
    first = decode_mod._POOL.take(llm, (decode_mod.BUCKET, 1, torch.float32, torch.device("cpu")))
    assert first is not None
    decode_mod._POOL.give(llm, (decode_mod.BUCKET, 1, torch.float32, torch.device("cpu")), first)
    decode(llm, [DecodeRow(embeds[2], 4, [NEVER])], static=True)  # another prompt length, same bucket: same cache
    assert decode_mod._POOL.take(llm, (decode_mod.BUCKET, 1, torch.float32, torch.device("cpu"))) is first


def test_idle_static_caches_are_bounded(llm, embeds):
    """Every new shape leaves a cache behind; only the newest POOL_KEEP stay, so memory does not grow with shapes."""
    long = torch.cat([embeds[0]] * (decode_mod.BUCKET // embeds[0].shape[0] + 1))  # past one bucket
    for rows in range(1, 4):  # batch buckets 1, 2, 4
        for prompt in (embeds[0], long):  # cache buckets 256, 512
            decode(llm, [DecodeRow(prompt, 2, [NEVER])] * rows, static=True)
    assert decode_mod._POOL.idle(llm) == decode_mod.POOL_KEEP
    newest = (2 * decode_mod.BUCKET, 4, torch.float32, torch.device("cpu"))
    assert decode_mod._POOL.take(llm, newest) is not None


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="no C compiler"
            ),
        ),
    ],
)
def test_compiled_step_matches_eager(llm, embeds, stop, backend, monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("VILA_COMPILE_BACKEND", backend)
    rows = lambda: [DecodeRow(e, n, [stop]) for e, n in zip(embeds, BUDGETS)]  # noqa: E731
    want = decode(llm, rows())
    torch._dynamo.utils.counters.clear()
    assert decode(llm, rows(), compile=True) == want
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs <= 1  # one graph for the step (0: another test already compiled these shapes)
    # Three rows (batch bucket 4) and other prompt lengths in the same cache bucket: no new graph.
    assert decode(llm, rows()[1:], compile=True) == want[1:]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
