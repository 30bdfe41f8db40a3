"""The public API: load, tokenize/detokenize, logits, generate (stream, stop, chat), errors."""
import numpy as np
import pytest

import moe_numa
from moe_numa.errors import ContextOverflowError

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def ref(make_model):
    return moe_numa.load(make_model("qwen3moe", "f32"), backend="reference")


def test_tokenize_round_trip(ref):
    ids = ref.tokenize(PROMPT)
    assert ids and all(isinstance(i, int) for i in ids)
    assert ref.detokenize(ids) == PROMPT
    assert ref.tokenize("<|im_start|>user", parse_special=True)[0] == ref.tokenizer.token_to_id("<|im_start|>")


def test_logits_shape_and_prefix_consistency(ref):
    ids = ref.tokenize(PROMPT)
    full = ref.logits(ids)
    assert full.shape == (len(ids), ref.config.n_vocab) and full.dtype == np.float32
    prefix = ref.logits(ids[:3])          # a fresh cache each call
    np.testing.assert_allclose(prefix, full[:3], rtol=0, atol=1e-5 * np.abs(full).max())


def test_generate_greedy_is_deterministic_and_streams(ref):
    a = ref.generate(PROMPT, max_tokens=12, temperature=0)
    b = ref.generate(PROMPT, max_tokens=12, temperature=0)
    assert a == b and ref.last_stats.generated_tokens <= 12
    pieces = list(ref.generate(PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(pieces) == a
    # the greedy continuation is the argmax chain of the logits
    ids = ref.tokenize(PROMPT)
    first = int(np.argmax(ref.logits(ids)[-1]))
    assert ref.last_stats is not None
    ref.generate(PROMPT, max_tokens=1, temperature=0)
    assert ref.last_stats.token_ids[:1] == [first] or first in ref.tokenizer.stop_ids


def test_generate_with_seed(ref):
    a = ref.generate(PROMPT, max_tokens=10, temperature=1.0, seed=7)
    b = ref.generate(PROMPT, max_tokens=10, temperature=1.0, seed=7)
    assert a == b


def test_stop_strings_cut_output(ref):
    text = ref.generate(PROMPT, max_tokens=16, temperature=0)
    if len(text) < 4:
        pytest.skip("greedy output too short to pick a stop string")   # pragma: no cover
    stop = text[2:4]
    cut = ref.generate(PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut == text[:text.index(stop)] and ref.last_stats.finish_reason == "stop"
    streamed = "".join(ref.generate(PROMPT, max_tokens=16, temperature=0, stop=[stop], stream=True))
    assert streamed == cut


def test_chat_messages_use_the_template(ref):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = ref.apply_chat_template(msgs)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    ids = ref.prompt_ids(msgs)
    assert ids == ref.tokenize(text)
    assert isinstance(ref.generate(msgs, max_tokens=3, temperature=0), str)


def test_prompt_longer_than_context(make_model):
    m = moe_numa.load(make_model("qwen3moe", "f32"), backend="reference", n_ctx=8)
    with pytest.raises(ContextOverflowError, match="prompt has 10 tokens but the context holds 8"):
        m.generate(list(range(10)), max_tokens=2)
    with pytest.raises(ContextOverflowError):
        m.logits(list(range(9)))
    m.generate(list(range(6)), max_tokens=50, temperature=0)
    assert m.last_stats.finish_reason in ("context", "stop")


def test_bad_prompts(ref):
    with pytest.raises(ValueError, match="out of range"):
        ref.logits([ref.config.n_vocab])
    with pytest.raises(ValueError, match="empty"):
        ref.generate("", max_tokens=1)
    with pytest.raises(ValueError, match="unknown backend"):
        moe_numa.load("x.gguf", backend="gpu")
