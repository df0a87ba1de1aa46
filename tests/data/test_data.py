"""Data: built-in and stdlib corpora, user corpora, split, fingerprint, tokenizers, FIM, packing, resume,
evaluation batches."""
import lzma
import json
import os

import numpy as np
import pytest

from deepseek_jax.data import corpus as C
from deepseek_jax.data import pipeline as P
from deepseek_jax.data.corpus import Document
from deepseek_jax.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer

BYTE = ByteTokenizer()


def _docs(n, seed=0, min_len=1, max_len=60):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh ijk\n") + ["é", "ß", "中", "😀"]
    return [Document(f"doc{i:04d}", "".join(rng.choice(alphabet, size=int(rng.integers(min_len, max_len)))))
            for i in range(n)]


# ----------------------------------------------------------------------------------------------- corpus


# The pinned built-in corpus v1, written out here independently of corpus.py's constants: changing the
# snapshot (or the constants) must fail this test, on every interpreter (CI runs it on Python 3.11 and 3.12).
V1_FINGERPRINT = "0b20cf651a0c1ff701155f8ab652200e3ed2bc4c3106abdcf36284a6ede2d5f0"
CPYTHON_3_11_7_LIB = os.path.join(os.path.expanduser(os.environ.get("PYENV_ROOT", "~/.pyenv")), "versions", "3.11.7",
                                  "lib", "python3.11")


@pytest.fixture(scope="module")
def builtin():
    return C.builtin_corpus()


def test_builtin_corpus_is_pinned(builtin):
    assert C.fingerprint(builtin) == V1_FINGERPRINT == C.BUILTIN_FINGERPRINT
    assert len(builtin) == 745 and C.total_bytes(builtin) == 10_591_105
    assert C.load_corpus("default") == builtin and C.default_corpus() == builtin
    names = [d.name for d in builtin]
    code = [n for n in names if n.startswith("stdlib/")]
    assert names[:len(code)] == code == sorted(code) and len(code) == 666  # code first, by path, then prose
    assert names[len(code):] == sorted(names[len(code):]) and all(n.startswith("pydoc_data/topics/")
                                                                 for n in names[len(code):])
    assert "stdlib/os.py" in code and "stdlib/json/decoder.py" in code
    assert "def makedirs(name, mode=0o777, exist_ok=False):" in builtin[names.index("stdlib/os.py")].text
    # A prefix of the same order, as for the stdlib corpus.
    assert C.builtin_corpus(max_docs=10) == builtin[:10]
    assert C.builtin_corpus(max_bytes=C.total_bytes(builtin[:5]) + 1) == builtin[:5]
    d = C.describe(builtin, "default")
    assert d["fingerprint"] == V1_FINGERPRINT and "built-in corpus v1" in d["source"]
    with pytest.raises(ValueError, match="max_docs"):
        C.builtin_corpus(max_docs=0)


@pytest.mark.skipif(not os.path.isfile(os.path.join(CPYTHON_3_11_7_LIB, "os.py")),
                    reason=f"CPython 3.11.7's standard library not found at {CPYTHON_3_11_7_LIB}")
def test_builtin_corpus_is_the_stdlib_corpus_of_cpython_3_11_7(builtin):
    # The independent reference: the stdlib rules applied to the source the snapshot documents (read as files, so
    # this runs on any interpreter). Also what make_builtin_corpus checks before writing.
    assert C.stdlib_corpus(root=CPYTHON_3_11_7_LIB) == builtin


def _rewrite_xz(src, dst, edit):
    raw = bytearray(lzma.decompress(open(src, "rb").read()))
    edit(raw)
    with open(dst, "wb") as fh:
        fh.write(lzma.compress(bytes(raw), format=lzma.FORMAT_XZ))


def test_corrupt_snapshot_raises_naming_the_file(tmp_path):
    src = C.BUILTIN_FILE
    blob = open(src, "rb").read()
    flipped = tmp_path / "flipped.jsonl.xz"  # one byte of the compressed stream: bad data or CRC
    b = bytearray(blob)
    b[len(b) // 2] ^= 0x55
    flipped.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=f"{flipped}.*corrupt"):
        C.builtin_corpus(path=str(flipped))
    truncated = tmp_path / "truncated.jsonl.xz"
    truncated.write_bytes(blob[:len(blob) // 3])
    with pytest.raises(ValueError, match=f"{truncated}.*corrupt"):
        C.builtin_corpus(path=str(truncated))
    # Valid xz and JSON, one character of one document changed: only the fingerprint can tell.
    edited = tmp_path / "edited.jsonl.xz"
    _rewrite_xz(src, edited, lambda raw: raw.__setitem__(raw.index(b"def makedirs("), ord("D")))
    assert len(C.read_snapshot(str(edited))) == 745
    with pytest.raises(ValueError, match=f"{edited}: fingerprint .* != the pinned 0b20cf651a0c1ff7"):
        C.builtin_corpus(path=str(edited))
    # A line that is not a document.
    badline = tmp_path / "badline.jsonl.xz"
    _rewrite_xz(src, badline, lambda raw: raw.__setitem__(slice(0, 1), b"["))
    with pytest.raises(ValueError, match=f"{badline}.*line 1"):
        C.builtin_corpus(path=str(badline))
    with pytest.raises(ValueError, match="does not exist"):
        C.builtin_corpus(path=str(tmp_path / "missing.jsonl.xz"))


def test_snapshot_round_trip(tmp_path):
    docs = _docs(30, seed=3) + [Document("quote\"and\nnewline", "line\n\u2028sep\r\n\x00end")]
    p = tmp_path / "s.jsonl.xz"
    C.write_snapshot(docs, str(p))
    assert C.read_snapshot(str(p)) == docs
    first = p.read_bytes()
    C.write_snapshot(docs, str(p))
    assert p.read_bytes() == first  # no timestamp in the file


def test_stdlib_corpus_deterministic_and_nontrivial():
    a = C.stdlib_corpus(max_docs=40)
    b = C.stdlib_corpus(max_docs=40)
    assert a == b and C.fingerprint(a) == C.fingerprint(b)
    assert len(a) == 40 and C.total_bytes(a) > 100_000
    names = [d.name for d in a]
    assert names == sorted(names) and all(n.startswith("stdlib/") for n in names)
    assert len(set(names)) == len(names)
    # A prefix of the same order.
    assert C.stdlib_corpus(max_docs=10) == a[:10]
    cap = C.total_bytes(a[:5]) + 1
    assert C.stdlib_corpus(max_bytes=cap) == a[:5]
    assert C.load_corpus("stdlib", max_docs=40) == a
    d = C.describe(a, "stdlib")
    assert d["num_docs"] == 40 and d["fingerprint"] == C.fingerprint(a) and d["python_version"]
    assert "running interpreter" in d["source"]
    json.dumps(d)


def test_stdlib_corpus_full_listing():
    files = C.stdlib_corpus_files()
    assert len(files) > 300, len(files)  # CPython 3.11: 731
    assert files == sorted(files)
    for f in files:
        parts = f.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), f
        assert not parts[-1].startswith("_sysconfigdata_")
    assert "pydoc_data/topics.py" not in files
    assert "os.py" in files and "json/decoder.py" in files
    docs = C.stdlib_corpus()
    code = [d for d in docs if d.name.startswith("stdlib/")]
    assert [d.name for d in docs[:len(code)]] == [d.name for d in code]  # code first, then prose
    assert len(code) > 300 and C.total_bytes(code) > 5_000_000
    assert not any("gencodec.py" in d.text[:400] for d in code)
    assert "stdlib/encodings/utf_8.py" in {d.name for d in code}
    prose = C._prose_documents()
    assert docs[len(code):] == prose
    assert len(prose) > 20 and [p.name for p in prose] == sorted(p.name for p in prose)
    # The topics are read from the file as a literal; the imported module is the reference.
    from pydoc_data import topics
    assert {p.name: p.text for p in prose} == {f"pydoc_data/topics/{k}": v for k, v in topics.topics.items()}


def test_fingerprint_sensitive_and_unambiguous():
    a = [Document("a", "xy"), Document("b", "z")]
    assert C.fingerprint(a) == C.fingerprint(list(a))
    assert C.fingerprint(a) != C.fingerprint([Document("a", "x"), Document("b", "yz")])
    assert C.fingerprint(a) != C.fingerprint(a[::-1])
    assert C.fingerprint(a) != C.fingerprint([Document("a", "xy"), Document("c", "z")])
    assert len(C.fingerprint(a)) == 64


def test_split_disjoint_deterministic_stable():
    docs = _docs(400)
    tr, va = C.split(docs, 0.1)
    assert {d.name for d in tr}.isdisjoint(d.name for d in va)
    assert len(tr) + len(va) == len(docs) and 20 < len(va) < 70
    assert C.split(docs, 0.1) == (tr, va)
    # Order kept inside each part.
    idx = {d.name: i for i, d in enumerate(docs)}
    assert [idx[d.name] for d in va] == sorted(idx[d.name] for d in va)
    # Adding documents does not move any existing document.
    more = docs + [Document(f"new{i}", "t") for i in range(50)]
    tr2, va2 = C.split(more, 0.1)
    old = {d.name for d in docs}
    assert [d for d in va2 if d.name in old] == va and [d for d in tr2 if d.name in old] == tr
    # Tiny corpus: validation never silently empty; fraction 0 gives none.
    small = [Document("only-a", "x"), Document("only-b", "y")]
    assert len(C.split(small, 0.01)[1]) == 1
    assert C.split(docs, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        C.split(docs, 1.0)


def test_user_corpus_glob_and_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second ü", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.md").write_text("no", encoding="utf-8")
    docs = C.load_corpus(str(tmp_path / "**" / "*.txt"))
    assert [d.text for d in docs] == ["first", "second ü", "third"]
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    one = C.load_corpus(str(tmp_path / "a.txt"))
    assert one == [Document(str(tmp_path / "a.txt"), "first")]
    assert C.load_corpus(str(tmp_path / "*.txt"), max_docs=1) == docs[:1]


def test_user_corpus_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [{"text": "hello", "body": "B1"}, {"text": "wörld", "body": "B2"}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    docs = C.load_corpus(str(p))
    assert [d.text for d in docs] == ["hello", "wörld"] and docs[1].name == f"{p}:2"
    assert [d.text for d in C.load_corpus(f"{p}:body")] == ["B1", "B2"]
    with pytest.raises(ValueError, match="'missing'"):
        C.load_corpus(f"{p}:missing")


def test_user_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.txt"):
        C.load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="matches no files"):
        C.load_corpus(str(tmp_path / "*.zzz"))
    with pytest.raises(ValueError, match="nope.jsonl"):
        C.load_corpus(str(tmp_path / "nope.jsonl:text"))
    with pytest.raises(ValueError, match="directory"):
        C.load_corpus(str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        C.load_corpus(str(bad))
    num = tmp_path / "num.jsonl"
    num.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="'text' is int"):
        C.load_corpus(str(num))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.txt"):
        C.load_corpus(str(binary))


# -------------------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip_and_byte_length():
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 261 and (tok.eos_id, tok.pad_id) == (256, 257)
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id) == (258, 259, 260)
    text = "def f(x):\n    return 'héllo wörld — 中文 😀'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.byte_length(ids) == len(text.encode("utf-8")) == len(ids)
    with_specials = np.concatenate([[tok.FIM_PREFIX], ids, [tok.EOS, tok.PAD]])
    assert tok.decode(with_specials) == text
    assert tok.decode(with_specials, render_specials=True) == "<|fim_prefix|>" + text + "<|eos|><|pad|>"
    assert tok.byte_length(with_specials) == len(text.encode("utf-8"))
    assert tok.byte_lengths[with_specials].sum() == tok.byte_length(with_specials)
    # A split inside a multi-byte character decodes with replacement, never raises.
    assert "\ufffd" in tok.decode(tok.encode("中")[:2])
    assert tok.encode("") .shape == (0,)


def _train_hf_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|pad|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(["def hello(world):\n    return world + 1\n", "héllo wörld 中文"] * 20, trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_round_trip_byte_length_and_fim(tmp_path):
    path = _train_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = get_tokenizer(str(tmp_path))  # a directory holding tokenizer.json works too
    assert isinstance(tok, HFTokenizer) and tok.byte_level
    assert tok.eos_id is not None and tok.pad_id != tok.eos_id
    assert None not in (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id)
    for text in ["def hello(world):\n    return 42 — ünïcode 中文 😀", "", "x"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert tok.decode(ids) == text
        assert tok.byte_length(ids) == len(text.encode("utf-8"))
    # The EOS string inside a document is text, not the EOS token.
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eos_id not in ids.tolist() and tok.byte_length(ids) == len("a<|endoftext|>b")
    assert tok.byte_length([tok.eos_id, tok.pad_id]) == 0
    enc = P.encode_document("def hello(world): pass", tok, fim_rate=1.0, rng_key=(0, 0, 3))
    assert enc.fim and enc.tokens[0] == tok.fim_prefix_id and enc.tokens[-1] == tok.eos_id
    with pytest.raises(ValueError, match="eos"):
        HFTokenizer(path, eos="<nope>")
    with pytest.raises(ValueError, match="not a file"):
        get_tokenizer(str(tmp_path / "missing.json"))


def test_token_ids_checked_against_vocab():
    docs = _docs(5)
    with pytest.raises(ValueError, match=r"'byte'.*outside the vocabulary \[0, 200\)"):
        P.encode_document("é", BYTE, vocab_size=200, name="d")
    with pytest.raises(ValueError, match="eos_id=256 is outside"):
        P.make_train_iterator(docs, BYTE, 8, 2, vocab_size=256)
    it = P.make_train_iterator(docs, BYTE, 8, 2, fim_rate=0.0, vocab_size=258)  # EOS and PAD fit; FIM unused
    next(it)
    with pytest.raises(ValueError, match="fim_prefix_id"):
        P.make_train_iterator(docs, BYTE, 8, 2, fim_rate=0.1, vocab_size=258)


# -------------------------------------------------------------------------------------------------- FIM


def _check_fim_structure(tok, text, ids):
    ids = ids.tolist()
    assert ids[0] == tok.fim_prefix_id and ids[-1] == tok.eos_id
    assert ids.count(tok.fim_prefix_id) == ids.count(tok.fim_suffix_id) == ids.count(tok.fim_middle_id) == 1
    s, m = ids.index(tok.fim_suffix_id), ids.index(tok.fim_middle_id)
    assert 0 < s < m < len(ids) - 1
    prefix, suffix, middle = ids[1:s], ids[s + 1:m], ids[m + 1:-1]
    assert tok.decode(prefix) + tok.decode(middle) + tok.decode(suffix) == text


def test_fim_rate_one_every_document_psm_and_exact():
    docs = _docs(200, min_len=0)
    stream = P.document_stream(docs, BYTE, seed=3, fim_rate=1.0)
    n = len(docs)
    by_name = {d.name: d.text for d in docs}
    seen = set()
    for p in range(2 * n):  # two epochs: different split points, same guarantees
        enc = stream[p]
        assert enc.fim
        _check_fim_structure(BYTE, by_name[enc.name], enc.tokens)
        seen.add((p // n, enc.name))
    assert len(seen) == 2 * n  # each epoch is a permutation of the corpus
    # Split points uniform over character positions: E[min of two uniforms] = 1/3, E[max] = 2/3.
    long_doc = [Document("long", "abcdefghij" * 10)]
    st = P.document_stream(long_doc, BYTE, seed=0, fim_rate=1.0)
    fr = []
    for p in range(600):
        t = st[p].tokens.tolist()
        s_, m_ = t.index(BYTE.FIM_SUFFIX), t.index(BYTE.FIM_MIDDLE)
        fr.append(((s_ - 1) / 100, (s_ - 1 + len(t) - 2 - m_) / 100))  # prefix length, prefix + middle
    fr = np.array(fr)
    assert abs(fr[:, 0].mean() - 1 / 3) < 0.04 and abs(fr[:, 1].mean() - 2 / 3) < 0.04, fr.mean(0)
    # Deterministic: a fresh stream gives the same tokens.
    again = P.document_stream(docs, BYTE, seed=3, fim_rate=1.0)
    assert all(np.array_equal(again[p].tokens, stream[p].tokens) for p in (0, 7, n + 5))


def test_fim_rate_zero_and_point_one():
    docs = _docs(100, max_len=20)
    s0 = P.document_stream(docs, BYTE, seed=0, fim_rate=0.0)
    for p in range(100):
        enc = s0[p]
        assert not enc.fim and enc.tokens.max() <= BYTE.EOS and enc.tokens[-1] == BYTE.EOS
        assert np.count_nonzero(enc.tokens == BYTE.EOS) == 1
    s1 = P.document_stream(docs, BYTE, seed=0, fim_rate=0.1)
    flags = np.array([s1[p].fim for p in range(3000)])
    assert abs(flags.mean() - 0.1) < 0.02, flags.mean()
    # The FIM decision is per (seed, epoch, index): it varies across epochs for the same document.
    assert len({tuple(flags[e * 100:(e + 1) * 100]) for e in range(4)}) > 1


def _splitmix64_py(x):
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_keyed_hash_matches_pure_python_and_orders_differ_by_seed():
    key, counters = (5, 2, 99), [0, 1, 2**40 + 3]
    h = 0
    for w in key:
        h = _splitmix64_py(h ^ w)
    expected = [_splitmix64_py(h ^ c) for c in counters]
    assert [int(v) for v in P.keyed_uint64(key, np.array(counters, np.uint64))] == expected
    # Unlike grain's shuffle (seed + epoch), seed 0 / epoch 1 is not seed 1 / epoch 0.
    src = [Document(str(i), "x") for i in range(200)]
    import grain.python as grain

    a = P.EpochShuffle(grain.MapDataset.source(src), seed=0)
    b = P.EpochShuffle(grain.MapDataset.source(src), seed=1)
    assert sorted(a.permutation(1).tolist()) == list(range(200))
    assert not np.array_equal(a.permutation(1), b.permutation(0))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert a[200 + 5][:2] == (1, int(a.permutation(1)[5]))


# ---------------------------------------------------------------------------------------------- packing


def test_packing_reproduces_stream_shapes_dtype():
    docs = _docs(120, max_len=8)
    seq, bs = 32, 4
    it = P.make_train_iterator(docs, BYTE, seq, bs, seed=1, fim_rate=0.0)
    batches = [next(it) for _ in range(16)]
    for b in batches:
        assert b["tokens"].shape == (bs, seq + 1) and b["tokens"].dtype == np.int32
        assert b["target_bytes"].shape == (bs,) and b["target_bytes"].dtype == np.int32
        np.testing.assert_array_equal(b["target_bytes"], (b["tokens"][:, 1:] < 256).sum(1))
    rows = np.concatenate([b["tokens"] for b in batches])
    for r in range(1, len(rows)):  # consecutive rows overlap by exactly one token
        assert rows[r][0] == rows[r - 1][-1]
    packed = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])
    assert len(packed) == 16 * bs * seq + 1
    stream = P.document_stream(docs, BYTE, seed=1, fim_rate=0.0)
    parts, n, p = [], 0, 0
    while n < len(packed):
        parts.append(stream[p].tokens)
        n, p = n + len(parts[-1]), p + 1
    np.testing.assert_array_equal(packed, np.concatenate(parts)[:len(packed)])
    # Independent check: EOS separates the documents, and the first epoch visits every document once, shuffled.
    pieces = BYTE.decode(packed, render_specials=True).split("<|eos|>")
    assert len(pieces) > len(docs) + 1
    assert sorted(pieces[:len(docs)]) == sorted(d.text for d in docs)
    assert pieces[:len(docs)] != [d.text for d in docs]


def test_shards_partition_the_global_batch():
    docs = _docs(100)
    full = P.make_train_iterator(docs, BYTE, 8, 6, seed=2, fim_rate=0.5)
    shards = [P.make_train_iterator(docs, BYTE, 8, 6, seed=2, fim_rate=0.5, shard_index=i, shard_count=3)
              for i in range(3)]
    for _ in range(4):
        g = next(full)
        parts = [next(s) for s in shards]
        assert all(p["tokens"].shape == (2, 9) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), g["tokens"])
        np.testing.assert_array_equal(np.concatenate([p["target_bytes"] for p in parts]), g["target_bytes"])
    with pytest.raises(ValueError, match="multiple of shard_count"):
        P.make_train_iterator(docs, BYTE, 8, 5, shard_count=2, shard_index=1)


def test_iterator_resume_bitwise():
    docs = _docs(100, max_len=200)  # documents longer than a row: states fall inside documents
    make = lambda: P.make_train_iterator(docs, BYTE, 32, 3, seed=7, fim_rate=0.3)  # noqa: E731
    it = make()
    batches, state = [], None
    for k in range(7):
        batches.append(next(it))
        if k == 2:
            state = json.loads(json.dumps(it.get_state()))  # survives JSON
    fresh = make()
    fresh.set_state(state)
    for k in range(3, 7):
        b = next(fresh)
        np.testing.assert_array_equal(b["tokens"], batches[k]["tokens"])
        np.testing.assert_array_equal(b["target_bytes"], batches[k]["target_bytes"])
    assert fresh.get_state() == it.get_state()
    # A state from other data or settings is refused.
    other = P.make_train_iterator(docs, BYTE, 32, 3, seed=8, fim_rate=0.3)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)
    with pytest.raises(ValueError, match="num_docs"):
        P.make_train_iterator(docs[:-1], BYTE, 32, 3, seed=7, fim_rate=0.3).set_state(state)
    fp = P.make_train_iterator(docs, BYTE, 32, 3, seed=7, fim_rate=0.3, corpus_fingerprint=C.fingerprint(docs))
    next(fp)
    st = fp.get_state()
    changed = docs[:-1] + [Document(docs[-1].name, "changed")]
    with pytest.raises(ValueError, match="corpus_fingerprint"):
        P.make_train_iterator(changed, BYTE, 32, 3, seed=7, fim_rate=0.3,
                              corpus_fingerprint=C.fingerprint(changed)).set_state(st)


def test_iterator_resume_across_epochs():
    docs = _docs(100, max_len=8)  # about 10 batches per epoch below
    make = lambda: P.make_train_iterator(docs, BYTE, 32, 3, seed=4, fim_rate=0.5)  # noqa: E731
    it = make()
    states, batches = [], []
    for _ in range(25):
        states.append(it.get_state())
        batches.append(next(it)["tokens"])
    assert it.get_state()["doc"] > 2 * len(docs)
    for k in (0, 9, 13, 21):
        fresh = make()
        fresh.set_state(states[k])
        for j in range(k, 25):
            np.testing.assert_array_equal(next(fresh)["tokens"], batches[j])


def test_batch_size_change_keeps_row_stream():
    docs = _docs(100)
    a = P.make_train_iterator(docs, BYTE, 8, 4, seed=0, fim_rate=0.0)
    b = P.make_train_iterator(docs, BYTE, 8, 2, seed=0, fim_rate=0.0)
    rows_a = np.concatenate([next(a)["tokens"], a.next_batch(8)["tokens"]])
    rows_b = np.concatenate([next(b)["tokens"] for _ in range(6)])
    np.testing.assert_array_equal(rows_a, rows_b)
    assert a.get_state()["rows"] == 12


# ------------------------------------------------------------------------------------------------- eval


def test_eval_batches_cover_every_token_once():
    docs = _docs(23, max_len=50)
    seq, bs = 16, 4
    batches = P.make_eval_batches(docs, BYTE, seq, bs)
    expected = np.concatenate([np.append(BYTE.encode(d.text), BYTE.EOS) for d in docs])
    targets, n_pad_rows = [], 0
    for b in batches:
        assert b["tokens"].shape == (bs, seq + 1) and b["tokens"].dtype == np.int32
        assert b["mask"].shape == (bs, seq) and b["mask"].dtype == bool
        assert np.all(b["tokens"][:, 1:][~b["mask"]] == BYTE.PAD)
        targets.append(b["tokens"][:, 1:][b["mask"]])
        np.testing.assert_array_equal(b["target_bytes"], (b["tokens"][:, 1:] < 256).sum(1))
        n_pad_rows += int((~b["mask"].any(1)).sum())
    np.testing.assert_array_equal(np.concatenate(targets), expected)
    assert batches[0]["tokens"][0, 0] == BYTE.EOS
    assert sum(int(b["target_bytes"].sum()) for b in batches) == C.total_bytes(docs)
    assert not batches[-1]["mask"].all() and n_pad_rows < bs
    # Deterministic, truncatable, shardable.
    again = P.make_eval_batches(docs, BYTE, seq, bs)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(batches, again))
    assert len(P.make_eval_batches(docs, BYTE, seq, bs, max_batches=2)) == 2
    halves = [P.make_eval_batches(docs, BYTE, seq, bs, shard_index=i, shard_count=2) for i in range(2)]
    for k, b in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([h[k]["tokens"] for h in halves]), b["tokens"])
        np.testing.assert_array_equal(np.concatenate([h[k]["mask"] for h in halves]), b["mask"])
    with pytest.raises(ValueError, match="no validation documents"):
        P.make_eval_batches([], BYTE, seq, bs)


def test_builtin_corpus_end_to_end_small():
    docs = C.builtin_corpus(max_docs=20)
    tr, va = C.split(docs, 0.2)
    assert tr and va
    it = P.make_train_iterator(tr, BYTE, 64, 2, seed=0, fim_rate=0.1)
    b = next(it)
    assert b["tokens"].shape == (2, 65) and int(b["tokens"].max()) < BYTE.vocab_size
    ev = P.make_eval_batches(va, BYTE, 64, 2, max_batches=3)
    assert len(ev) <= 3


def test_one_document_corpus_is_split_by_bytes(tmp_path):
    """A single text file used to give no validation documents (the run could not start)."""
    text = "def f(x):\n    return x  # é\n" * 40
    doc = Document("one.py", text)
    tr, va = C.split([doc], 0.1)
    raw = text.encode()
    n_val = len(va[0].text.encode())
    assert [d.name for d in tr] == ["one.py#train"] and [d.name for d in va] == ["one.py#val"]
    assert tr[0].text + va[0].text == text and abs(n_val - round(0.1 * len(raw))) <= 1  # é is 2 bytes
    assert C.split([doc], 0.0) == ([doc], [])


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"corpus: .*empty.txt' holds no text \(1 documents, 0 bytes\)"):
        C.load_corpus(str(tmp_path / "empty.txt"))
