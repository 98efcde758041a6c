#!/usr/bin/env python
"""Rebuild blueberry/data/austen.jsonl.gz from the Debian package r-cran-janeaustenr.

Usage:
    python scripts/build_austen_corpus.py                    # apt-get download + dpkg-deb -x into a temp dir
    python scripts/build_austen_corpus.py --source PATH      # a .deb, an extracted tree, or janeaustenr/data/

Needs `rdata` (pip install rdata) to read R's lazy-load database; it is a build-time tool only.
The output is byte-deterministic (gzip mtime 0, no file name in the header), so a rebuild shows no diff.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import rdata

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "blueberry" / "data" / "austen.jsonl.gz"
DATA_SUBDIR = Path("usr/lib/R/site-library/janeaustenr/data")

BOOK_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
CHAPTER_RE = re.compile(r"^(CHAPTER|Chapter) [IVXLC\d]+")
VOLUME_RE = re.compile(r"^VOLUME [IVXLC]+$")
END_RE = re.compile(r"^(THE END|FINIS|Finis)$")  # closing marks are not prose


def find_data_dir(source: Path, workdir: Path) -> Path:
    """Return the janeaustenr/data directory for a .deb, an extracted tree or the data dir itself."""
    if source.is_file() and source.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(source), str(workdir)], check=True)
        source = workdir
    for candidate in (source, source / DATA_SUBDIR):
        if (candidate / "Rdata.rdx").is_file():
            return candidate
    raise SystemExit(f"no janeaustenr Rdata.rdx under {source}")


def download_deb(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
    return next(workdir.glob("r-cran-janeaustenr_*.deb"))


def read_books(data_dir: Path) -> dict[str, list[str]]:
    """Read each novel as a list of lines from R's lazy-load database (.rdx index + .rdb blobs)."""

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns "assumed RDS" for these headerless blobs
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        # Each blob is a 4-byte length header followed by a zlib stream.
        books[str(name)] = [str(line) for line in parse(zlib.decompress(blob[4:]))]
    return books


def reflow(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs; paragraphs are separated by one blank line."""
    paragraphs, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def chapters(book: str, lines: list[str]) -> list[dict]:
    """Split a novel at its chapter headings, dropping the front matter before chapter one."""
    heads, bodies, volume = [], [], ""
    for line in lines:
        if CHAPTER_RE.match(line):
            heads.append(f"{volume}Chapter {line.split()[1]}")  # unify "CHAPTER I" / "Chapter 1"
            bodies.append([])
        elif VOLUME_RE.match(line):
            volume = f"Volume {line.split()[1]}, "  # Emma restarts chapter numbers in each volume
        elif bodies and not END_RE.match(line.strip()):
            bodies[-1].append(line)
    title = BOOK_TITLES[book]
    return [
        {"id": f"austen/{book}/{i:03d}", "title": f"{title}, {head}", "text": reflow(body)}
        for i, (head, body) in enumerate(zip(heads, bodies, strict=True), start=1)
    ]


def write_jsonl_gz(records: list[dict], out: Path) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="r-cran-janeaustenr .deb, extracted tree or its data/ dir")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source = args.source or download_deb(workdir)
        books = read_books(find_data_dir(source, workdir))

    missing = set(BOOK_TITLES) - set(books)
    if missing:
        raise SystemExit(f"janeaustenr lacks books {sorted(missing)}")
    records = [r for book in BOOK_TITLES for r in chapters(book, books[book])]
    write_jsonl_gz(records, args.out)
    chars = sum(len(r["text"]) for r in records)
    print(
        f"wrote {args.out}: {len(records)} chapters, {chars:,} chars, {args.out.stat().st_size:,} bytes",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
