"""Tokenizers: GPT-2 BPE (tiktoken, built from files shipped in the package, so nothing is ever
downloaded) and a character-level tokenizer for the char configs.

Every tokenizer describes itself as a small JSON-able dict (`description()`), stored in dataset
manifests and run directories, and `from_description` rebuilds it: a run is self-describing.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import tiktoken

ASSETS = Path(__file__).resolve().parent / "assets"
# The sha256 tiktoken pins for its "gpt2" encoding (the shipped files are checked against them).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


# GPT-2's stand-in character for each byte in its encoder.json (printable bytes stand for themselves,
# the others for chr(256), chr(257), ... in byte order), mapped back to the byte
_GPT2_BYTES = {chr(b): b for b in range(256) if chr(b).isprintable() and chr(b) != " "}
_GPT2_BYTES.update((chr(256 + i), b) for i, b in enumerate(b for b in range(256) if chr(b) not in _GPT2_BYTES))


class TokenizerError(ValueError):
    """A tokenizer problem a user can fix (one line)."""


class InstallError(TokenizerError):
    """A file shipped in the package that cannot be read or is not as shipped: reinstalling fixes it."""


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding from the shipped files, checked against tiktoken's pinned sha256 here
    (tiktoken's own check goes through its download cache, which copies the files into a cache
    folder, fails where that folder cannot be written, and checks nothing when it is disabled)."""
    folder = ASSETS / "gpt2"
    for name, want in (("vocab.bpe", GPT2_VOCAB_BPE_SHA256), ("encoder.json", GPT2_ENCODER_JSON_SHA256)):
        try:
            ok = hashlib.sha256((folder / name).read_bytes()).hexdigest() == want
        except OSError as e:
            raise InstallError(f"cannot read the shipped GPT-2 BPE file {folder / name} ({e.strerror}); reinstall llmjax") from None
        if not ok:
            raise InstallError(f"the shipped GPT-2 BPE file {folder / name} is corrupt (its sha256 is not tiktoken's); reinstall llmjax")
    # The ranks from encoder.json alone, as bytes: its tokens are written in GPT-2's printable stand-ins
    # for bytes (openai/gpt-2's bytes_to_unicode). tiktoken.load.data_gym_to_mergeable_bpe_ranks also
    # rebuilds every token from vocab.bpe's merges and asserts the two agree: the same ranks (tested),
    # in 0.23 s, not 0.08 (a cost every process that tokenizes pays), with both files already pinned.
    encoder = json.loads((folder / "encoder.json").read_bytes())
    ranks = {bytes(map(_GPT2_BYTES.__getitem__, token)): rank for token, rank in encoder.items() if token != EOT}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})


class GPT2Tokenizer:
    """OpenAI's GPT-2 byte-level BPE: 50257 tokens, end-of-text = 50256."""

    vocab_size = 50257
    eot_id = 50256

    def __init__(self):
        self.encoding = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        """Training text: "<|endoftext|>" inside a document is text (7 tokens), as nanoGPT prepares
        data; documents are separated by the token itself (llmjax.prepare)."""
        return self.encoding.encode_ordinary(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Text a user writes (sampler prompts, evaluation requests): "<|endoftext|>" is the
        end-of-text token, as nanoGPT's sampler and Hugging Face's GPT-2 tokenizer (lm-eval's) read it."""
        return self.encoding.encode(text, allowed_special={EOT}, disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        """The UTF-8 bytes of some tokens (a token may hold part of a character)."""
        return self.encoding.decode_bytes([int(i) for i in ids])

    def description(self) -> dict:
        return {"kind": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class CharTokenizer:
    """One token per character of a fixed alphabet (sorted, as nanoGPT's shakespeare_char). It has
    no end-of-text token."""

    eot_id = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise TokenizerError("character vocabulary has repeated characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in this model's {self.vocab_size}-character vocabulary") from None

    encode_prompt = encode  # (no end-of-text token to spell)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def description(self) -> dict:
        return {"kind": "char", "vocab_size": self.vocab_size, "chars": self.chars}


def from_description(desc: dict):
    if not isinstance(desc, dict):
        raise TokenizerError(f"not a tokenizer description (a JSON object with a 'kind'): {type(desc).__name__}")
    kind = desc.get("kind")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if not isinstance(desc.get("chars"), str):
            raise TokenizerError("character tokenizer description without its 'chars' (a string of the vocabulary)")
        tok = CharTokenizer(desc["chars"])
        if desc.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise TokenizerError(f"character tokenizer: vocab_size {desc['vocab_size']!r} but {tok.vocab_size} characters")
        return tok
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected 'gpt2' or 'char')")
