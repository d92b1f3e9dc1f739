"""WordTokenizer (megatron_papo.data.tokenizer): ids, round trips, specials, reward compatibility."""

import hashlib
import random

import pytest

from megatron_papo.data.easy_vqa import easy_vqa_tokenizer
from megatron_papo.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    WordTokenizer,
    normalize_text,
    split_pieces,
)
from megatron_papo.rewards import accuracy_reward, extract_last_boxed, format_reward

CORPUS = ["What is the blue shape?", "Is there a red circle in the image?", "The answer is 42."]

# sha256 of the easy-VQA vocabulary ("\n".join(tokens)); changes only if the corpus, the splitting
# rules or the package data change. Pinned so that ids are the same on every machine.
EASY_VQA_VOCAB_SHA256 = "0b1d22b63c517efa39b8bf503bf12df65e0c8b6378b9ff2ef83964aaf3238ca1"
EASY_VQA_VOCAB_SIZE = 192


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer.build(CORPUS)


def _pieces(text: str) -> list[str]:
    return split_pieces(normalize_text(text))


def test_special_ids_are_fixed_and_protocol_holds(tok):
    assert tok.tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.image_token_id) == (0, 1, 2, 3, 4)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(tok.tokens)


def test_build_is_deterministic_and_order_free():
    shuffled = CORPUS * 3
    random.Random(0).shuffle(shuffled)
    assert WordTokenizer.build(CORPUS * 3).tokens == WordTokenizer.build(shuffled).tokens


def test_easy_vqa_tokenizer_is_pinned():
    tok = easy_vqa_tokenizer()
    assert tok is easy_vqa_tokenizer()  # cached
    assert tok.vocab_size == EASY_VQA_VOCAB_SIZE
    digest = hashlib.sha256("\n".join(tok.tokens).encode()).hexdigest()
    assert digest == EASY_VQA_VOCAB_SHA256


def test_in_vocabulary_round_trip_is_one_id_per_word(tok):
    text = "What   is the\tblue shape?\nThe answer is 42."
    ids = tok.encode(text)
    assert tok.decode(ids) == normalize_text(text) == "what is the blue shape? the answer is 42."
    assert len(ids) == len(_pieces(text))  # no character fallback


def test_unknown_ascii_words_fall_back_to_characters(tok):
    text = "Zebra_7 says \\frac{1}{2} = 0.5, OK!"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == normalize_text(text)
    assert len(tok.encode(" zebra")) == 5  # " z" + 4 letters


def test_non_ascii_becomes_unk(tok):
    assert tok.encode("café") == [*tok.encode("caf"), tok.unk_id]
    assert tok.decode(tok.encode("café")) == "caf<unk>"


def test_specials_inside_text_get_their_ids(tok):
    ids = tok.encode("<think>x</think>\\boxed{blue}<image><eos>")
    for special in ("<think>", "</think>", "\\boxed{", "}", "<image>", "<eos>"):
        assert tok.token_to_id(special) in ids
    assert ids[-1] == tok.eos_id


def test_decode_skip_special_keeps_text_like_tokens(tok):
    text = "<think> hi </think> \\boxed{3}"
    ids = [tok.bos_id, tok.image_token_id, *tok.encode(text), tok.eos_id, tok.pad_id]
    assert tok.decode(ids, skip_special=True) == text
    assert tok.decode(ids).startswith("<bos><image><think>")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("answer", ["circle", "yes", "teal"])
def test_generated_text_round_trips_through_the_rewards(answer):
    tok = easy_vqa_tokenizer()
    response = f"<think> the shape is red </think> \\boxed{{{answer}}}"
    ids = tok.encode(response)
    assert len(ids) == len(_pieces(response))  # all in vocabulary
    assert ids.count(tok.token_to_id("\\boxed{")) == 1
    decoded = tok.decode(ids)
    assert decoded == response
    assert format_reward(decoded) == 1.0
    assert accuracy_reward(decoded, answer) == 1.0
    assert accuracy_reward(decoded, "no" if answer != "no" else "yes") == 0.0


def test_numeric_boxed_answer_survives(tok):
    decoded = tok.decode(tok.encode("<think>2 + 1.5</think> \\boxed{3.5}"))
    assert extract_last_boxed(decoded) == "3.5"
    assert format_reward(decoded) == 1.0


def test_every_easy_vqa_question_is_in_vocabulary():
    from megatron_papo.data.easy_vqa import load_split

    tok = easy_vqa_tokenizer()
    for split in ("train", "test"):
        for question in set(load_split(split).questions):
            assert len(tok.encode(question)) == len(_pieces(question)), question


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded.tokens == tok.tokens and loaded.lowercase == tok.lowercase
    assert loaded.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a"):
        WordTokenizer.load(tmp_path / "bad.json")


def test_min_freq_and_extra_tokens():
    tok = WordTokenizer.build(["a red red blue"], min_freq=2, extra_tokens=["circle", " teal"])
    assert tok.token_to_id(" red") is not None and tok.token_to_id(" blue") is None
    assert tok.token_to_id("circle") is not None and tok.token_to_id(" teal") is not None
    with pytest.raises(ValueError, match="single piece"):
        WordTokenizer.build([], extra_tokens=["two words"])


def test_vocabulary_must_start_with_specials():
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(tokens=["a", "b"])
