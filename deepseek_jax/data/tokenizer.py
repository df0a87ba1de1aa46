"""Tokenizers: byte-level (default) and any Hugging Face `tokenizer.json`, with per-token byte lengths for BPB.

Both tokenizers expose the same small interface used by the pipeline:

- `encode(text) -> np.ndarray[int32]` (no special tokens added), `decode(ids) -> str`;
- `vocab_size`; special ids `eos_id`, `pad_id`, `fim_prefix_id`, `fim_middle_id`, `fim_suffix_id`
  (the FIM ids may be None for an HF tokenizer without FIM tokens; FIM then raises if requested);
- `byte_lengths`: an int32 table `[vocab_size]`, the number of UTF-8 bytes of the original text each token
  stands for (0 for special tokens); `byte_length(ids)` sums it. Bits per byte (the paper's Pile metric) is
  `sum(token losses in nats) / (ln 2 * sum(byte_lengths[targets]))`;
- `describe()`: a JSON-serialisable record for run metadata.

Byte tokenizer: ids 0..255 are the UTF-8 bytes, then EOS=256, PAD=257, FIM_PREFIX=258, FIM_MIDDLE=259,
FIM_SUFFIX=260 (vocab_size 261). Its byte lengths are exact: 1 for every byte id, 0 for the specials.

HF tokenizer: the byte-length table is
- exact for byte-level BPE (a `ByteLevel` decoder, as GPT-2, Llama 3 and DeepSeek-V3 use): each character of
  a vocabulary entry is one byte through the GPT-2 byte-to-unicode map;
- an approximation otherwise (SentencePiece-style vocabularies): `<0xNN>` byte-fallback tokens count 1,
  other entries count the UTF-8 length of the entry with the metaspace '▁' read as a space; the only error
  is the prefix space some tokenizers add before a text (counted, though not in the text), i.e. at most a
  byte per document. For other schemes, compare `byte_length(encode(t))` with `len(t.encode())` on your data.
Special/added tokens count 0. Text that happens to contain a special token's string (e.g. "<|endoftext|>" in
a source file) is encoded as ordinary text, never as the special token (`encode_special_tokens=True`).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "get_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then EOS, PAD, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX (vocab 261)."""

    EOS = 256
    PAD = 257
    FIM_PREFIX = 258
    FIM_MIDDLE = 259
    FIM_SUFFIX = 260
    SPECIAL_NAMES = {256: "<|eos|>", 257: "<|pad|>", 258: "<|fim_prefix|>", 259: "<|fim_middle|>",
                     260: "<|fim_suffix|>"}

    name = "byte"
    vocab_size = 261
    eos_id = EOS
    pad_id = PAD
    fim_prefix_id = FIM_PREFIX
    fim_middle_id = FIM_MIDDLE
    fim_suffix_id = FIM_SUFFIX

    def __init__(self):
        table = np.zeros(self.vocab_size, np.int32)
        table[:256] = 1
        self.byte_lengths = table

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray, render_specials: bool = False) -> str:
        """Bytes back to text (`errors="replace"`); special tokens dropped, or rendered as e.g. "<|eos|>"."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if not render_specials:
            return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        out, run = [], []
        for i in ids.tolist():
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            out.append(self.SPECIAL_NAMES.get(i, f"<|unk:{i}|>"))
        out.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(out)

    def byte_length(self, ids: Sequence[int] | np.ndarray) -> int:
        """Number of UTF-8 bytes the ids represent (specials count 0)."""
        ids = np.asarray(ids, np.int64)
        return int(np.count_nonzero((ids >= 0) & (ids < 256)))

    def describe(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=261)"


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte value."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _has_bytelevel_decoder(dec: dict | None) -> bool:
    if not dec:
        return False
    if dec.get("type") == "ByteLevel":
        return True
    if dec.get("type") == "Sequence":
        return any(_has_bytelevel_decoder(d) for d in dec.get("decoders", []))
    return False


# Known special-token spellings, tried in order when the caller names none.
_EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_PAD_CANDIDATES = ("<｜▁pad▁｜>", "<|pad|>", "<pad>", "[PAD]")
# (prefix, middle, suffix): DeepSeek's PSM spelling is begin=prefix, end=middle, hole=suffix.
_FIM_CANDIDATES = (
    ("<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜fim▁hole｜>"),
    ("<fim_prefix>", "<fim_middle>", "<fim_suffix>"),
    ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"),
)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` package.

    eos/pad/fim_*: token strings; None picks the first known spelling present in the vocabulary (see
    `_EOS_CANDIDATES` etc.). EOS is required; PAD falls back to EOS (padding is masked anyway); the FIM tokens
    may stay None (then FIM cannot be used with this tokenizer).
    """

    def __init__(
        self,
        path: str,
        eos: str | None = None,
        pad: str | None = None,
        fim_prefix: str | None = None,
        fim_middle: str | None = None,
        fim_suffix: str | None = None,
    ):
        import tokenizers  # local: only needed for HF tokenizers

        if not os.path.isfile(path):
            raise ValueError(f"tokenizer: {path!r} is not a file (expected 'byte' or a tokenizer.json path)")
        self.path = path
        self.name = f"hf:{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"tokenizer: cannot load {path!r} as a tokenizer.json ({e})") from e
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(max(vocab.values()) + 1, self._tok.get_vocab_size(with_added_tokens=True))

        def pick(given, candidates, what, required):
            if given is not None:
                if given not in vocab:
                    raise ValueError(f"tokenizer {path!r}: {what} token {given!r} is not in the vocabulary")
                return vocab[given]
            for c in candidates:
                if c in vocab:
                    return vocab[c]
            if required:
                raise ValueError(f"tokenizer {path!r}: no {what} token found among {candidates}; pass {what}=...")
            return None

        self.eos_id = pick(eos, _EOS_CANDIDATES, "eos", True)
        pad_id = pick(pad, _PAD_CANDIDATES, "pad", False)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        given = (fim_prefix, fim_middle, fim_suffix)
        if any(g is not None for g in given):
            if any(g is None for g in given):
                raise ValueError(f"tokenizer {path!r}: pass all three of fim_prefix, fim_middle, fim_suffix")
            self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id = (
                pick(g, (), n, True) for g, n in zip(given, ("fim_prefix", "fim_middle", "fim_suffix"))
            )
        else:
            self.fim_prefix_id = self.fim_middle_id = self.fim_suffix_id = None
            for cand in _FIM_CANDIDATES:
                if all(c in vocab for c in cand):
                    self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id = (vocab[c] for c in cand)
                    break

        with open(path, "rb") as fh:
            spec = json.load(fh)
        self.byte_level = _has_bytelevel_decoder(spec.get("decoder"))
        special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special", False)}
        special_ids |= {i for i in (self.eos_id, self.pad_id, self.fim_prefix_id, self.fim_middle_id,
                                    self.fim_suffix_id) if i is not None}
        table = np.zeros(self.vocab_size, np.int32)
        u2b = _gpt2_unicode_to_byte()
        for tok, i in vocab.items():
            if i in special_ids:
                continue
            if self.byte_level and all(ch in u2b for ch in tok):
                table[i] = len(tok)
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                table[i] = 1
            else:
                table[i] = len(tok.replace("▁", " ").encode("utf-8"))
        self.byte_lengths = table

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray, render_specials: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(ids, skip_special_tokens=not render_specials)

    def byte_length(self, ids: Sequence[int] | np.ndarray) -> int:
        ids = np.asarray(ids, np.int64)
        return int(self.byte_lengths[ids].sum()) if ids.size else 0

    def describe(self) -> dict:
        return {"kind": "hf", "path": self.path, "vocab_size": self.vocab_size, "byte_level": self.byte_level,
                "eos_id": self.eos_id, "pad_id": self.pad_id,
                "fim_ids": [self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id]}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def get_tokenizer(spec: str = "byte", **kwargs):
    """"byte" -> ByteTokenizer(); a path to a tokenizer.json (or a directory holding one) -> HFTokenizer."""
    if spec == "byte":
        if kwargs:
            raise ValueError(f"tokenizer 'byte' takes no options, got {sorted(kwargs)}")
        return ByteTokenizer()
    if os.path.isdir(spec):
        spec = os.path.join(spec, "tokenizer.json")
    return HFTokenizer(spec, **kwargs)
