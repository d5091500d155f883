"""Build the second validation domain: the Jargon File 4.4.7 (public domain), from Debian's
`jargon-text` package.

WikiText is encyclopaedia prose; the Jargon File is an informal, technical glossary of hacker
slang with etymologies, usage quotes and cross-references: a different kind of English. It is
used for validation only (every choice is made on WikiText validation AND on this text); the
calibration stays WikiText. Not Python's documentation, which is kept aside for checks.

- Source: Debian bookworm package `jargon-text` 4.4.7-4.1 (`apt-get download jargon-text`),
  file /usr/share/doc/jargon-text/jargon.txt.gz.
- Licence: "This document (the Jargon File) is in the public domain, to be freely used,
  shared, and modified." (the package's copyright file).
- What is kept: the glossary entries and appendices after the table of contents (from the
  first entry, ':(TM):'), three-space indent removed, hard-wrapped lines joined into one line
  per paragraph (as WikiText has one line per paragraph), blank line between paragraphs.
- Checksums of the .deb and of the built text are checked, so every session measures the same text.

usage: python scripts/build_second_domain.py [--out DIR]   (default: $CREPE_CACHE/data or
~/.cache/crepe-plugin/data). Writes DIR/jargon-4.4.7.txt and prints its path. Kept out of the
repository, like WikiText.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEB = "jargon-text_4.4.7-4.1_all.deb"
DEB_SHA256 = "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"
TEXT_SHA256 = "111c7e0b0707dc54c3daf40963fa5c331a3a07a99c96073fe0dd0040245395ea"
NAME = "jargon-4.4.7.txt"


def default_dir() -> Path:
    return Path(os.environ.get("CREPE_CACHE", Path.home() / ".cache" / "crepe-plugin")) / "data"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_text(raw: str) -> str:
    lines = raw.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("   :(TM):"))
    paras, cur = [], []
    for line in lines[start:]:
        s = line.strip()
        if s:
            cur.append(s)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_dir())
    ap.add_argument("--deb", type=Path, help="an already downloaded " + DEB)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        deb = a.deb
        if deb is None:
            subprocess.run(["apt-get", "download", "jargon-text=4.4.7-4.1"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            deb = Path(tmp) / DEB
        blob = deb.read_bytes()
        if sha256(blob) != DEB_SHA256:
            print(f"error: {deb}: sha256 {sha256(blob)} is not the expected {DEB_SHA256}", file=sys.stderr)
            return 2
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        raw = gzip.decompress((Path(tmp) / "x/usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    text = build_text(raw)
    if sha256(text.encode()) != TEXT_SHA256:
        print(f"error: built text sha256 {sha256(text.encode())} is not the expected {TEXT_SHA256}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / NAME
    tmp_out = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp_out.write_text(text, encoding="utf-8")
    tmp_out.replace(out)
    print(f"{out}  ({len(text)} chars, sha256 {sha256(text.encode())}; deb sha256 {sha256(blob)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
