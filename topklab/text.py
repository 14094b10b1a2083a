"""Real English text that loads offline: the Wikipedia articles and news prose bundled with gensim's test data."""

from __future__ import annotations

import bz2
import functools
import re
from dataclasses import dataclass
from pathlib import Path

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def _gensim_data(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise ImportError("the bundled text needs gensim: pip install 'topklab[hf]' (or pip install gensim)") from err
    path = Path(datapath(name))
    if not path.is_file():
        raise FileNotFoundError(f"gensim's bundled file {path} is missing; reinstall gensim")
    return path


@functools.lru_cache(maxsize=1)
def wikipedia(min_chars: int = 20_000) -> tuple[Document, ...]:
    """Wikipedia articles (markup stripped) of at least ``min_chars`` characters, in file order (~57 articles)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.BZ2File(_gensim_data(_WIKI_FILE)) as handle:
        for title, markup, *_ in extract_pages(handle):
            text = _clean(filter_wiki(markup))
            if len(text) >= min_chars:
                docs.append(Document(title, text))
    return tuple(docs)


def news() -> Document:
    """The Lee news corpus as one document (~360 KB of prose)."""
    return Document("lee_background", _gensim_data(_NEWS_FILE).read_text(encoding="utf-8", errors="replace"))


def load_texts(source: str) -> tuple[Document, ...]:
    """``wiki`` (bundled Wikipedia), ``news`` (bundled news prose), a .txt file, or a folder of .txt files."""
    if source == "wiki":
        return wikipedia()
    if source == "news":
        return (news(),)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files in folder {path}")
        return tuple(Document(f.stem, f.read_text(encoding="utf-8")) for f in files)
    if path.is_file():
        return (Document(path.stem, path.read_text(encoding="utf-8")),)
    raise ValueError(f"unknown text source {source!r}: use 'wiki', 'news', a .txt file or a folder of .txt files")


def _clean(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
