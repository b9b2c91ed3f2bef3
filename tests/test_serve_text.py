"""The engine's text stream (serve/engine.py): incremental detokenization gives the text of
decoding the whole answer at once, held back while it could become a stop string or ends in an
incomplete character, cut at the first stop string (brute force: the whole decode, searched)."""

import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from streammerge.serve.engine import Engine  # noqa: E402
from streammerge.serve.scheduler import Request, Sampling, Scheduler  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE whose tokens split multi-byte characters (ä, €, emoji), plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    alphabet = "abcdefgh äöü€ .,!\n🙂"
    corpus = ["".join(rng.choice(alphabet) for _ in range(200)) for _ in range(300)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class _Runner:
    def __init__(self, tokenizer):
        self.tokenizer, self.eos = tokenizer, {tokenizer.eos_token_id}

    def remove(self, reqs):
        pass

    def resident_bytes(self):
        return {}


def _stream(tok, tokens, stop=(), max_tokens=10_000):
    """(concatenated text events, finish reason) of feeding `tokens` to an engine one by one."""
    engine = Engine(_Runner(tok), Scheduler(8, 1))
    events = []
    r = Request([1], Sampling(max_tokens=max_tokens, stop=tuple(stop)), ("static",), emit=events.append)
    for t in tokens:
        engine._token(r, t)
        if events and events[-1][0] == "done":
            break
    texts = [e[1] for e in events if e[0] == "text"]
    assert all(texts) and events[-1][0] == "done"
    return "".join(texts), events[-1][1]


@pytest.mark.parametrize("seed", range(12))
def test_stream_equals_the_whole_decode(tokenizer, seed):
    rng = random.Random(seed)
    specials = [tokenizer.bos_token_id, tokenizer.pad_token_id]
    # random ids: byte tokens alone make incomplete characters, specials are skipped
    tokens = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(3, len(tokenizer)) for _ in range(rng.randrange(1, 120))]
    ended = rng.random() < 0.5
    text, reason = _stream(tokenizer, tokens + ([tokenizer.eos_token_id] if ended else []), max_tokens=len(tokens) + ended)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert reason == ("stop" if ended else "length")


@pytest.mark.parametrize("seed", range(12))
def test_stop_strings_cut_where_the_whole_decode_first_holds_one(tokenizer, seed):
    rng = random.Random(100 + seed)
    tokens = tokenizer("".join(rng.choice("abcdefgh äöü€ .,!\n🙂") for _ in range(300)))["input_ids"]
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    i = rng.randrange(len(whole) - 3)
    stops = [whole[i : i + rng.randrange(1, 4)], "never here ✗"]
    text, reason = _stream(tokenizer, tokens, stop=stops, max_tokens=len(tokens))
    # brute force: the shortest prefix of tokens whose decode holds a stop, cut at its first one
    for n in range(1, len(tokens) + 1):
        prefix = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        hits = [prefix.find(s) for s in stops if s in prefix]
        if hits:
            break
    assert reason == "stop" and text == prefix[: min(hits)]


def test_each_token_decodes_a_window_not_the_whole_answer(tokenizer, monkeypatch):
    """A token's detokenization costs the same at any length: every decode call gets a few
    tokens (the whole answer decoded every token made a step's cost grow with the answer)."""
    tokens = tokenizer("abc def, ghä! " * 80)["input_ids"]
    sizes = []
    decode = type(tokenizer).decode
    monkeypatch.setattr(type(tokenizer), "decode", lambda self, ids, **kw: sizes.append(len(ids)) or decode(self, ids, **kw))
    text, _ = _stream(tokenizer, tokens, max_tokens=len(tokens))
    assert len(tokens) > 300 and text == decode(tokenizer, tokens, skip_special_tokens=True)
    assert max(sizes) <= 8, max(sizes)
