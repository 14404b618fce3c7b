"""Tokenizer training and caching, token shards (dtype, document ends, split, cache) and the unigram baseline."""
import math

import numpy as np
import pytest

import egmla.data.tokenizer as tokenizer_module
from egmla.data import prepare_data
from egmla.data.config import DataConfig
from egmla.data.shards import unigram_statistics
from egmla.data.tokenizer import END_OF_TEXT, check_tokenizer_fits, get_tokenizer, train_tokenizer

TEXT = "Friends, Romans, countrymen, lend me your ears; émigré naïveté — 東京 ✓\n"


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n" + TEXT * (40 + i))
    return DataConfig(corpus=str(folder / "*.txt"), val_fraction=0.25, cache_dir=str(tmp_path / "cache"))


def test_byte_level_bpe_round_trips_any_text():
    tokenizer = train_tokenizer([TEXT * 20], 300)
    assert tokenizer.get_vocab_size() == 300 and tokenizer.token_to_id(END_OF_TEXT) == 0
    weird = "unseen ₿ 🙂 \x00 tab\tend"
    assert tokenizer.decode(tokenizer.encode(weird).ids) == weird
    with pytest.raises(ValueError, match="model.vocab_size=100: a byte-level BPE needs at least 257"):
        train_tokenizer([TEXT], 100)
    with pytest.raises(ValueError, match="tokenizer has 300 ids but model.vocab_size=299"):
        check_tokenizer_fits(tokenizer, 299, where="tokenizer")


def test_training_prints_nothing_without_a_terminal(capfd):
    """The library's progress bars, off a terminal, printed blank lines to stdout (from Rust: capfd sees them)."""
    train_tokenizer([TEXT * 20], 300, progress=True)
    train_tokenizer([TEXT * 20], 300)
    assert capfd.readouterr() == ("", "")


def test_tokenizer_is_cached_by_corpus_and_vocab(corpus, monkeypatch):
    first = get_tokenizer(corpus, 320, log=lambda *_: None)
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    assert get_tokenizer(corpus, 320, log=lambda *_: None).to_str() == first.to_str()
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        get_tokenizer(corpus, 330, log=lambda *_: None)  # another vocab size: trains again


def test_shards_hold_every_chunk_once_with_document_ends(corpus):
    tokenizer, shards = prepare_data(corpus, 320, progress=False, log=lambda *_: None)
    train, val = shards.tokens("train"), shards.tokens("val")
    assert train.dtype == np.uint16 and len(train) > 0 and len(val) > 0
    assert int((train == 0).sum() + (val == 0).sum()) == 12  # one end-of-text per document
    texts = tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist())
    assert texts.count("Friends, Romans") == sum(40 + i for i in range(12))
    assert shards.meta["vocab_size"] == 320 and shards.meta["train_tokens"] == len(train)
    again_tokenizer, again = prepare_data(corpus, 320, progress=False, log=pytest.fail)  # all cached: no log
    assert again.folder == shards.folder and again_tokenizer.to_str() == tokenizer.to_str()


def test_document_split_has_its_own_caches_and_whole_documents_in_validation(corpus):
    import dataclasses

    _, by_chunk = prepare_data(corpus, 320, progress=False, log=lambda *_: None)
    by_document = dataclasses.replace(corpus, split="document")
    tokenizer, shards = prepare_data(by_document, 320, progress=False, log=lambda *_: None)
    assert shards.folder != by_chunk.folder
    val = shards.tokens("val").tolist()
    ends = [i for i, token in enumerate(val) if token == 0]  # END_OF_TEXT after each document
    assert ends and ends[-1] == len(val) - 1
    held_out = [tokenizer.decode(val[start + 1 if start else 0:end]) for start, end in zip([0] + ends, ends)]
    for text in held_out:  # each one whole: from its first line, with all of its lines
        number = int(text.split()[1].rstrip("."))
        assert text == f"Document {number}.\n" + TEXT * (40 + number)


def test_validation_split_that_ends_up_empty_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text(TEXT * 10)
    config = DataConfig(corpus=str(tmp_path / "one.txt"), val_fraction=0.001, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="the validation split is empty"):
        prepare_data(config, 300, progress=False, log=lambda *_: None)


def test_unigram_statistics():
    uniform = np.arange(1000) % 4
    stats = unigram_statistics(uniform, uniform[:100], vocab_size=4)
    assert stats["train_unigram_entropy"] == pytest.approx(math.log(4))
    assert stats["val_unigram_cross_entropy"] == pytest.approx(-math.log(251 / 1004))


def test_the_chunk_split_never_runs_two_documents_or_two_pieces_together(tmp_path):
    """split='chunk' sends a document's chunks to both sides: each split's stream must separate what is not
    contiguous text (another document, or a later chunk of the same one) by an end-of-text. It did so only after
    a document's last chunk, so a validation stream of several documents held no separator at all."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for doc in range(6):  # ~5 chunks of 16 KB each
        (folder / f"doc{doc}.txt").write_text("".join(f"doc {doc} line {line:05d}\n" for line in range(4000)))
    config = DataConfig(corpus=str(folder / "*.txt"), val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    tokenizer, shards = prepare_data(config, 400, progress=False, log=lambda *_: None)
    for split in ("train", "val"):
        stream = tokenizer.decode(shards.tokens(split).tolist(), skip_special_tokens=False)
        pieces = [piece for piece in stream.split(END_OF_TEXT) if piece]
        assert len(pieces) > 1, split
        for piece in pieces:  # one document's consecutive lines
            lines = [line.split() for line in piece.splitlines()]
            assert len({doc for _, doc, _, _ in lines}) == 1, split
            numbers = [int(number) for *_, number in lines]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), split


def test_a_cache_cut_short_is_built_again_not_read(corpus):
    """Shards are renamed into place whole, but a partial copy or a crash before the disk had them can leave a file
    short or missing: a memmap past its end failed in one unhelpful line. A cached tokenizer cut short gave a
    traceback."""
    tokenizer, shards = prepare_data(corpus, 320, progress=False, log=lambda *_: None)
    train = shards.tokens("train").copy()
    for damage in (lambda f: (f / "train.bin").write_bytes(b"\0" * 10), lambda f: (f / "val.bin").unlink(),
                   lambda f: (f / "meta.json").write_text('{"dtype": "uint1'), lambda f: (f / "meta.json").unlink()):
        damage(shards.folder)
        lines = []
        _, again = prepare_data(corpus, 320, progress=False, log=lines.append)
        assert "are incomplete; tokenizing again" in lines[0] and again.folder == shards.folder
        assert (again.tokens("train") == train).all() and len(again.tokens("val")) == shards.meta["val_tokens"]
    for path in (corpus.cache_root() / "tokenizers").glob("*.json"):
        path.write_text(path.read_text()[:100])
    lines = []
    assert prepare_data(corpus, 320, progress=False, log=lines.append)[0].to_str() == tokenizer.to_str()
    assert "is unreadable" in lines[0] and "training it again" in lines[0]


def test_a_split_left_empty_says_which_setting_emptied_it(tmp_path):
    (tmp_path / "one.txt").write_text(TEXT * 10)
    config = DataConfig(corpus=str(tmp_path / "one.txt"), val_fraction=0.999, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"^data.val_fraction=0.999: the training split is empty \(all 700 characters "
                                         r"of text were held out, by chunks of 16,384\); use more text or change "
                                         r"data.val_fraction$"):  # not 'no training text; check the path'
        prepare_data(config, 300, progress=False, log=lambda *_: None)
    config = DataConfig(corpus=str(tmp_path / "one.txt"), split="document", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"^data.val_fraction=0.02, data.split='document': the validation split is "
                                         r"empty \(700 characters of text, held out as whole documents\); use more "
                                         r"documents, or data.split='chunk' to hold out chunks of each$"):
        prepare_data(config, 300, progress=False, log=lambda *_: None)


KILLED_BUILD = """
import sys, time
from egmla.data import prepare_data, shards
from egmla.data.config import DataConfig

def stuck(config, tokenizer, folder, progress):
    (folder / "train.bin").write_bytes(b"\\0" * 64)
    print(folder.name, flush=True)
    time.sleep(120)

shards._write_shards = stuck
prepare_data(DataConfig(corpus=sys.argv[1], val_fraction=0.25, cache_dir=sys.argv[2]), 320, progress=False,
             log=lambda *_: None)
"""


def test_a_killed_builds_temp_folder_is_removed_by_the_next_build_but_a_live_ones_is_kept(corpus):
    """A build killed outright (SIGKILL) left its `.tmp-*` folder in the cache for ever. The next build removes the
    temp folders of processes that are gone (its owner, a PID not running) and those untouched for a day (another
    host's, or named by an older egmla), and `.broken-*` leftovers; never one a running build is writing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from egmla.data.shards import STALE_TMP_AGE_S, is_stale_tmp, tmp_owner

    prepare_data(corpus, 320, progress=False, log=lambda *_: None)  # the tokenizer, cached for the child
    root = corpus.cache_root() / "shards"
    for folder in root.iterdir():  # the shards only: the child builds them again
        if folder.is_dir():
            for file in folder.iterdir():
                file.unlink()
            folder.rmdir()
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, corpus.corpus, corpus.cache_dir],
                             stdout=subprocess.PIPE, text=True)
    killed = root / child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert killed.name.startswith(f".tmp-{tmp_owner()}-{child.pid}-") and (killed / "train.bin").is_file()

    def folder(name, age_s=0.0):
        (root / name).mkdir()
        (root / name / "train.bin").write_bytes(b"\0")
        for path in (root / name / "train.bin", root / name):
            os.utime(path, (time.time() - age_s,) * 2)
        return root / name

    live = folder(f".tmp-{tmp_owner()}-{os.getpid()}-live0001")  # a build in this process, still writing
    other_host = folder(".tmp-elsewhere.4026531836-1-a1b2c3d4")  # its PID means nothing here
    old_name = folder(".tmp-k3j4h5g6")  # mkdtemp's name before the owner was in it
    stale_other_host = folder(".tmp-elsewhere.4026531836-2-e5f6g7h8", age_s=STALE_TMP_AGE_S + 60)
    stale_old_name = folder(".tmp-q9w8e7r6", age_s=STALE_TMP_AGE_S + 60)
    broken = folder(".broken-0123456789abcdef01234567-99")
    assert [is_stale_tmp(f) for f in (killed, live, other_host, old_name, stale_other_host, stale_old_name)] == [
        True, False, False, False, True, True]
    lines = []
    _, shards = prepare_data(corpus, 320, progress=False, log=lines.append)
    assert shards.meta["train_tokens"] > 0
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == sorted(
        f.name for f in (live, other_host, old_name))
    assert not any(f.exists() for f in (killed, stale_other_host, stale_old_name, broken))
    assert any("removed 4 folder(s)" in line and killed.name in line for line in lines)


def test_a_literal_end_of_text_in_the_corpus_is_text_not_a_document_end(tmp_path):
    """Id 0 marks where a document ends. A text holding the characters `<|endoftext|>` (Python sources, text about
    language models) was encoded with id 0 there: a document end in mid-document, and the characters lost."""
    folder = tmp_path / "texts"
    folder.mkdir()
    quoted = f"EOS = {END_OF_TEXT!r}  # the separator\n"
    for doc in range(6):
        (folder / f"doc{doc}.txt").write_text(f"Document {doc}.\n" + (TEXT + quoted) * 30)
    config = DataConfig(corpus=str(folder / "*.txt"), val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    tokenizer, shards = prepare_data(config, 400, progress=False, log=lambda *_: None)
    train, val = shards.tokens("train"), shards.tokens("val")
    assert int((train == 0).sum() + (val == 0).sum()) == 6  # one end-of-text per document, none inside one
    texts = tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist())
    assert texts.count(quoted) == 6 * 30


def test_a_tokenizer_sample_below_one_chunk_trains_on_its_first_part(tmp_path):
    """data.tokenizer_sample_bytes under one 16 KB chunk took no text at all: 'no training text; check the path'."""
    (tmp_path / "one.txt").write_text(TEXT * 1000)
    config = DataConfig(corpus=str(tmp_path / "one.txt"), val_fraction=0.2, tokenizer_sample_bytes=2_000,
                        cache_dir=str(tmp_path / "c"))
    assert get_tokenizer(config, 300, log=lambda *_: None).get_vocab_size() == 300


def test_vocab_size_257_trains_a_tokenizer_of_bytes_only(tmp_path):
    """257 ids (256 bytes + end-of-text) is the smallest vocabulary allowed, and has no merges: it was taken for a
    tokenizer trained on no text, an error telling to check the corpus path."""
    (tmp_path / "one.txt").write_text(TEXT * 1000)
    config = DataConfig(corpus=str(tmp_path / "one.txt"), val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    tokenizer, shards = prepare_data(config, 257, progress=False, log=lambda *_: None)
    assert tokenizer.get_vocab_size() == 257 and shards.meta["train_tokens"] > len((TEXT * 700).encode())
