from transformers import CLIPTokenizer

from purecc.tokenizer import BOS, EOS, build_clip_tokenizer, build_t5_tokenizer, bytes_to_unicode, clip_vocab_and_merges


def test_clip_vocab_has_clip_layout():
    vocab, merges = clip_vocab_and_merges()
    chars = list(bytes_to_unicode().values())
    ordered = sorted(vocab, key=vocab.get)
    assert ordered[:256] == chars
    assert ordered[256:512] == [c + "</w>" for c in chars]
    assert ordered[-2:] == [BOS, EOS]
    assert len(vocab) == 512 + len(merges) + 2
    # every merge only uses tokens that exist before it
    for i, (a, b) in enumerate(merges):
        assert vocab[a] < 512 + i and vocab[b] < 512 + i and vocab[a + b] == 512 + i


def test_round_trip_and_specials():
    tok = build_clip_tokenizer()
    text = "a photo of a zqx star on a striped blue background"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) < len(text)  # merges compress the text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert build_clip_tokenizer(pad_token="!").pad_token_id == 0  # SD3's tokenizer_2 pads with "!"


def test_save_and_reload_give_identical_ids(tmp_path):
    tok = build_clip_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for text in ("a red circle left of a blue square", "Hello, World! 123", "ünïcödé words"):
        assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_unknown_words_still_encode_and_decode():
    tok = build_clip_tokenizer()
    ids = tok("qwxz!")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "qwxz!"


def test_t5_tokenizer_round_trip():
    tok = build_t5_tokenizer()
    ids = tok("a red circle")["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"
