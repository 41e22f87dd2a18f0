import json
import random

import pytest

from edgellm.tokenizer import StopMatcher, StreamDecoder, Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHINESE = "小明比小红年龄大，小红比小华年龄大。谁是年龄最小的？"
EMOJI = "👍🏽 family: 👨‍👩‍👧"
MIXED = "Hello 世界! Ça va? 😀 naïve café — 日本語とEnglish\n\tend 🎉🎉"
TEXTS = [CHINESE, EMOJI, MIXED]


@pytest.fixture(scope="module")
def byte_level(smollm2_tokenizer_dir) -> Tokenizer:
    """SmolLM2's GPT-2-style byte-level BPE, converted by transformers from the GGUF (cached)."""
    return Tokenizer.from_dir(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory) -> Tokenizer:
    """A tiny SentencePiece-style BPE trained on English only: CJK and emoji become <0x..> tokens."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, this is a small corpus for a tiny tokenizer; family and friends.",
        "Streaming text must never break a character in half. Numbers 0123456789 end!",
    ] * 20
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    raw.train_from_iterator(corpus, trainer)
    data = json.loads(raw.to_str())
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for tok, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    data["model"]["vocab"] = vocab
    data["model"]["byte_fallback"] = True
    for added in data["added_tokens"]:
        added["id"] = vocab[added["content"]]
    raw = RawTokenizer.from_str(json.dumps(data))
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out = tmp_path_factory.mktemp("byte_fallback_tok")
    raw.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(out)


@pytest.fixture(params=["byte_level", "byte_fallback"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tokenizer, ids, skip_special_tokens=True):
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    return [decoder.put(i) for i in ids] + [decoder.flush()]


def test_tokenizers_split_characters_into_bytes(byte_level, byte_fallback):
    # The streaming tests below only mean something if characters really span several tokens.
    fallback_tokens = [byte_fallback.id_to_token(i) for i in byte_fallback.encode(CHINESE)]
    assert sum(t.startswith("<0x") for t in fallback_tokens) >= 3 * len(CHINESE) - 2
    level_ids = byte_level.encode(EMOJI)
    assert len(level_ids) > len(EMOJI)
    assert any(byte_level.decode([i]).endswith("\ufffd") for i in level_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_decode_without_broken_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids) == text
    deltas = stream(tok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # something was held back while a character was incomplete
    assert sum(1 for d in deltas if d) > 5  # ...but text still streams, not all at the end


def test_special_tokens_kept_or_skipped(byte_level):
    ids = byte_level.encode("<|im_start|>assistant\n" + CHINESE + "<|im_end|>")
    for skip in (True, False):
        deltas = stream(byte_level, ids, skip_special_tokens=skip)
        assert "".join(deltas) == byte_level.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
    assert "".join(stream(byte_level, ids, skip_special_tokens=False)).endswith("<|im_end|>")


def test_flush_returns_unfinished_character(byte_fallback):
    ids = byte_fallback.encode("ab 世")[:-1]  # drop the last byte of 世
    deltas = stream(byte_fallback, ids)
    assert deltas[-1].endswith("\ufffd") and not any("\ufffd" in d for d in deltas[:-1])
    assert "".join(deltas) == byte_fallback.decode(ids)


def test_random_token_sequences_byte_level(byte_level):
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert "".join(stream(byte_level, ids, skip)) == byte_level.decode(ids, skip_special_tokens=skip)


def test_random_valid_sequences_byte_fallback(byte_fallback):
    rng = random.Random(99)
    words = ["▁the", "▁fox", "e", "s", "▁", "!", "<s>", "</s>"]
    chars = list("世界年龄😀👍é\u200d")
    for _ in range(200):
        ids = []
        for _ in range(rng.randrange(1, 20)):
            if rng.random() < 0.5:
                ids.append(byte_fallback.token_to_id(rng.choice(words)))
            else:
                ids.extend(byte_fallback.token_to_id(f"<0x{b:02X}>") for b in rng.choice(chars).encode())
        deltas = stream(byte_fallback, ids)
        assert "".join(deltas) == byte_fallback.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


class CountingTokenizer:
    def __init__(self, inner):
        self.inner = inner
        self.lengths = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decodes_a_small_window_per_token(tok):
    text = (MIXED + " " + CHINESE + " ") * 30
    ids = tok.encode(text)
    counting = CountingTokenizer(tok)
    deltas = stream(counting, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert len(ids) > 500
    assert max(counting.lengths) <= 12
    assert sum(counting.lengths) < 10 * len(ids)


def test_tokenizers_stream_gives_the_same_deltas(tok):
    """Through `tokenizers`' DecodeStream (edgellm's Tokenizer) and through the rule in StreamDecoder (any
    object with `decode`), the same deltas."""
    ids = tok.encode((MIXED + " " + CHINESE + " " + EMOJI) * 3)
    assert stream(tok, ids) == stream(CountingTokenizer(tok), ids)


def test_a_refused_step_hands_the_stream_to_the_rule(tok):
    """When tokenizers' DecodeStream refuses a step (its InvalidPrefix: a decoder whose text of a window does
    not extend the text of the window's start), the stream goes on by StreamDecoder's own rule from where
    DecodeStream last emitted: the same deltas, nothing lost or repeated."""

    class Refuses:
        def step(self, backend, token_id):
            raise Exception("Invalid prefix encountered")

    ids = tok.encode((MIXED + " " + CHINESE) * 2)
    want = stream(CountingTokenizer(tok), ids)
    for cut in (1, 7, len(ids) // 2):
        decoder = StreamDecoder(tok)
        got = [decoder.put(i) for i in ids[:cut]]
        decoder._stream = Refuses()
        got += [decoder.put(i) for i in ids[cut:]] + [decoder.flush()]
        assert got == want and decoder._stream is None, cut


def test_stop_string_across_deltas():
    stop = StopMatcher(["<|end|>"])
    assert stop.feed("Hello wor") == ("Hello wor", False)
    assert stop.feed("ld! <|e") == ("ld! ", False)
    assert stop.feed("nd|> and more") == ("", True)
    assert stop.matched == "<|end|>"
    assert stop.feed("ignored") == ("", True)
    assert stop.flush() == ""


def test_partial_match_held_then_released():
    stop = StopMatcher(["###", "STOP"])
    assert stop.feed("a#") == ("a", False)
    assert stop.feed("#") == ("", False)
    assert stop.feed("b") == ("##b", False)
    assert stop.feed(" ST") == (" ", False)
    assert stop.feed("ay") == ("STay", False)
    assert stop.feed("!S") == ("!", False)
    assert stop.flush() == "S"


def test_first_occurrence_wins_and_edge_cases():
    stop = StopMatcher(["world", "lo w"])
    assert stop.feed("hello world") == ("hel", True)
    assert stop.matched == "lo w"
    assert StopMatcher([]).feed("abc") == ("abc", False)
    assert StopMatcher(["", "x"]).feed("abc") == ("abc", False)
    whole = StopMatcher(["END"])
    assert whole.feed("END") == ("", True)


def test_random_splits_cut_before_first_stop():
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 25)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(4, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher = StopMatcher(stops)
        out, stopped = "", False
        for piece in pieces:
            emitted, stopped = matcher.feed(piece)
            out += emitted
            assert not any(s in out for s in stops)
        if not stopped:
            out += matcher.flush()
        first = min((text.find(s) for s in stops if s in text), default=-1)
        assert stopped == (first != -1)
        assert out == (text[:first] if first != -1 else text)


def test_decoder_and_stop_matcher_together(tok):
    text = CHINESE + " then more text"
    ids = tok.encode(text)
    decoder, matcher = StreamDecoder(tok), StopMatcher(["。谁"])
    out = ""
    for i in ids:
        emitted, stopped = matcher.feed(decoder.put(i))
        out += emitted
        if stopped:
            break
    assert stopped and out == "小明比小红年龄大，小红比小华年龄大"
