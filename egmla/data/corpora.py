"""Corpora: where training text comes from. Each corpus is an ordered stream of documents `(key, text)`.

    embedded        ~11 MB of public-domain English (Shakespeare, Milton) shipped inside the package
    python-source   the *.py files of this Python installation (stdlib + site-packages), no download; each
                    content once (vendored and base-interpreter copies are the same text under other names)
    PATH or GLOB    local .txt / .jsonl (a text field) / .parquet files, read with `datasets` (comma-separated ok)
                    (suffixes in any case: .TXT too; a .txt file's leading byte-order mark is left out)
    hf:NAME         a Hugging Face hub dataset, streamed (e.g. hf:HuggingFaceFW/fineweb-edu)

Documents are cut into chunks of about CHUNK_BYTES at line ends. `data.split` says what is held out:
  chunk     a chunk goes to validation when a hash of `key@index` falls below `val_fraction` (works for a
            corpus that is one big file; a document's chunks can land on both sides)
  document  a whole document goes to validation when a hash of its key does (python-source: by file, so
            no validation text comes from a file that is also trained on)
Either way the split is deterministic and independent of the order or number of documents.
"""
from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import itertools
import json
import logging
import lzma
import os
import site
import socket
import sysconfig
from pathlib import Path
from typing import Iterator

from egmla.data.config import DataConfig

CHUNK_BYTES = 16 * 1024
# Bump when what a corpus yields for the same files changes (it keys the tokenizer and shard caches). v2 (2026-12-05):
# python-source keeps each content once and leaves out a stdlib folder's own unimportable site-packages; local files
# are keyed by file; a max_bytes cap cuts the last document instead of dropping it.
CORPUS_RECIPE = "corpora-v2"
PYTHON_FILE_MAX_BYTES = 1 << 20  # larger .py files are mostly generated tables
HUB_PROBE_TIMEOUT_S = 3.0  # no answer from the hub in this time: offline
LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
UTF8_BOM = b"\xef\xbb\xbf"  # left out of a local text file's text (as Python's 'utf-8-sig' reads it)

Document = tuple[str, str]  # (stable key, text)


def local_builder(path: Path) -> str | None:
    """The `datasets` builder reading a local corpus file, by its suffix in any case (.TXT, .Jsonl), or None."""
    return LOCAL_BUILDERS.get(path.suffix.lower())


class CorpusError(ValueError):
    """A corpus problem this module has already put in one line (others are translated to one)."""


# ---- the corpora -----------------------------------------------------------------------------
def embedded_documents() -> Iterator[Document]:
    from egmla.data.build_embedded import EMBEDDED_PATH, decode_documents

    if not EMBEDDED_PATH.is_file():
        raise ValueError(f"data.corpus='embedded': {EMBEDDED_PATH} is missing from this installation; "
                         f"rebuild it with `python -m egmla.data.build_embedded`")
    yield from decode_documents(lzma.decompress(EMBEDDED_PATH.read_bytes()).decode("utf-8"))


def python_source_roots() -> list[tuple[str, Path]]:
    """(label, folder) of the installation's library folders, most specific label for nested ones."""
    paths = sysconfig.get_paths()
    candidates = [("purelib", paths.get("purelib")), ("platlib", paths.get("platlib")),
                  ("stdlib", paths.get("stdlib")), ("platstdlib", paths.get("platstdlib"))]
    candidates += [(f"site{i}", p) for i, p in enumerate(site.getsitepackages())]
    roots, seen = [], set()
    for label, path in candidates:
        if path and os.path.isdir(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            roots.append((label, Path(os.path.realpath(path))))
    return roots


def python_source_files(roots: list[tuple[str, Path]] | None = None) -> list[tuple[str, Path, int]]:
    """(key, path, size) of every *.py file under the roots, each file once, keyed `label/relative/path`,
    in sorted key order. Nested roots are walked on their own (never twice); symlinked folders are
    not followed. The listing is remembered per process (preparing data asks for it several times)."""
    return list(_list_python_files(tuple(roots if roots is not None else python_source_roots())))


@functools.lru_cache(maxsize=4)
def _list_python_files(roots: tuple[tuple[str, Path], ...]) -> tuple[tuple[str, Path, int], ...]:
    root_paths = {str(path) for _, path in roots}
    # a stdlib folder's own site-packages is importable only where it is a root itself (in a venv it is not:
    # the base interpreter's packages, often other versions of the venv's)
    packages = {str(path / name) for label, path in roots if "stdlib" in label
                for name in ("site-packages", "dist-packages")}
    files: dict[tuple[int, int], tuple[str, Path, int]] = {}  # (device, inode) -> file: hard/sym links once

    def walk(folder: str, label: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__" and entry.path not in root_paths and entry.path not in packages:
                        walk(entry.path, label, f"{prefix}{entry.name}/")
                elif entry.name.endswith(".py"):
                    info = entry.stat()
                    if 0 < info.st_size <= PYTHON_FILE_MAX_BYTES:
                        files.setdefault((info.st_dev, info.st_ino),
                                         (f"{label}/{prefix}{entry.name}", Path(entry.path), info.st_size))
            except OSError:
                continue

    for label, root in roots:
        walk(str(root), label, "")
    return tuple(sorted(files.values()))


def python_source_documents(max_bytes: int = 0, roots=None) -> Iterator[Document]:
    """The files in an order fixed by a hash of their key, so a size cap takes an unbiased sample (the last file cut
    at the cap); a content found under several keys (a vendored copy: pip/_vendor/urllib3 beside urllib3) only
    under the smallest, so that no text is both trained on and held out."""
    files = python_source_files(roots)
    keep = _first_of_each_content(files)

    def documents() -> Iterator[Document]:
        for key, path, _ in sorted(files, key=lambda f: _hash64(f[0])):
            if key in keep:
                try:
                    yield key, path.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue  # unreadable or not UTF-8: skip, deterministically

    yield from _capped(documents(), max_bytes)


def _first_of_each_content(files: list[tuple[str, Path, int]]) -> set[str]:
    """The keys to keep: every file but those whose bytes equal a file of a smaller key (only files of a size that
    occurs more than once are read for it)."""
    sizes: dict[int, int] = {}
    for _, _, size in files:
        sizes[size] = sizes.get(size, 0) + 1
    owner: dict[tuple[int, bytes], str] = {}
    keep = set()
    for key, path, size in files:  # sorted by key: the first holder of a content is its smallest key
        if sizes[size] == 1:
            keep.add(key)
            continue
        try:
            digest = (size, hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            continue
        if digest not in owner:
            owner[digest] = key
            keep.add(key)
    return keep


def _glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), except that `**` does not enter symlinked folders (as a folder's walk does
    not): glob's `**` follows them without noticing a loop, and a link to a parent folder made it run for ever."""
    if "**" not in pattern:
        return glob.glob(pattern)
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root, rest = Path(*parts[:fixed]) if fixed else Path(), parts[fixed:]
    hidden_ok = any(part.startswith(".") for part in rest)  # as glob: wildcards match no hidden name unless asked
    return [str(path) for path in root.glob(str(Path(*rest)))
            if hidden_ok or not any(part.startswith(".") for part in path.relative_to(root).parts)]


def resolve_local_files(spec: str) -> list[Path]:
    """Files named by a comma-separated list of paths, globs (** ok) or folders; sorted, existing only, each file once
    (a file reached twice, through a symlink or under two names, would be trained on twice)."""
    files: dict[str, Path] = {}  # real path -> the first name it was found under
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        matches = sorted(_glob(os.path.expanduser(part)))
        if not matches:
            raise ValueError(f"data.corpus={spec!r}: {part!r} does not exist and matches no file; "
                             f"give a .txt/.jsonl/.parquet path or glob, 'embedded', 'python-source' or 'hf:NAME'")
        for match in map(Path, matches):
            if match.is_dir():
                found = sorted(p for p in match.rglob("*") if local_builder(p) and p.is_file())
            elif match.is_file():
                found = [match]
            elif match.is_symlink():
                raise ValueError(f"data.corpus={spec!r}: {match} is a symbolic link to {os.readlink(match)!r}, "
                                 f"which does not exist; fix the link or leave it out")
            else:
                found = []
            for path in found:
                files.setdefault(os.path.realpath(path), path)
    if not files:
        raise ValueError(f"data.corpus={spec!r}: no .txt, .jsonl or .parquet file there")
    for path in files.values():
        if local_builder(path) is None:
            raise ValueError(f"data.corpus={spec!r}: {path} has suffix {path.suffix!r}; "
                             f"supported: {', '.join(LOCAL_BUILDERS)} (in any case)")
    return sorted(files.values())


def dataset_documents(path: str, data_files: list[str] | None, config: DataConfig, source: str,
                      max_bytes: int) -> Iterator[Document]:
    """Rows of a `datasets` dataset, streamed: the one code path for local files and hub datasets."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"data.corpus={config.corpus!r} needs the `datasets` library (pip install datasets); "
                         f"'embedded' and 'python-source' work without it") from None
    if data_files is None:  # a hub dataset
        check_hub_reachable(config.corpus)
        name, split = config.hf_config or None, config.hf_split
    else:  # local files are the one split of the default configuration: data.hf_* name a hub dataset's, not theirs
        name, split = None, "train"
    # a local text file is one document; 'utf-8-sig' leaves out a leading byte-order mark, which 'utf-8' kept as
    # U+FEFF at the start of the text (the json builder's reader skips it already)
    kwargs = {"sample_by": "document", "encoding": "utf-8-sig"} if path == "text" else {}
    field = "text" if path == "text" else config.text_field  # a .txt file's text is its whole content, always
    stream = datasets.load_dataset(path, name=name, data_files=data_files, split=split, streaming=True, **kwargs)
    def documents() -> Iterator[Document]:
        for row in stream:
            if field not in row:
                raise CorpusError(f"data.text_field={field!r}: {source} rows have fields "
                                 f"{sorted(row)}; set data.text_field to the one holding the text")
            text = row[field]
            if text is not None and not isinstance(text, str):  # a number, list or record: not the text field
                raise CorpusError(f"data.text_field={field!r}: {source} rows hold {type(text).__name__} values "
                                 f"there, not text (e.g. {repr(text)[:40]}); set data.text_field to the field "
                                 f"holding the text")
            if text:  # keyed by content: a row's side of the split does not move when
                # rows or files are added before it, and a text repeated anywhere is held out (or not) everywhere
                yield f"{source}#{hashlib.sha256(text.encode()).hexdigest()[:24]}", text

    yield from _capped(documents(), max_bytes)


def check_hub_reachable(corpus: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Raise CorpusError in one line within seconds when the hub cannot be reached (`datasets` would retry for half a
    minute, then print a long traceback): HF_HUB_OFFLINE set, or no TCP connection to the endpoint."""
    import threading
    from urllib.parse import urlparse

    local = ("train on local files instead, e.g. --set data.corpus='texts/*.txt' (.txt, .jsonl or .parquet), "
             "or data.corpus='embedded'")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise CorpusError(f"data.corpus={corpus!r}: HF_HUB_OFFLINE is set, so the hub cannot be read; {local}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    address = (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    outcome: list = []

    def probe():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or str(err))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    problem = outcome[0] if outcome else f"no answer in {timeout_s:.0f} s"
    if problem is not None:
        raise CorpusError(f"data.corpus={corpus!r}: the Hugging Face hub ({address[0]}) is not reachable "
                         f"({problem}); {local}")


def unreadable_file(path: Path) -> str | None:
    """Why a local corpus file cannot be read as its suffix says (binary or non-UTF-8 text, bad JSON
    lines, not parquet), or None. Called when `datasets` fails, to name the file."""
    if local_builder(path) == "parquet":
        import pyarrow.parquet

        try:
            pyarrow.parquet.read_metadata(path)
        except Exception as err:
            return f"{path} is not a parquet file ({str(err).splitlines()[0]})"
        return None
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = offset + err.start - (len(err.object) - len(chunk))
                return f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {at}): binary or " \
                       f"another encoding; convert it (e.g. iconv -t utf-8) or leave it out"
            offset += len(chunk)
    if local_builder(path) == "json":
        with open(path, encoding="utf-8-sig") as f:  # a leading byte-order mark is no fault (`datasets` skips it)
            for number, line in enumerate(f, 1):
                try:  # a string or number on a line parses, but is no row (one .json document may be an array)
                    if line.strip() and not isinstance(json.loads(line), dict) and path.suffix.lower() == ".jsonl":
                        raise ValueError("not an object")
                except ValueError:
                    return f"{path} line {number} is not a JSON object (a .jsonl file holds one per line)"
    return None


def json_types(value, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, JSON type) of a parsed row's fields, nested objects' fields as `a.b` (nulls carry no type)."""
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{path}.{key}" if path else str(key)
            if item is not None:
                yield name, "boolean" if isinstance(item, bool) else "number" if isinstance(item, (int, float)) \
                    else "string" if isinstance(item, str) else "array" if isinstance(item, list) else "object"
            yield from json_types(item, name)


def mixed_field_types(files: list[Path], rows_per_file: int = 1000) -> str | None:
    """Where a field has one JSON type in one file and another in the next (`datasets` reads the files with one
    schema and says only "Couldn't cast"): which field, which files, and what to do; or None."""
    seen: dict[str, tuple[str, Path]] = {}
    for path in files:
        with open(path, encoding="utf-8-sig") as f:
            if path.suffix.lower() == ".jsonl":
                rows = (json.loads(line) for line in itertools.islice(f, rows_per_file) if line.strip())
            else:
                document = json.load(f)
                rows = document[:rows_per_file] if isinstance(document, list) else [document]
            for row in rows:
                for name, kind in json_types(row):
                    first = seen.setdefault(name, (kind, path))
                    if first[0] != kind:
                        where = f"in {first[1]} and {kind} in {path}" if first[1] != path else f"and {kind} in {path}"
                        return (f"field {name!r} is {first[0]} {where}: `datasets` reads a corpus's JSON files with "
                                f"one type per field, even those it does not train on; make that field one type "
                                f"in every file, or drop it from them")
    return None


def hub_documents(config: DataConfig) -> Iterator[Document]:
    try:
        yield from dataset_documents(config.corpus[3:], None, config, source=config.corpus, max_bytes=config.max_bytes)
    except CorpusError:
        raise
    except Exception as err:  # a missing dataset, a dropped connection: one line, not datasets' traceback
        raise ValueError(f"data.corpus={config.corpus!r}: the hub dataset could not be read ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})") from None


def local_documents(config: DataConfig) -> Iterator[Document]:
    by_builder: dict[str, list[Path]] = {}
    for path in resolve_local_files(config.corpus):
        by_builder.setdefault(local_builder(path), []).append(path)
    for builder in by_builder:  # their failures are reported below, in one line naming the file
        logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}").setLevel(logging.CRITICAL)
    remaining = config.max_bytes
    for builder, files in sorted(by_builder.items()):
        files = [path for path in files if path.stat().st_size]  # an empty .jsonl alone made `datasets` fail unclearly
        if not files:
            continue
        try:
            for key, text in dataset_documents(builder, list(map(str, files)), config, source=builder,
                                               max_bytes=remaining):
                remaining = remaining - len(text) if config.max_bytes else 0
                yield key, text
        except CorpusError:
            raise
        except Exception as err:  # datasets' errors (a UnicodeDecodeError too) do not say which file: find it
            problem = next(filter(None, map(unreadable_file, files)), None)
            if problem is None and builder == "json":
                problem = mixed_field_types(files)
            raise ValueError(f"data.corpus={config.corpus!r}: "
                             + (problem or f"reading the {builder} files failed: {str(err).splitlines()[0]}")) from None
        if config.max_bytes and remaining <= 0:
            return


def iter_documents(config: DataConfig) -> Iterator[Document]:
    """The corpus named by config.corpus, capped at config.max_bytes of text (0 = no cap)."""
    corpus = config.corpus.strip()
    if corpus == "embedded":
        return _capped(embedded_documents(), config.max_bytes)
    if corpus == "python-source":
        return python_source_documents(config.max_bytes)
    if corpus.startswith("hf:"):
        return hub_documents(config)
    return local_documents(config)


def corpus_fingerprint(config: DataConfig) -> str:
    """A cheap identity of the corpus (no full read): what the tokenizer and shard caches are keyed by.

    embedded: the shipped file's hash; python-source: paths, sizes and mtimes; local files: paths, sizes, mtimes,
    inodes and ctimes (a file replaced by one of the same size and mtime, as `cp -p`, `rsync -t` or `touch -r` leave
    it, gets another inode or ctime: no user sets those); hub datasets: name, config and split (a changed hub dataset
    needs a new data.cache_dir)."""
    corpus = config.corpus.strip()
    parts: dict = {"corpus": corpus, "max_bytes": config.max_bytes, "text_field": config.text_field,
                   "recipe": CORPUS_RECIPE}
    if corpus == "embedded":
        from egmla.data.build_embedded import EMBEDDED_PATH

        parts["sha256"] = hashlib.sha256(EMBEDDED_PATH.read_bytes()).hexdigest() if EMBEDDED_PATH.is_file() else ""
    elif corpus == "python-source":
        parts["files"] = [(key, size, path.stat().st_mtime_ns) for key, path, size in python_source_files()]
    elif corpus.startswith("hf:"):
        parts.update(hf_config=config.hf_config, hf_split=config.hf_split)
    else:
        files = resolve_local_files(corpus)
        parts["files"] = [(str(p.resolve()), info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)
                          for p in files for info in [p.stat()]]
        if any(local_builder(p) == "text" and _starts_with_bom(p) for p in files):
            # the text given to the tokenizer lost its byte-order mark on 2026-12-07: caches built before kept it
            parts["text_bom"] = "stripped"
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _starts_with_bom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(UTF8_BOM)) == UTF8_BOM
    except OSError:
        return False


# ---- chunks and the train/val split --------------------------------------------------------------
def _capped(documents: Iterator[Document], max_bytes: int) -> Iterator[Document]:
    total = 0
    for key, text in documents:
        if max_bytes and total + len(text) > max_bytes:
            text = text[: max(0, max_bytes - total)]
            if text:
                yield key, text
            return
        total += len(text)
        yield key, text


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def is_validation(key: str, val_fraction: float) -> bool:
    return _hash64(key) < val_fraction * 2**64


def is_validation_document(key: str, val_fraction: float) -> bool:
    """split='document': a keyed BLAKE2b of the document key, a hash independent of the one that orders
    python-source files (_hash64, sha256), so a size cap that keeps a hash-ordered prefix of the files does
    not also pick which of them are held out."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"egmla-val-split").digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def chunk_text(text: str, size: int = CHUNK_BYTES) -> list[str]:
    """Pieces of about `size` characters, cut after a newline where there is one."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start + size // 2, end)
            end = newline + 1 if newline >= 0 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def empty_split_advice(config: DataConfig) -> tuple[str, str, str]:
    """(the settings, how they hold text out, what to change) for an error about a split left empty."""
    if config.split == "document":
        return (f"data.val_fraction={config.val_fraction}, data.split='document'", "as whole documents",
                "use more documents, or data.split='chunk' to hold out chunks of each")
    return (f"data.val_fraction={config.val_fraction}", f"by chunks of {CHUNK_BYTES:,}",
            "use more text or change data.val_fraction")


def split_chunks(documents: Iterator[Document], val_fraction: float,
                 by: str = "chunk") -> Iterator[tuple[str, str, bool]]:
    """(split, chunk text, ends_run) for every chunk; split is 'train' or 'val', decided by the hash of
    `key@chunk_index` (by='chunk') or of the document's key (by='document': data.split). ends_run: the chunk ends
    its document's run of consecutive chunks in that split (the document's last chunk, or the next one goes to
    the other split): an end-of-text separator follows it there, so that a split's stream never runs one document's
    text into another's (or into a later, non-adjacent part of the same one) unmarked."""
    for key, text in documents:
        pieces = chunk_text(text)
        whole = by == "document" and is_validation_document(key, val_fraction)
        splits = ["val" if (whole if by == "document" else is_validation(f"{key}@{index}", val_fraction)) else "train"
                  for index in range(len(pieces))]
        for index, piece in enumerate(pieces):
            yield splits[index], piece, index == len(pieces) - 1 or splits[index + 1] != splits[index]
