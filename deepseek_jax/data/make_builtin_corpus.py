"""Build the built-in corpus snapshot (deepseek_jax/data/builtin_corpus_v1.jsonl.xz) and its license file.

How v1 was made (once, 2026-12-03; anyone can repeat it and must get the same fingerprint):

    python -m deepseek_jax.data.make_builtin_corpus --stdlib "$(pyenv root)/versions/3.11.7/lib/python3.11"

Source: the standard library (``Lib/``) of CPython 3.11.7, here as installed by pyenv from the official release
tarball (``Python-3.11.7.tar.xz``; ``make install`` copies ``Lib/*.py`` unchanged). The ``Lib/`` directory of
the unpacked tarball works the same way (the rules skip the test suites). The documents are exactly
``corpus.stdlib_corpus(root=<that directory>)``: the rules in corpus.py's docstring (code files by path, codec
tables and tests excluded, then the pydoc topics). The script refuses to write unless the documents' fingerprint
is the pinned ``corpus.BUILTIN_FINGERPRINT`` (745 documents, 10,591,105 bytes), so a different source (another
Python version, a distribution that patches its stdlib) cannot silently replace v1.

License: CPython's standard library and its documentation are distributed under the Python Software Foundation
License Version 2 (SPDX ``Python-2.0``), which permits redistribution provided the license and PSF's copyright
notice are retained: the source's ``LICENSE.txt`` is copied next to the snapshot as
``builtin_corpus_v1.LICENSE`` (both are package data, setup.cfg).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from deepseek_jax.data import corpus as C

LICENSE_FILE = os.path.splitext(os.path.splitext(C.BUILTIN_FILE)[0])[0] + ".LICENSE"


def build(stdlib: str, out: str = C.BUILTIN_FILE, license_out: str = LICENSE_FILE) -> dict:
    docs = C.stdlib_corpus(root=stdlib)
    fp = C.fingerprint(docs)
    info = {"docs": len(docs), "bytes": C.total_bytes(docs), "fingerprint": fp}
    if fp != C.BUILTIN_FINGERPRINT or len(docs) != C.BUILTIN_NUM_DOCS or info["bytes"] != C.BUILTIN_NUM_BYTES:
        raise SystemExit(f"{stdlib}: {info} is not built-in corpus {C.BUILTIN_VERSION} "
                         f"({C.BUILTIN_NUM_DOCS} docs, {C.BUILTIN_NUM_BYTES} bytes, {C.BUILTIN_FINGERPRINT}); "
                         f"is it CPython 3.11.7's unpatched Lib/?")
    lic = os.path.join(stdlib, "LICENSE.txt")
    with open(lic, encoding="utf-8") as fh:
        if "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" not in fh.read():
            raise SystemExit(f"{lic}: not CPython's license file (no 'PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2')")
    C.write_snapshot(docs, out)
    shutil.copyfile(lic, license_out)
    if C.fingerprint(C.read_snapshot(out)) != fp:  # the round trip through the file
        raise SystemExit(f"{out}: written file does not read back to the same documents")
    info.update(file=out, file_bytes=os.path.getsize(out), license=license_out)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stdlib", required=True, help="CPython 3.11.7's Lib/ directory (see the module docstring)")
    ap.add_argument("--out", default=C.BUILTIN_FILE)
    ap.add_argument("--license-out", default=LICENSE_FILE)
    args = ap.parse_args(argv)
    print(build(args.stdlib, args.out, args.license_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
