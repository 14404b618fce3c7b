"""Corpora: chunking and the hash split, python-source collection, local files through `datasets`, and
the hub path (the same `datasets` streaming code, checked on local files and with a stand-in loader)."""
import hashlib
import json
import os
import random
import sys
import time

import pytest

from egmla.data.config import DataConfig
from egmla.data.corpora import (chunk_text, corpus_fingerprint, is_validation, is_validation_document,
                                iter_documents, python_source_documents, python_source_files, python_source_roots,
                                resolve_local_files, split_chunks)


def test_chunks_rejoin_and_cut_at_line_ends():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(3000))
    pieces = chunk_text(text, size=1000)
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces) and all(p.endswith("\n") for p in pieces)
    assert chunk_text("a" * 2500, size=1000) == ["a" * 1000, "a" * 1000, "a" * 500]  # no newline: hard cut


def test_hash_split_is_deterministic_and_near_the_fraction():
    keys = [f"doc{i}@0" for i in range(20000)]
    share = sum(is_validation(k, 0.05) for k in keys) / len(keys)
    assert 0.04 < share < 0.06
    assert [is_validation(k, 0.05) for k in keys[:100]] == [is_validation(k, 0.05) for k in keys[:100]]
    chunks = list(split_chunks(iter([("a", "x\n" * 30000), ("b", "y\n")]), 0.3))
    assert {split for split, _, _ in chunks} == {"train", "val"}
    # a separator after each document's last chunk and wherever its next chunk goes to the other split
    splits = [split for split, _, _ in chunks]
    runs_ending = [i == len(chunks) - 1 or i == len(chunks) - 2 or splits[i + 1] != splits[i]
                   for i in range(len(chunks))]  # (b is one chunk: a's last chunk is the second to last)
    assert [ends for _, _, ends in chunks] == runs_ending and 2 < sum(runs_ending) < len(chunks)


def sides_per_document(documents, val_fraction, by):
    """{key: set of splits its chunks went to}, read off split_chunks (a document's chunks come in a row)."""
    documents = list(documents)
    owners = [key for key, text in documents for _ in chunk_text(text)]
    sides = {}
    for key, (split, _, _) in zip(owners, split_chunks(iter(documents), val_fraction, by), strict=True):
        sides.setdefault(key, set()).add(split)
    return sides


MULTI_CHUNK = [(f"stdlib/pkg{i}/mod{i}.py", "".join(f"line {j} of {i}\n" for j in range(400 * (i % 7 + 1))))
               for i in range(200)]  # 1-7 chunks of 16 KB each


def test_chunk_split_is_the_one_the_committed_records_used():
    """split='chunk' (the default, and what every record before issue 18 trained on) is unchanged: the digest of
    every chunk's (split, length), computed from the code before the document split was added (its digest with
    the old ends_document flags was 03a41794...; the flags changed on 2026-12-05, the sides did not)."""
    chunks = [(split, len(text)) for split, text, _ in split_chunks(iter(MULTI_CHUNK), 0.1)]
    assert hashlib.sha256(repr(chunks).encode()).hexdigest() == \
        "9285460206b30d9441835b855cf1893417ac10399fed7a394f5cf1ea7ab2c274"
    assert chunks == [(s, len(t)) for s, t, _ in split_chunks(iter(MULTI_CHUNK), 0.1, "chunk")]
    assert DataConfig().split == "chunk"


def test_document_split_never_puts_one_file_on_both_sides():
    by_chunk = sides_per_document(MULTI_CHUNK, 0.1, "chunk")
    assert sum(len(sides) == 2 for sides in by_chunk.values()) > 5  # the chunk split does straddle files
    by_document = sides_per_document(MULTI_CHUNK, 0.1, "document")
    assert all(len(sides) == 1 for sides in by_document.values())
    held_out = {key for key, sides in by_document.items() if sides == {"val"}}
    assert 10 <= len(held_out) <= 30  # about val_fraction of 200 documents
    assert held_out == {key for key, _ in MULTI_CHUNK if is_validation_document(key, 0.1)}
    # deterministic, and a document's side depends on its key alone, not on the order or the other documents
    shuffled = random.Random(0).sample(MULTI_CHUNK, 150)
    assert sides_per_document(shuffled, 0.1, "document") == {key: by_document[key] for key, _ in shuffled}


def test_document_split_of_this_installation_holds_out_whole_files():
    files = list(python_source_documents(max_bytes=20_000_000))
    sides = sides_per_document(files, 0.02, "document")
    assert all(len(s) == 1 for s in sides.values()) and len(sides) == len(files)
    held_out = [key for key, s in sides.items() if s == {"val"}]
    assert 0.01 < len(held_out) / len(files) < 0.03
    # the held-out files are not the first ones of the capped, hash-ordered listing: another hash picks them
    assert [key for key, _ in files[:len(held_out)]] != held_out


def test_python_source_collects_each_file_once_in_a_fixed_order(tmp_path):
    outer, inner = tmp_path / "lib", tmp_path / "lib" / "site-packages"
    (inner / "pkg").mkdir(parents=True)
    (outer / "os_like.py").write_text("import os\n")
    (inner / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (inner / "pkg" / "data.bin").write_bytes(b"\0\1")
    (inner / "pkg" / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
    (inner / "__pycache__").mkdir()
    (inner / "__pycache__" / "junk.py").write_text("x = 1\n")
    roots = [("purelib", inner), ("stdlib", outer)]  # nested roots: each file under its own label
    keys = [key for key, _, _ in python_source_files(roots)]
    assert keys == ["purelib/pkg/latin1.py", "purelib/pkg/mod.py", "stdlib/os_like.py"]
    documents = list(python_source_documents(roots=roots))
    assert sorted(k for k, _ in documents) == ["purelib/pkg/mod.py", "stdlib/os_like.py"]
    assert documents == list(python_source_documents(roots=roots))
    cap = len(documents[0][1])  # the size cap keeps the hash-ordered prefix that fits
    assert [k for k, _ in python_source_documents(max_bytes=cap, roots=roots)] == [documents[0][0]]


def test_python_source_keeps_each_content_once_and_skips_an_unimportable_site_packages(tmp_path):
    """A vendored copy (the same bytes under another key) is one document, under its smallest key: with the
    document split it could otherwise be trained on under one key and held out under the other. A stdlib folder's
    own site-packages that is not a root (a venv's base interpreter's) is not this installation's."""
    stdlib, purelib = tmp_path / "lib", tmp_path / "venv" / "site-packages"
    (stdlib / "site-packages" / "oldpkg").mkdir(parents=True)
    (purelib / "pip" / "_vendor" / "urllib3").mkdir(parents=True)
    (purelib / "urllib3").mkdir(parents=True)
    retry = "class Retry:\n    total = 10\n"
    (purelib / "urllib3" / "retry.py").write_text(retry)
    (purelib / "pip" / "_vendor" / "urllib3" / "retry.py").write_text(retry)
    (purelib / "urllib3" / "other.py").write_text("class Retry:\n    total = 11\n")  # same size, other bytes
    (stdlib / "site-packages" / "oldpkg" / "mod.py").write_text("x = 1\n")
    (stdlib / "os_like.py").write_text("import os\n")
    roots = [("purelib", purelib), ("stdlib", stdlib)]
    keys = sorted(key for key, _ in python_source_documents(roots=roots))
    assert keys == ["purelib/pip/_vendor/urllib3/retry.py", "purelib/urllib3/other.py", "stdlib/os_like.py"]


def test_python_source_of_this_installation_without_datasets(monkeypatch):
    """The GPU image has no `datasets`: python-source (and embedded) must not import it."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    labels = [label for label, _ in python_source_roots()]
    assert "stdlib" in labels or "platstdlib" in labels
    first = list(iter_documents(DataConfig(corpus="python-source", max_bytes=200_000)))
    assert 0 < sum(len(t) for _, t in first) <= 200_000 and all(k.endswith(".py") for k, _ in first)
    assert any("def " in t or "import " in t for _, t in first)
    assert next(iter_documents(DataConfig(corpus="embedded")))[1]
    with pytest.raises(ValueError, match="needs the `datasets` library"):
        list(iter_documents(DataConfig(corpus="hf:some/dataset")))


@pytest.fixture
def local_files(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\nIt has two lines.\n")
    (tmp_path / "b.txt").write_text("Second document.\n")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(3)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["parquet one", "parquet two"]}), tmp_path / "p.parquet")
    return tmp_path


def test_local_txt_jsonl_and_globs(local_files):
    docs = list(iter_documents(DataConfig(corpus=str(local_files / "*.txt"))))
    assert [t for _, t in docs] == ["First document.\nIt has two lines.\n", "Second document.\n"]
    docs = list(iter_documents(DataConfig(corpus=f"{local_files / 'rows.jsonl'},{local_files / 'a.txt'}")))
    assert sorted(t for _, t in docs) == sorted(["First document.\nIt has two lines.\n", "row 0", "row 1", "row 2"])
    docs = list(iter_documents(DataConfig(corpus=str(local_files / "p.parquet"), text_field="body")))
    assert [t for _, t in docs] == ["parquet one", "parquet two"]
    capped = list(iter_documents(DataConfig(corpus=str(local_files / "rows.jsonl"), max_bytes=9)))
    assert [t for _, t in capped] == ["row 0", "row "]  # the cap cuts the last document, as for every corpus
    assert corpus_fingerprint(DataConfig(corpus=str(local_files / "*.txt"))) != corpus_fingerprint(
        DataConfig(corpus=str(local_files / "a.txt")))
    # keyed by content: a file added before the others moves no document to the other side of the split
    keys = dict((t, k) for k, t in iter_documents(DataConfig(corpus=str(local_files / "*.txt"))))
    (local_files / "0.txt").write_text("An earlier file.\n")
    after = dict((t, k) for k, t in iter_documents(DataConfig(corpus=str(local_files / "*.txt"))))
    assert all(after[text] == key for text, key in keys.items()) and len(after) == 3


def test_local_file_errors_name_the_fix(local_files):
    with pytest.raises(ValueError, match="does not exist and matches no file"):
        list(iter_documents(DataConfig(corpus=str(local_files / "missing.txt"))))
    with pytest.raises(ValueError, match="data.text_field='text'.*'body'"):
        list(iter_documents(DataConfig(corpus=str(local_files / "p.parquet"))))
    (local_files / "notes.csv").write_text("x")
    with pytest.raises(ValueError, match="suffix '.csv'"):
        list(iter_documents(DataConfig(corpus=str(local_files / "notes.csv"))))


def test_hub_names_stream_through_the_same_loader(monkeypatch):
    import datasets

    from egmla.data import corpora

    monkeypatch.setattr(corpora, "check_hub_reachable", lambda corpus: None)  # no network here: a stand-in hub
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return iter([{"text": "streamed row one"}, {"text": ""}, {"text": "streamed row two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = DataConfig(corpus="hf:HuggingFaceFW/fineweb-edu", hf_config="sample-10BT", max_bytes=1000)
    docs = list(iter_documents(config))
    assert [t for _, t in docs] == ["streamed row one", "streamed row two"]
    assert calls == [("HuggingFaceFW/fineweb-edu", dict(name="sample-10BT", data_files=None, split="train",
                                                        streaming=True))]


@pytest.mark.parametrize("environment,error", [
    ({"HF_HUB_OFFLINE": "1"}, r"HF_HUB_OFFLINE is set, so the hub cannot be read; train on local files instead"),
    # a closed local port: refused at once, whether or not this machine has a network
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, r"the Hugging Face hub \(127.0.0.1\) is not reachable \(.+\); "
                                            r"train on local files instead, e.g. --set data.corpus="),
])
def test_hub_without_network_fails_fast_in_one_line(monkeypatch, environment, error):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=error) as raised:
        list(iter_documents(DataConfig(corpus="hf:HuggingFaceFW/fineweb-edu")))
    assert time.perf_counter() - started < 5 and "\n" not in str(raised.value)


def test_a_hub_error_after_connecting_is_one_line(monkeypatch):
    import datasets

    from egmla.data import corpora

    def missing(path, **kwargs):
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub\nor cannot be accessed.")

    monkeypatch.setattr(corpora, "check_hub_reachable", lambda corpus: None)
    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(ValueError, match=r"^data.corpus='hf:no/such': the hub dataset could not be read "
                                         r"\(FileNotFoundError: Dataset 'no/such' doesn't exist on the Hub\)$"):
        list(iter_documents(DataConfig(corpus="hf:no/such")))


def test_local_files_are_each_read_once_and_a_symlink_loop_ends(tmp_path):
    """glob's `**` followed a link to a parent folder round and round: with two such links it never finished, with
    one it listed the same file 41 times (and trained on it 41 times); a file named twice was read twice."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("A document.\n")
    os.symlink("..", tmp_path / "texts" / "up")
    os.symlink(".", tmp_path / "texts" / "self")
    started = time.perf_counter()
    assert resolve_local_files(str(tmp_path / "texts" / "**" / "*.txt")) == [tmp_path / "texts" / "a.txt"]
    assert time.perf_counter() - started < 5
    assert resolve_local_files(f"{tmp_path / 'texts'},{tmp_path / 'texts' / 'a.txt'}") == [tmp_path / "texts" / "a.txt"]
    os.symlink("missing.txt", tmp_path / "texts" / "gone.txt")
    with pytest.raises(ValueError, match=r"gone.txt is a symbolic link to 'missing.txt', which does not exist"):
        resolve_local_files(str(tmp_path / "texts" / "gone.txt"))


def test_a_file_replaced_with_the_same_size_and_mtime_gets_a_new_cache_key(tmp_path):
    """`cp -p`, `rsync -t` or `touch -r` can leave other text under the size and mtime the caches were keyed by."""
    path = tmp_path / "a.txt"
    path.write_text("first text\n")
    config = DataConfig(corpus=str(path))
    before, info = corpus_fingerprint(config), path.stat()
    path.write_text("other text\n")
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns
    assert corpus_fingerprint(config) != before


def test_text_field_holding_no_text_is_named_and_txt_files_ignore_it(tmp_path):
    (tmp_path / "numbers.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(3)))
    with pytest.raises(ValueError, match=r"^data.text_field='text': json rows hold int values there, not text "
                                         r"\(e.g. 0\); set data.text_field to the field holding the text$"):
        list(iter_documents(DataConfig(corpus=str(tmp_path / "numbers.jsonl"))))
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("A text file.\n")
    (folder / "b.jsonl").write_text(json.dumps({"body": "A row."}) + "\n")
    (folder / "empty.jsonl").write_text("")
    # data.text_field names the .jsonl field; a .txt file is text whatever it says, and data.hf_* are a hub's
    docs = iter_documents(DataConfig(corpus=str(folder), text_field="body", hf_split="test", hf_config="other"))
    assert sorted(t for _, t in docs) == ["A row.", "A text file.\n"]
    assert list(iter_documents(DataConfig(corpus=str(folder / "empty.jsonl")))) == []  # not `datasets`' StopIteration
    with pytest.raises(ValueError, match=r"data.corpus=' ': empty; use 'embedded'"):
        DataConfig(corpus=" ")


@pytest.mark.parametrize("name,content,error", [
    ("random.txt", bytes(range(128, 256)) * 8, r"random.txt is not UTF-8 text \(byte 0x80 at offset 0\)"),
    ("latin1.txt", "First line.\nCafé au lait.\n".encode("latin-1"), r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 15\)"),
    ("rows.jsonl", b'{"text": "fine"}\nnot json\n', r"rows.jsonl line 2 is not a JSON object"),
    ("strings.jsonl", b'"a string, not a row"\n', r"strings.jsonl line 1 is not a JSON object"),
    ("table.parquet", b"not parquet", r"table.parquet is not a parquet file"),
])
def test_an_unreadable_corpus_file_is_named(tmp_path, name, content, error):
    (tmp_path / "good.txt").write_text("A fine document.\n")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=error) as raised:
        list(iter_documents(DataConfig(corpus=str(tmp_path))))
    assert "\n" not in str(raised.value)


def test_a_byte_order_mark_is_left_out_of_local_text_and_keys_the_cache(tmp_path):
    """A UTF-8 BOM starting a .txt file reached the tokenizer as U+FEFF; it is left out (as 'utf-8-sig' reads it),
    .jsonl/.json rows lose it too (`datasets` skips it there), and it is no fault when a file is checked. The cache
    key changes only for a corpus holding such a text file (its old caches hold the BOM's tokens)."""
    from egmla.data import corpora

    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.txt").write_bytes(bom + "Héllo, a text file.\n\ufeffa later U+FEFF is text\n".encode())
    (tmp_path / "plain.txt").write_text("No mark here.\n")
    (tmp_path / "rows.jsonl").write_bytes(bom + b'{"text": "a row"}\n{"text": "another"}\n')
    (tmp_path / "list.json").write_bytes(bom + b'[{"text": "from an array"}]')
    texts = sorted(t for _, t in iter_documents(DataConfig(corpus=str(tmp_path))))
    assert texts == ["Héllo, a text file.\n\ufeffa later U+FEFF is text\n", "No mark here.\n", "a row",
                     "another", "from an array"]
    assert all(corpora.unreadable_file(path) is None for path in tmp_path.iterdir())

    def fingerprint_before(corpus):  # the key as egmla computed it before the mark was left out
        files = [(str(p.resolve()), i.st_size, i.st_mtime_ns, i.st_ino, i.st_ctime_ns)
                 for p in resolve_local_files(corpus) for i in [p.stat()]]
        parts = {"corpus": corpus, "max_bytes": 0, "text_field": "text", "recipe": corpora.CORPUS_RECIPE,
                 "files": files}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    for unchanged in (f"{tmp_path / 'plain.txt'}", f"{tmp_path / 'rows.jsonl'},{tmp_path / 'list.json'}"):
        assert corpus_fingerprint(DataConfig(corpus=unchanged)) == fingerprint_before(unchanged)
    for changed in (str(tmp_path / "bom.txt"), str(tmp_path)):
        assert corpus_fingerprint(DataConfig(corpus=changed)) != fingerprint_before(changed)


def test_a_bad_jsonl_file_is_named_not_a_good_one_with_a_byte_order_mark(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "fine"}\n')
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"b.jsonl line 2 is not a JSON object"):
        list(iter_documents(DataConfig(corpus=str(tmp_path))))


@pytest.mark.parametrize("second, field, kinds", [('{"text": "b", "meta": "x"}', "meta", "object in .*a.jsonl and string"),
                                                ('{"text": "b", "meta": {"a": "x"}}', "meta.a", "number in .*a.jsonl and string")])
def test_json_files_whose_field_types_disagree_name_the_field_and_the_files(tmp_path, second, field, kinds):
    """`datasets` reads a corpus's JSON files with one schema and said only "Couldn't cast" (a field the run never
    trains on, an object in one file and a string in the next, or a nested field's type)."""
    (tmp_path / "a.jsonl").write_text('{"text": "a", "meta": {"a": 1}}\n')
    (tmp_path / "b.jsonl").write_text(second + "\n")
    with pytest.raises(ValueError, match=rf"field '{field}' is {kinds} in .*b.jsonl: `datasets` reads a corpus's JSON "
                                         rf"files with one type per field.*drop it"):
        list(iter_documents(DataConfig(corpus=str(tmp_path))))


def test_upper_case_suffixes_are_read_from_folders_globs_and_paths(tmp_path):
    """.TXT and .Jsonl files were left out of a folder silently (and refused by a glob or a path)."""
    (tmp_path / "upper.TXT").write_text("Upper-case suffix.\n")
    (tmp_path / "lower.txt").write_text("Lower-case suffix.\n")
    (tmp_path / "rows.Jsonl").write_text('{"text": "a mixed-case row"}\n')
    (tmp_path / "notes.CSV").write_text("x")  # still no corpus file, in any case
    expected = ["Lower-case suffix.\n", "Upper-case suffix.\n", "a mixed-case row"]
    assert sorted(t for _, t in iter_documents(DataConfig(corpus=str(tmp_path)))) == expected
    assert sorted(t for _, t in iter_documents(DataConfig(corpus=str(tmp_path / "*.*[!vV]")))) == expected
    assert [t for _, t in iter_documents(DataConfig(corpus=str(tmp_path / "rows.Jsonl")))] == ["a mixed-case row"]
    assert [p.name for p in resolve_local_files(str(tmp_path))] == ["lower.txt", "rows.Jsonl", "upper.TXT"]
    with pytest.raises(ValueError, match=r"notes.CSV has suffix '.CSV'; supported: .txt, .text, .jsonl, .json, "
                                         r".parquet \(in any case\)"):
        resolve_local_files(str(tmp_path / "notes.CSV"))
