"""The embedded model's tokenizers, built by the project from its own corpus (no hub download).

CLIP: a byte-level BPE in CLIP's exact layout (256 byte symbols, the same 256 with the ``</w>``
end-of-word suffix, one token per merge, then ``<|startoftext|>`` / ``<|endoftext|>``), trained with
``tokenizers`` on a corpus the project writes itself and wrapped in transformers' ``CLIPTokenizer``,
the class the real SD3 folders use. T5 (optional): a small Unigram model wrapped in ``T5Tokenizer``.
Both are deterministic: the same corpus always yields the same vocabulary.
"""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, T5Tokenizer

# CLIP's pre-tokenisation: special tokens, contractions, letter runs, single digits, other runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_WORDS = """
a an the of on in at with and or to from by photo picture image painting drawing render close up
small large big tiny huge left right top bottom center middle above below under next beside behind
one two three four five many several red green blue yellow purple orange white black gray grey pink
brown cyan magenta gold silver dark light bright pale circle square triangle diamond star cross
heart hexagon ring cube sphere shape shapes object objects solid striped stripes dotted dots
checkered checker zigzag spiral wavy grid gradient plain background backgrounds pattern patterned
textured texture robot toy dog cat car house tree flower cup mug table wooden wood floor wall
street beach forest sky city room desk chair sofa bed window door standing sitting lying wearing
holding style styled portrait landscape scene view high quality detailed sharp blurry
""".split()


def builtin_corpus() -> list[str]:
    """Sentences covering the words the project's prompts use, in a fixed order."""
    words = sorted(set(_WORDS))
    lines = [" ".join(words[i:i + 7]) for i in range(0, len(words), 7)]
    lines += [f"a {w} on a plain background" for w in words]
    lines += [f"a photo of a {a} {b}" for a in words[:40] for b in words[40:80]]
    return lines


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (the byte-level BPE convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def _train_merges(corpus: list[str], vocab_size: int) -> list[tuple[str, str]]:
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


@lru_cache(maxsize=4)
def clip_vocab_and_merges(num_merges: int = 486) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary and merges (486 merges -> a 1000-token vocabulary)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for left, right in _train_merges(builtin_corpus(), vocab_size=4 * num_merges + 600):
        if len(merges) == num_merges:
            break
        if left in known and right in known and left + right not in known:
            merges.append((left, right))
            tokens.append(left + right)
            known.add(left + right)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = EOS, num_merges: int = 486, max_length: int = 77) -> CLIPTokenizer:
    """SD3 convention: tokenizer pads with EOS, tokenizer_2 pads with "!"."""
    vocab, merges = clip_vocab_and_merges(num_merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                         model_max_length=max_length)


def build_t5_tokenizer(vocab_size: int = 256, max_length: int = 77) -> T5Tokenizer:
    """A tiny Unigram tokenizer in T5's format (``<pad>``=0, ``</s>``=1, ``<unk>``=2)."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(builtin_corpus(), trainer)
    pieces = [(p, float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
