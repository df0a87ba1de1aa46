"""Corpora: the built-in default corpus, user corpora, the validation split and the corpus fingerprint.

A corpus is a list of `Document(name, text)` in a fixed order. Everything downstream (split, shuffle, FIM,
packing) is a deterministic function of that list and a seed, and `fingerprint(docs)` identifies it, so a run
that records (corpus spec, fingerprint, seed) can be reproduced and a resumed run can check it reads the same data.

Built-in corpus (`builtin_corpus()`, spec "default"): a pinned snapshot
---------------------------------------------------------------------
Needs no download and is the same on every interpreter and machine: the documents are stored in the package,
`deepseek_jax/data/builtin_corpus_v1.jsonl.xz` (xz of one JSON object `{"name", "text"}` per line, 1.9 MB;
10.6 MB of text), and `builtin_corpus()` checks their fingerprint against `BUILTIN_FINGERPRINT` on every load: a
corrupt, truncated or edited file raises `ValueError` naming the file. Version v1 is the standard-library corpus
below built from the sources of CPython 3.11.7 (745 documents: 666 code files, 10.1 MB, then 79 prose documents,
0.47 MB; fingerprint 0b20cf65...), made by `python -m deepseek_jax.data.make_builtin_corpus` (its docstring says
how). The Python Software Foundation License of that source is shipped beside it
(`builtin_corpus_v1.LICENSE`). A snapshot is never changed in place: different documents would be a new file and
version with its own fingerprint.

Standard-library corpus (`stdlib_corpus()`, spec "stdlib")
--------------------------------------------------------
The same rules applied to the running interpreter's own standard library (or to a given `Lib/` directory,
`stdlib_corpus(root=...)`).

1. Code: every `.py` file under the standard-library directory (`sysconfig.get_paths()["stdlib"]` by default),
   named `stdlib/<path relative to that directory, '/'-separated>`, in sorted order of that name. Excluded, so
   that the corpus does not depend on what else is installed on the machine nor on how the interpreter was built:

   - `site-packages/`, `dist-packages/` (third-party packages: differ per machine);
   - `lib-dynload/` (extension modules) and top-level `config-*/` (build files with machine paths);
   - `_sysconfigdata_*.py` (the build configuration: compiler flags and paths of the build machine);
   - every directory named `test`, `tests` or `idle_test` at any depth (the regression suite `test/`,
     `unittest/test`, `tkinter/test`, `ctypes/test`, `distutils/tests`, `lib2to3/tests`, `idlelib/idle_test`,
     ...): the suite is large and repetitive, contains deliberately mis-encoded files, and some distributions
     leave it out; also every `__pycache__`;
   - `pydoc_data/topics.py`, whose content enters as prose below (it would otherwise appear twice);
   - machine-generated data tables: files whose first 400 characters say they were generated "with
     gencodec.py" (the 65 single-byte codec tables `encodings/cp1252.py` etc. on 3.11, 1.2 MB: 256-line
     mapping tables around identical boilerplate, which would put near-duplicates into both the training and
     the validation split and flatter validation BPB).

   Files are read as bytes and decoded as strict UTF-8 (all such stdlib files are UTF-8; a file that is not
   raises rather than being skipped silently, so the corpus never shrinks without notice).
2. Prose: the entries of the `topics` dict in `pydoc_data/topics.py` (the language reference sections that
   `help()` shows), one document per key, named `pydoc_data/topics/<key>`, in sorted key order, after all code
   documents.

The order is therefore "all code by path, then all prose by key"; `max_docs` / `max_bytes` keep a prefix of
that order (`max_bytes` stops before the first document that would take the UTF-8 total above it), so a small
truncated corpus is code only (the same holds for the built-in snapshot, which has the same order).

**Python-version dependence.** The stdlib corpus is whatever the running interpreter ships: it differs between
Python versions (CPython 3.12.1 gives fingerprint 698e21a0..., not 3.11.7's 0b20cf65...; even patch releases
change a few files) and between distributions that split or patch the standard library (e.g. Debian moves some
modules into separate packages). Two machines with the same fingerprint read bitwise the same documents. Use it
only on purpose; record `describe(docs)` (it includes the Python version) with every run.

User corpora (`load_corpus(spec)`)
----------------------------------
- `"default"`: the built-in snapshot above (the same documents on every interpreter).
- `"stdlib"`: the running interpreter's standard-library corpus.
- `"path/to/file.jsonl"` or `"path/to/file.jsonl:field"`: one JSON object per non-empty line, the document
  text in `field` (default `"text"`); documents are named `<path>:<line number>`.
- anything else: a file path or a glob (`**` recursive) of UTF-8 text files, sorted by path; each file is one
  document named by its path as matched.
A missing file, a glob that matches nothing, a directory, a bad JSON line, a missing or non-string field or a
file that is not UTF-8 raise `ValueError` naming the path (and line / field).

Validation split (`split(docs, val_fraction)`)
----------------------------------------------
A document goes to validation when the first 8 bytes of sha256(name), read as a fraction of 2**64, fall below
`val_fraction`. The assignment of a document depends on its name only, so adding or removing documents never
moves any other document between train and validation, and order is preserved inside each part.
"""
from __future__ import annotations

import ast
import dataclasses
import glob as _glob
import lzma
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterable, Sequence

__all__ = [
    "Document",
    "BUILTIN_VERSION",
    "BUILTIN_FILE",
    "BUILTIN_FINGERPRINT",
    "builtin_corpus",
    "default_corpus",
    "stdlib_corpus",
    "stdlib_corpus_files",
    "read_snapshot",
    "write_snapshot",
    "load_corpus",
    "corpus_source",
    "split",
    "fingerprint",
    "total_bytes",
    "describe",
]


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: a stable name (used for the split hash and the fingerprint) and its text."""

    name: str
    text: str


# ---------------------------------------------------------------------------- the built-in (pinned) corpus

BUILTIN_VERSION = "v1"
BUILTIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_corpus_v1.jsonl.xz")
BUILTIN_SOURCE = "CPython 3.11.7 standard library (Lib/), stdlib-corpus rules of deepseek_jax/data/corpus.py"
BUILTIN_FINGERPRINT = "0b20cf651a0c1ff701155f8ab652200e3ed2bc4c3106abdcf36284a6ede2d5f0"
BUILTIN_NUM_DOCS = 745
BUILTIN_NUM_BYTES = 10_591_105


def write_snapshot(docs: Sequence[Document], path: str) -> None:
    """Write documents as xz-compressed JSONL, one {"name", "text"} object per line (xz stores no name or mtime,
    so the file depends only on the documents and the liblzma build)."""
    lines = b"".join(json.dumps({"name": d.name, "text": d.text}, ensure_ascii=False, sort_keys=True)
                     .encode("utf-8") + b"\n" for d in docs)
    with open(path, "wb") as fh:
        fh.write(lzma.compress(lines, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME))


def read_snapshot(path: str) -> list[Document]:
    """The documents of a file written by `write_snapshot`; ValueError naming the file if it is missing or
    unreadable (bad xz data or CRC, truncated, not UTF-8 JSON lines, a line without string name/text)."""
    if not os.path.isfile(path):
        raise ValueError(f"corpus snapshot {path} does not exist (a deepseek_jax install without its package data?)")
    try:
        with open(path, "rb") as fh:
            raw = lzma.decompress(fh.read(), format=lzma.FORMAT_XZ)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(f"corpus snapshot {path} is corrupt: not a valid xz file ({e})") from e
    lines = raw.split(b"\n")
    if lines[-1] == b"":  # the final newline
        lines.pop()
    docs = []
    for lineno, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corpus snapshot {path} is corrupt: line {lineno} is not UTF-8 JSON ({e})") from e
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("text"), str)):
            raise ValueError(f"corpus snapshot {path} is corrupt: line {lineno} is not a {{name, text}} object")
        docs.append(Document(obj["name"], obj["text"]))
    return docs


def builtin_corpus(max_docs: int | None = None, max_bytes: int | None = None, *, path: str = BUILTIN_FILE,
                   expected_fingerprint: str = BUILTIN_FINGERPRINT) -> list[Document]:
    """The built-in corpus (module docstring): the pinned snapshot, its fingerprint checked at every load.

    `max_docs` / `max_bytes`: a prefix, as in `stdlib_corpus`. `path` / `expected_fingerprint` exist for the
    tests of the check; callers leave them alone.
    """
    _check_limits("builtin_corpus", max_docs, max_bytes)
    docs = read_snapshot(path)
    got = fingerprint(docs)
    if got != expected_fingerprint:
        raise ValueError(f"corpus snapshot {path}: fingerprint {got[:16]}... != the pinned "
                         f"{expected_fingerprint[:16]}... of built-in corpus {BUILTIN_VERSION}: the file was "
                         f"modified or damaged; reinstall deepseek_jax or rebuild it "
                         f"(python -m deepseek_jax.data.make_builtin_corpus)")
    return _truncate(docs, max_docs, max_bytes)


def default_corpus(max_docs: int | None = None, max_bytes: int | None = None) -> list[Document]:
    """The corpus of spec "default": `builtin_corpus` (the pinned snapshot)."""
    return builtin_corpus(max_docs=max_docs, max_bytes=max_bytes)


# ------------------------------------------------------------------- the standard-library corpus (rules)

_EXCLUDED_DIRS_ANYWHERE = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
_EXCLUDED_TOP_DIRS = frozenset({"lib-dynload"})
_EXCLUDED_FILES = frozenset({"pydoc_data/topics.py"})
_GENERATED_MARKERS = ("with gencodec.py",)


def _is_generated(text: str) -> bool:
    head = text[:400]
    return any(m in head for m in _GENERATED_MARKERS)


def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_corpus_files(root: str | None = None) -> list[str]:
    """Relative ('/'-separated, sorted) paths of the `.py` files the stdlib corpus reads under `root` (default:
    the running interpreter's standard library).

    (Path rules only; `stdlib_corpus` further drops the generated files, which needs their content.)
    """
    root = _stdlib_root() if root is None else root
    if not os.path.isdir(root):
        raise ValueError(f"stdlib corpus: the standard-library directory {root!r} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        top = rel_dir == "."
        # Prune in place so os.walk does not descend into excluded trees (the test suite is large).
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _EXCLUDED_DIRS_ANYWHERE
            and not (top and (d in _EXCLUDED_TOP_DIRS or d.startswith("config-")))
        ]
        for f in filenames:
            if not f.endswith(".py") or f.startswith("_sysconfigdata_"):
                continue
            rel = f if top else os.path.join(rel_dir, f)
            rel = rel.replace(os.sep, "/")
            if rel in _EXCLUDED_FILES:
                continue
            out.append(rel)
    out.sort()
    return out


def _prose_documents(root: str | None = None) -> list[Document]:
    """The `topics` dict of `<root>/pydoc_data/topics.py`, read as a literal (not imported, so any `Lib/`
    directory works, not only the running interpreter's)."""
    root = _stdlib_root() if root is None else root
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        raise ValueError(f"stdlib corpus: {path} does not exist")
    _, source = _read_utf8(path, f"stdlib corpus: {path} is not valid UTF-8")
    topics = None
    for node in ast.parse(source, filename=path).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["topics"]:
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict):
        raise ValueError(f"stdlib corpus: {path} has no literal `topics = {{...}}` dict")
    return [Document(f"pydoc_data/topics/{k}", topics[k]) for k in sorted(topics)]


def _read_utf8(path: str, what: str):
    """(raw bytes, decoded text) of a file; ValueError '<what> (<decode error>)' if it is not UTF-8."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} ({e})") from e


def _check_limits(what: str, max_docs: int | None, max_bytes: int | None) -> None:
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"{what}: max_docs must be >= 1 or None, got {max_docs}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"{what}: max_bytes must be >= 1 or None, got {max_bytes}")


def stdlib_corpus(max_docs: int | None = None, max_bytes: int | None = None,
                  root: str | None = None) -> list[Document]:
    """The standard-library corpus (module docstring) of `root` (default: the running interpreter's): code by
    path, then pydoc topics by key. NOT the same on every Python version; see `builtin_corpus` for that.

    `max_docs` keeps the first `max_docs` documents; `max_bytes` stops before the first document that would take
    the total UTF-8 size above `max_bytes`. Both are prefixes of the same fixed order, hence deterministic.
    """
    _check_limits("stdlib_corpus", max_docs, max_bytes)
    root = _stdlib_root() if root is None else root
    docs: list[Document] = []
    used = 0

    def full() -> bool:
        return max_docs is not None and len(docs) >= max_docs

    def add(doc: Document, nbytes: int) -> bool:
        nonlocal used
        if max_bytes is not None and used + nbytes > max_bytes:
            return False
        docs.append(doc)
        used += nbytes
        return True

    for rel in stdlib_corpus_files(root):
        if full():
            return docs
        path = os.path.join(root, *rel.split("/"))
        raw, text = _read_utf8(path, f"stdlib corpus: {path} is not valid UTF-8")
        if _is_generated(text):
            continue
        if not add(Document(f"stdlib/{rel}", text), len(raw)):
            return docs
    for doc in _prose_documents(root):
        if full() or not add(doc, len(doc.text.encode("utf-8"))):
            return docs
    return docs


def _check_utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from JSON escapes such as "\ud800"
        raise ValueError(f"{where}: text is not encodable as UTF-8 ({e})") from e


def _load_jsonl(path: str, field: str) -> list[Document]:
    if not os.path.isfile(path):
        raise ValueError(f"corpus: JSONL file {path!r} does not exist")
    docs = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"corpus {path!r} line {lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object with field {field!r}, got {type(obj).__name__}")
            if field not in obj:
                raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(obj)[:10]})")
            text = obj[field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
            _check_utf8(text, where)
            docs.append(Document(f"{path}:{lineno}", text))
    if not docs:
        raise ValueError(f"corpus: JSONL file {path!r} contains no documents")
    return docs


def _load_text_files(spec: str) -> list[Document]:
    if os.path.isdir(spec):
        raise ValueError(f"corpus: {spec!r} is a directory; pass a glob such as '{spec.rstrip('/')}/**/*.txt'")
    if _glob.has_magic(spec):
        paths = sorted(p for p in _glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise ValueError(f"corpus: the glob {spec!r} matches no files")
    else:
        if not os.path.isfile(spec):
            raise ValueError(f"corpus: file {spec!r} does not exist (use 'default', 'stdlib', a file, a glob or a "
                             f".jsonl)")
        paths = [spec]
    docs = []
    for p in paths:
        _, text = _read_utf8(p, f"corpus: {p!r} is not a UTF-8 text file")
        docs.append(Document(p, text))
    return docs


def _parse_jsonl_spec(spec: str) -> tuple[str, str] | None:
    if spec.endswith(".jsonl"):
        return spec, "text"
    head, sep, field = spec.rpartition(":")
    if sep and head.endswith(".jsonl"):
        if not field:
            raise ValueError(f"corpus: empty field name in {spec!r} (use 'path.jsonl:field')")
        return head, field
    return None


def load_corpus(spec: str, max_docs: int | None = None, max_bytes: int | None = None) -> list[Document]:
    """Load a corpus from a spec: "default" (the built-in snapshot), "stdlib" (the running interpreter's
    standard library), "file.jsonl[:field]", or a text file / glob. See the module docstring.

    `max_docs` / `max_bytes` keep a prefix of the document order (as in `stdlib_corpus`).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"corpus: spec must be a non-empty string, got {spec!r}")
    if spec == "default":
        return builtin_corpus(max_docs=max_docs, max_bytes=max_bytes)
    if spec == "stdlib":
        return stdlib_corpus(max_docs=max_docs, max_bytes=max_bytes)
    jsonl = _parse_jsonl_spec(spec)
    docs = _load_jsonl(*jsonl) if jsonl else _load_text_files(spec)
    docs = _truncate(docs, max_docs, max_bytes)
    if not any(d.text for d in docs):
        raise ValueError(f"corpus: {spec!r} holds no text ({len(docs)} documents, 0 bytes)")
    return docs


def corpus_source(spec: str) -> str:
    """One line saying where a spec's documents come from, for run records (summary.json)."""
    if spec == "default":
        return f"built-in corpus {BUILTIN_VERSION} ({BUILTIN_SOURCE}; {os.path.basename(BUILTIN_FILE)})"
    if spec == "stdlib":
        return (f"standard library of the running interpreter ({sys.implementation.name} "
                f"{sys.version.split()[0]}, {_stdlib_root()}); differs between Python versions")
    return f"user corpus {spec!r}"


def _truncate(docs: list[Document], max_docs: int | None, max_bytes: int | None) -> list[Document]:
    if max_docs is not None:
        docs = docs[:max_docs]
    if max_bytes is not None:
        out, used = [], 0
        for d in docs:
            n = len(d.text.encode("utf-8"))
            if used + n > max_bytes:
                break
            out.append(d)
            used += n
        docs = out
    return docs


def _name_fraction(name: str) -> float:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, validation) split by a hash of each document's name; order kept in each part.

    A document is in validation iff `fraction(sha256(name)) < val_fraction`, so the split of one document does
    not depend on the others. One exception, for tiny corpora: when `val_fraction > 0`, there are at least two
    documents and none hashed into validation, the document with the smallest hash fraction is moved there, so
    that validation is never silently empty. A corpus of ONE document (a single text file) is split by bytes
    instead: its last ``max(1, round(val_fraction * n_bytes))`` bytes (moved back to a character boundary)
    become the validation document ``<name>#val`` and the rest ``<name>#train``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split: val_fraction must be in [0, 1), got {val_fraction}")
    if len(docs) == 1 and val_fraction > 0:
        return _split_bytes(docs[0], val_fraction)
    fracs = [_name_fraction(d.name) for d in docs]
    is_val = [f < val_fraction for f in fracs]
    if val_fraction > 0 and len(docs) >= 2 and not any(is_val):
        is_val[min(range(len(docs)), key=fracs.__getitem__)] = True
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def _split_bytes(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    raw = doc.text.encode("utf-8")
    if len(raw) < 2:
        return [doc], []
    cut = len(raw) - min(len(raw) - 1, max(1, round(val_fraction * len(raw))))
    while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # not inside a multi-byte character
        cut -= 1
    if cut == 0:
        return [doc], []
    return ([Document(f"{doc.name}#train", raw[:cut].decode("utf-8"))],
            [Document(f"{doc.name}#val", raw[cut:].decode("utf-8"))])


def fingerprint(docs: Iterable[Document]) -> str:
    """sha256 (hex) over every document's name and UTF-8 text, in order, each length-prefixed (unambiguous)."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.name.encode("utf-8"), d.text.encode("utf-8")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def total_bytes(docs: Iterable[Document]) -> int:
    """Total UTF-8 size of the documents' texts."""
    return sum(len(d.text.encode("utf-8")) for d in docs)


def describe(docs: Sequence[Document], spec: str | None = None) -> dict:
    """A small JSON-serialisable record of a corpus for run metadata: spec, source, counts, bytes, fingerprint,
    Python."""
    return {
        "spec": spec,
        "source": corpus_source(spec) if spec else None,
        "num_docs": len(docs),
        "num_bytes": total_bytes(docs),
        "fingerprint": fingerprint(docs),
        "python_version": sys.version.split()[0],
        "python_implementation": sys.implementation.name,
    }
