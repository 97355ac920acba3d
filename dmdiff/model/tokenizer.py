"""A small CLIP tokenizer that the package builds itself (no download), for the random-init presets.

CLIP's tokenizer is byte-level BPE: text is lower-cased and split into words (letter runs, single
digits, punctuation runs); each word's UTF-8 bytes are mapped to printable unicode symbols, the last
symbol gets the suffix ``</w>``, and ranked merges join adjacent symbols. The vocabulary is
``[256 byte symbols] + [the same with </w>] + [one token per merge] + [<|startoftext|>,
<|endoftext|>]``; every text is encodable because all single bytes are in it.

Here the merges are learnt (plain BPE: repeatedly join the most frequent adjacent pair) from a
built-in list of photo-quality words and prompt phrases, so prompts such as "a sharp, high quality
photo" split into whole-word tokens, within a vocabulary of at most ``MAX_VOCAB`` = 1000 ids (the
tiny text encoder's ``vocab_size``).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_VOCAB = 1000
MAX_LENGTH = 77   # CLIP's context length; the tokenizer must say so or padding to it fails

# Phrases in the style of restoration prompts (weighted ×4) and a word list (×1) for learning merges.
PROMPT_PHRASES = """
a high quality photo, sharp, detailed, clean, crisp, in focus, natural colors
a plain photo with balanced colors and faithful details
a blurry, hazy, low quality photo with noise and color fringing
a photo taken through a metalens, soft and low contrast
"""
WORDS = """
a an the of with and in on at by for from to is very slightly no not without
photo photograph picture image camera lens metalens optics flat sensor capture
high low quality best worst good bad poor fine sharp sharpness crisp clear clean detailed details
detail texture textures focus focused defocused blur blurry blurred hazy haze soft smooth
noise noisy grain grainy dark dim bright exposed exposure contrast faded washed
color colors colour chromatic aberration aberrations fringe fringing purple smeared distorted
natural realistic professional balanced plain neutral faithful accurate true ordinary
restored restoration enhanced degraded corrected resolution
portrait landscape street city building sky cloud clouds tree trees leaf leaves flower flowers
grass water mountain sea beach person face people animal cat dog bird car road house window
light shadow sun night day indoor outdoor red green blue yellow white black gray brown orange
astronaut coffee rocket galaxy stars
"""


def bytes_to_unicode() -> dict[int, str]:
    """The byte → printable-symbol map of byte-level BPE (GPT-2 / CLIP), 256 entries.

    Printable Latin-1 bytes map to themselves; the others (controls, space, …) are shifted to code
    points from 256 upwards, so every byte string becomes a string of visible symbols.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return dict(sorted(table.items(), key=lambda kv: ord(kv[1])))   # printable first, like CLIP


def _word_symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    """A word as byte symbols, the last one carrying the end-of-word suffix ``</w>``."""
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    return (*symbols[:-1], symbols[-1] + "</w>")


def _training_words() -> Counter:
    """Word frequencies for learning merges: prompt phrases count 4×, the word list 1×."""
    counts: Counter = Counter()
    for text, weight in ((PROMPT_PHRASES, 4), (WORDS, 1)):
        for word in text.replace(",", " ").lower().split():
            counts[word] += weight
    return counts


@lru_cache(maxsize=None)
def build_vocab(max_vocab: int = MAX_VOCAB) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Learn BPE merges from the built-in words; return ``(vocab token → id, merges in rank order)``.

    Deterministic: the most frequent pair wins, ties broken by the pair's text. Learning stops when
    every training word is one token or the vocabulary reaches ``max_vocab`` ids (specials included).
    """
    byte_map = bytes_to_unicode()
    base = list(byte_map.values())
    tokens = base + [s + "</w>" for s in base]
    known = set(tokens)
    words = {_word_symbols(w, byte_map): c for w, c in _training_words().items()}
    merges: list[tuple[str, str]] = []
    while len(tokens) + 2 < max_vocab:
        pairs: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        if best[0] + best[1] not in known:
            known.add(best[0] + best[1])
            tokens.append(best[0] + best[1])
        words = {_merge(symbols, best): c for symbols, c in words.items()}
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, tuple(merges)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``symbols`` with every adjacent occurrence of ``pair`` joined, left to right."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_tokenizer_files(folder: str | Path, max_vocab: int = MAX_VOCAB) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (CLIP format) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(max_vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def build_tokenizer(max_vocab: int = MAX_VOCAB) -> CLIPTokenizer:
    """The package's CLIP tokenizer: ids in ``[0, max_vocab)``, padded/truncated to 77 with ``<|endoftext|>``.

    Built from the files :func:`write_tokenizer_files` writes, read back by transformers'
    ``CLIPTokenizer`` exactly as a downloaded tokenizer folder would be.
    """
    with tempfile.TemporaryDirectory(prefix="dmdiff-tokenizer-") as tmp:
        return CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp, max_vocab), local_files_only=True)
