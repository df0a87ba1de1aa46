"""Packed training batches (grain) with FIM, deterministic and resumable; packed evaluation batches.

Training stream
---------------
1. Document order: `grain.MapDataset.source(docs)` read through `EpochShuffle`, a grain MapDataset giving a
   fresh permutation of the corpus every epoch: stream position p is element `p % n` of epoch `p // n`'s
   permutation, which sorts the documents by `hash(seed, epoch, "perm", doc_index)`. (grain's own
   `shuffle(seed).repeat()` was not used: it seeds epoch e with seed + e, so runs with seeds 0 and 1 would
   read the same orders one epoch apart, and its index_shuffle cycle-walks: measured 0.1-0.6 ms per lookup for
   corpora of 50-300 documents, about 10 us above a few thousand.)
2. Encoding (`encode_document`), per stream position: with probability `fim_rate` (paper: 0.1) the document is
   rearranged in prefix-suffix-middle order,
       [FIM_PREFIX] prefix [FIM_SUFFIX] suffix [FIM_MIDDLE] middle [EOS]
   where the two split points are drawn uniformly (independently, then sorted) from the character positions
   0..len(text); otherwise it is `tokens [EOS]`. The decision and the split points come from a per-document
   counter-based generator keyed by (seed, epoch, doc_index), so they do not depend on anything that
   happened before in the stream (this is what makes resuming exact and cheap). Prefix, suffix and middle are
   tokenized separately (as they would be at inference time).
   "hash" is SplitMix64 chained over the key words, in numpy uint64 arithmetic: the order and the FIM draws are
   the same on every machine and every numpy/grain version (no dependence on a library's RNG stream).
3. Packing: the encoded documents are concatenated into one token stream (EOS between documents, no
   cross-document attention mask, as the paper) and cut into rows of `seq_len + 1` tokens with stride
   `seq_len`: row r is stream[r*seq_len : r*seq_len + seq_len + 1]. The model reads `row[:-1]` and predicts
   `row[1:]`; consecutive rows share one token, so every stream token after the first is a target exactly once.
4. Batching: global batch k is rows [k*batch_size, (k+1)*batch_size). With `shard_count > 1` (multi-host),
   `batch_size` is the GLOBAL batch size and shard i yields rows [i*b, (i+1)*b) of it, b = batch_size //
   shard_count: the data seen by the model does not depend on how many hosts read it.

Batches are dicts of numpy arrays:
    {"tokens": int32 [b, seq_len + 1], "target_bytes": int32 [b]}
`target_bytes[j]` is the number of UTF-8 bytes that row j's targets `tokens[j, 1:]` stand for
(`tokenizer.byte_lengths`; specials count 0) — the denominator of bits per byte.

State: `it.get_state()` returns a small JSON-serialisable dict (stream position of the next row's first
token as (document position, token offset), rows and batches produced so far, plus the settings it depends
on); a new iterator given `set_state(state)` continues bitwise where the old one stopped. The state is global
(not per shard), so it may be restored with a different `shard_count` as long as the global batch is the same.
`set_state` refuses a state written with a different seed, seq_len, fim_rate, corpus size or tokenizer, and
with a different corpus fingerprint when one is passed (`corpus_fingerprint=corpus.fingerprint(docs)`).
`it.next_batch(batch_size)` takes a batch of another global size (for a batch-size ramp); the state stays exact.

Evaluation batches (`make_eval_batches`)
----------------------------------------
The validation documents in their given order, no shuffle, no FIM, as one stream that STARTS with EOS (so the
first token of the first document is a target too, and every document is predicted after a document
boundary as in training): [EOS] doc0 [EOS] doc1 [EOS] ... Rows as above (stride seq_len); the last row is
padded with PAD, and the last batch with all-PAD rows. Each batch has
    {"tokens": int32 [b, seq_len + 1], "mask": bool [b, seq_len], "target_bytes": int32 [b]}
`mask[j, t]` is True iff `tokens[j, t + 1]` is a real target (not padding); each validation token and each
EOS after a document is a target exactly once over all batches. `target_bytes` counts masked targets only;
over all batches it sums to the UTF-8 size of the validation documents (exactly, for byte-level tokenizers).
BPB = sum(masked token losses in nats) / (ln 2 * sum(target_bytes)): the EOS predictions are part of the
loss and carry 0 bytes. `max_batches` keeps the first batches only (then coverage is partial).

Token ids are checked on the host: any id outside [0, vocab_size) (the tokenizer's, or the model's if
`vocab_size` is passed) raises ValueError naming the tokenizer, the vocabulary size and the document.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import grain.python as grain
import numpy as np

from deepseek_jax.data.corpus import Document

__all__ = [
    "STATE_VERSION",
    "EncodedDocument",
    "EpochShuffle",
    "encode_document",
    "document_stream",
    "PackedDataset",
    "PackedBatchIterator",
    "make_train_iterator",
    "make_eval_batches",
]

STATE_VERSION = 1


_TAG_PERM = 0x7065726D  # "perm"
_TAG_FIM = 0x66696D  # "fim"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_uint64(key: Sequence[int], counter: np.ndarray) -> np.ndarray:
    """Counter-based random words: SplitMix64 chained over the key words, then over each counter value."""
    counter = np.asarray(counter, np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(1, np.uint64)
        for w in key:
            h = _splitmix64(h ^ np.uint64(int(w) & 0xFFFFFFFFFFFFFFFF))
        return _splitmix64(h ^ counter)


class EpochShuffle(grain.MapDataset):
    """Infinite grain MapDataset: position p -> (epoch, doc_index, parent[doc_index]), a fresh permutation per epoch.

    The permutation of epoch e is the argsort of keyed_uint64((seed, e, "perm"), arange(n)); the current epoch's
    permutation is cached, so a lookup costs O(1) after O(n log n) once per epoch.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._n = len(parent)
        if self._n == 0:
            raise ValueError("EpochShuffle: empty dataset")
        self._seed = int(seed)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            keys = keyed_uint64((self._seed, epoch, _TAG_PERM), np.arange(self._n, dtype=np.uint64))
            perm = np.argsort(keys, kind="stable")
            self._cache = {epoch: perm}  # keep one epoch: the stream is read (nearly) in order
        return perm

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, k = divmod(int(index), self._n)
        d = int(self.permutation(epoch)[k])
        return epoch, d, self._parent[d]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"


@dataclasses.dataclass(frozen=True)
class EncodedDocument:
    """Tokens of one stream position (always ending with EOS), whether FIM was applied, and where it came from."""

    tokens: np.ndarray
    fim: bool
    name: str
    epoch: int = -1
    doc_index: int = -1


def _check_ids(ids: np.ndarray, tokenizer, vocab_size: int, name: str) -> None:
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} produced token id {bad} outside the vocabulary "
            f"[0, {vocab_size}) in document {name!r}"
        )


def encode_document(text: str, tokenizer, fim_rate: float = 0.0, rng_key: Sequence[int] | None = None,
                    vocab_size: int | None = None, name: str = "?") -> EncodedDocument:
    """Encode one document (+FIM in PSM order with probability fim_rate) and append EOS. See module docstring.

    `rng_key` (a tuple of ints, e.g. (seed, epoch, doc_index)) keys the FIM draws; required when fim_rate > 0:
    u = word0 / 2**64 decides FIM (u < fim_rate), split points are word1 % (n+1) and word2 % (n+1), sorted,
    with words = keyed_uint64((*rng_key, "fim"), [0, 1, 2]) and n = len(text) in characters.
    """
    vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
    eos = np.asarray([tokenizer.eos_id], np.int32)
    fim = False
    if fim_rate > 0:
        if rng_key is None:
            raise ValueError("encode_document: fim_rate > 0 needs an rng_key")
        w = [int(x) for x in keyed_uint64((*rng_key, _TAG_FIM), np.arange(3, dtype=np.uint64))]
        if (w[0] >> 11) * 2.0**-53 < fim_rate:
            fim = True
            n = len(text)
            i, j = sorted((w[1] % (n + 1), w[2] % (n + 1)))
            pre, mid, suf = text[:i], text[i:j], text[j:]
            ids = np.concatenate([
                np.asarray([tokenizer.fim_prefix_id], np.int32), tokenizer.encode(pre),
                np.asarray([tokenizer.fim_suffix_id], np.int32), tokenizer.encode(suf),
                np.asarray([tokenizer.fim_middle_id], np.int32), tokenizer.encode(mid), eos,
            ])
    if not fim:
        ids = np.concatenate([tokenizer.encode(text).astype(np.int32, copy=False), eos])
    _check_ids(ids, tokenizer, vocab_size, name)
    return EncodedDocument(ids, fim, name)


def _check_tokenizer(tokenizer, vocab_size: int, fim_rate: float) -> None:
    if not 0.0 <= fim_rate <= 1.0:
        raise ValueError(f"fim_rate must be in [0, 1], got {fim_rate}")
    needed = {"eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    if fim_rate > 0:
        needed.update(fim_prefix_id=tokenizer.fim_prefix_id, fim_middle_id=tokenizer.fim_middle_id,
                      fim_suffix_id=tokenizer.fim_suffix_id)
    for what, i in needed.items():
        if i is None:
            raise ValueError(f"tokenizer {tokenizer.name!r} has no {what} (needed for fim_rate={fim_rate})")
        if not 0 <= i < vocab_size:
            raise ValueError(f"tokenizer {tokenizer.name!r}: {what}={i} is outside the vocabulary [0, {vocab_size})")


def document_stream(docs: Sequence[Document], tokenizer, seed: int = 0, fim_rate: float = 0.0,
                    vocab_size: int | None = None) -> grain.MapDataset:
    """The infinite, random-access stream of encoded documents: position p -> EncodedDocument (grain)."""
    if len(docs) == 0:
        raise ValueError("document_stream: the corpus is empty")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    _check_tokenizer(tokenizer, vocab_size, fim_rate)

    def encode(item) -> EncodedDocument:
        epoch, d, doc = item
        enc = encode_document(doc.text, tokenizer, fim_rate, (seed, epoch, d), vocab_size, doc.name)
        return dataclasses.replace(enc, epoch=epoch, doc_index=d)

    return EpochShuffle(grain.MapDataset.source(list(docs)), seed).map(encode)


class PackedBatchIterator(grain.DatasetIterator):
    """Packs the encoded-document stream into rows of seq_len + 1 (stride seq_len) and batches them.

    State: (doc, pos) = stream position of the next row's first token; rows / batches produced so far.
    """

    def __init__(self, stream: grain.MapDataset, tokenizer, seq_len: int, batch_size: int, shard_index: int,
                 shard_count: int, settings: dict):
        super().__init__()
        self._stream = stream
        self._byte_lengths = np.asarray(tokenizer.byte_lengths, np.int32)
        self._seq_len = seq_len
        self._batch_size = batch_size
        self._shard_index = shard_index
        self._shard_count = shard_count
        self._settings = settings
        self._doc = 0
        self._pos = 0
        self._rows = 0
        self._batches = 0
        self._cache_doc = -1
        self._cache_tokens = None

    def _tokens(self, d: int) -> np.ndarray:
        if d != self._cache_doc:
            self._cache_tokens = self._stream[d].tokens
            self._cache_doc = d
        return self._cache_tokens

    def _fill(self, out: np.ndarray | None) -> None:
        """Read one row (seq_len + 1 tokens) into `out` (or skip it if None) and advance by seq_len tokens."""
        need, filled = self._seq_len + 1, 0
        d, p = self._doc, self._pos
        while filled < need:
            toks = self._tokens(d)
            take = min(need - filled, len(toks) - p)
            if out is not None:
                out[filled:filled + take] = toks[p:p + take]
            filled += take
            p += take
            if p == len(toks) and filled < need:
                d, p = d + 1, 0
        # The row's last token is at (d, p - 1), p >= 1; the next row starts there (overlap of one token).
        self._doc, self._pos = d, p - 1
        self._rows += 1

    def next_batch(self, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """The next batch; `batch_size` (global) overrides the default for this batch (batch-size ramp)."""
        bs = self._batch_size if batch_size is None else int(batch_size)
        if bs <= 0 or bs % self._shard_count:
            raise ValueError(f"batch_size {bs} must be a positive multiple of shard_count {self._shard_count}")
        local = bs // self._shard_count
        lo, hi = self._shard_index * local, (self._shard_index + 1) * local
        tokens = np.empty((local, self._seq_len + 1), np.int32)
        for r in range(bs):
            self._fill(tokens[r - lo] if lo <= r < hi else None)
        self._batches += 1
        target_bytes = self._byte_lengths[tokens[:, 1:]].sum(axis=1, dtype=np.int64).astype(np.int32)
        return {"tokens": tokens, "target_bytes": target_bytes}

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "doc": int(self._doc), "pos": int(self._pos), "rows": int(self._rows),
                "batches": int(self._batches), **self._settings}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} != {STATE_VERSION}")
        for k, v in self._settings.items():
            if state.get(k) != v:
                raise ValueError(f"data iterator state was written with {k}={state.get(k)!r}, this pipeline has "
                                 f"{k}={v!r}: refusing to resume on different data")
        self._doc, self._pos = int(state["doc"]), int(state["pos"])
        self._rows, self._batches = int(state["rows"]), int(state["batches"])

    def __str__(self) -> str:
        return f"PackedBatchIterator(seq_len={self._seq_len}, batch_size={self._batch_size}, {self._settings})"


class PackedDataset(grain.IterDataset):
    """grain IterDataset of packed training batches over a `document_stream` (see module docstring)."""

    def __init__(self, docs: Sequence[Document], tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 fim_rate: float = 0.0, shard_index: int = 0, shard_count: int = 1, vocab_size: int | None = None,
                 corpus_fingerprint: str | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}")
        if batch_size < 1 or batch_size % shard_count:
            raise ValueError(f"batch_size {batch_size} (global) must be a positive multiple of shard_count "
                             f"{shard_count}")
        stream = document_stream(docs, tokenizer, seed, fim_rate, vocab_size)
        super().__init__(stream)
        self._stream = stream
        self._tokenizer = tokenizer
        self._seq_len, self._batch_size = int(seq_len), int(batch_size)
        self._shard_index, self._shard_count = int(shard_index), int(shard_count)
        self._settings = {"seed": int(seed), "seq_len": int(seq_len), "fim_rate": float(fim_rate),
                          "num_docs": len(docs), "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
                          "vocab_size": int(tokenizer.vocab_size)}
        if corpus_fingerprint is not None:
            self._settings["corpus_fingerprint"] = str(corpus_fingerprint)

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._stream, self._tokenizer, self._seq_len, self._batch_size,
                                   self._shard_index, self._shard_count, dict(self._settings))

    def __str__(self) -> str:
        return f"PackedDataset({self._settings})"


def make_train_iterator(docs: Sequence[Document], tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                        fim_rate: float = 0.1, shard_index: int = 0, shard_count: int = 1,
                        vocab_size: int | None = None, corpus_fingerprint: str | None = None) -> PackedBatchIterator:
    """Infinite iterator of packed training batches {"tokens" [b, seq_len+1] int32, "target_bytes" [b] int32}.

    batch_size is global (b = batch_size // shard_count rows per shard). fim_rate defaults to the paper's 0.1.
    vocab_size: the model's vocabulary (ids are checked against it); default the tokenizer's.
    corpus_fingerprint: recorded in the state and checked by set_state (pass `corpus.fingerprint(docs)`).
    """
    return iter(PackedDataset(docs, tokenizer, seq_len, batch_size, seed, fim_rate, shard_index, shard_count,
                              vocab_size, corpus_fingerprint))


def make_eval_batches(docs: Sequence[Document], tokenizer, seq_len: int, batch_size: int,
                      max_batches: int | None = None, shard_index: int = 0, shard_count: int = 1,
                      vocab_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches covering `docs` once (see module docstring for the exact layout)."""
    if len(docs) == 0:
        raise ValueError("make_eval_batches: no validation documents")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}")
    if batch_size < 1 or batch_size % shard_count:
        raise ValueError(f"batch_size {batch_size} (global) must be a positive multiple of shard_count {shard_count}")
    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    _check_tokenizer(tokenizer, vocab_size, 0.0)
    parts = [np.asarray([tokenizer.eos_id], np.int32)]
    for d in docs:
        parts.append(encode_document(d.text, tokenizer, 0.0, None, vocab_size, d.name).tokens)
    stream = np.concatenate(parts)
    n_targets = len(stream) - 1
    n_rows = -(-n_targets // seq_len)
    n_batches = -(-n_rows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))
    total = n_batches * batch_size * seq_len + 1
    padded = np.full(max(total, len(stream)), tokenizer.pad_id, np.int32)
    padded[:len(stream)] = stream
    valid = np.zeros(len(padded) - 1, bool)
    valid[:n_targets] = True
    byte_lengths = np.asarray(tokenizer.byte_lengths, np.int32)
    local = batch_size // shard_count
    batches = []
    for k in range(n_batches):
        rows = np.arange(k * batch_size + shard_index * local, k * batch_size + (shard_index + 1) * local)
        starts = rows * seq_len
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        tokens = padded[idx]
        mask = valid[idx[:, :-1]]
        tb = np.where(mask, byte_lengths[tokens[:, 1:]], 0).sum(axis=1, dtype=np.int64).astype(np.int32)
        batches.append({"tokens": tokens, "mask": mask, "target_bytes": tb})
    return batches
