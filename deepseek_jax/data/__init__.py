"""Data: corpora (the built-in pinned corpus, the running interpreter's stdlib, user files/JSONL), tokenizers
(byte-level, HF), packing + FIM on grain.

    from deepseek_jax.data import load_corpus, split, fingerprint, get_tokenizer, make_train_iterator
    docs = load_corpus("default")                      # pinned snapshot: CPython 3.11.7 stdlib + pydoc topics
    train_docs, val_docs = split(docs, 0.05)
    tok = get_tokenizer("byte")                        # or a path to a Hugging Face tokenizer.json
    it = make_train_iterator(train_docs, tok, seq_len=256, batch_size=8, seed=0, fim_rate=0.1)
    batch = next(it)                                   # {"tokens": int32 [8, 257], "target_bytes": int32 [8]}
    state = it.get_state()                             # small JSON dict; it.set_state(state) resumes exactly
    evals = make_eval_batches(val_docs, tok, 256, 8)   # + "mask" [B, T]; every validation token once

Details: corpus.py (corpus contents, split, fingerprint), tokenizer.py (byte lengths for bits per byte),
pipeline.py (FIM, packing, state, evaluation layout).
"""
from deepseek_jax.data.corpus import (
    Document,
    builtin_corpus,
    corpus_source,
    default_corpus,
    describe,
    fingerprint,
    load_corpus,
    split,
    stdlib_corpus,
    total_bytes,
)
from deepseek_jax.data.pipeline import (
    PackedBatchIterator,
    PackedDataset,
    document_stream,
    encode_document,
    make_eval_batches,
    make_train_iterator,
)
from deepseek_jax.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = [
    "Document",
    "builtin_corpus",
    "corpus_source",
    "default_corpus",
    "describe",
    "fingerprint",
    "load_corpus",
    "split",
    "stdlib_corpus",
    "total_bytes",
    "ByteTokenizer",
    "HFTokenizer",
    "get_tokenizer",
    "PackedBatchIterator",
    "PackedDataset",
    "document_stream",
    "encode_document",
    "make_eval_batches",
    "make_train_iterator",
]
