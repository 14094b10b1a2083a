"""Filler text and word pools for the synthetic tasks, from the bundled real text (`topklab.text`).

Filler is prose cut into sentences; a haystack is a run of consecutive sentences starting at a seeded offset, with
needles inserted between sentences at given depths. Sentences holding long digit runs are dropped, so a number
needle can only be found where it was put.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Sequence

from topklab.text import load_texts

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_LONG_NUMBER = re.compile(r"\d{4,}")
_WORD = re.compile(r"(?<![A-Za-z])[a-z]{4,10}(?![A-Za-z])")
@functools.lru_cache(maxsize=4)
def sentences(source: str = "wiki") -> tuple[str, ...]:
    """The filler sentences of ``source`` ('wiki', 'news', a .txt file or a folder of them), in text order."""
    out = []
    for doc in load_texts(source):
        for paragraph in doc.text.split("\n"):
            paragraph = paragraph.strip()
            if not paragraph or paragraph[0] in "=*|{}!#:;" or paragraph.count("|") > 1:
                continue  # headings, lists, tables
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = " ".join(sentence.split())
                if 20 <= len(sentence) <= 400 and not _LONG_NUMBER.search(sentence):
                    out.append(sentence)
    if len(out) < 100:
        raise ValueError(f"text source {source!r} gives only {len(out)} usable sentences; filler needs at least 100")
    return tuple(out)


@functools.lru_cache(maxsize=4)
def vocabulary(source: str = "wiki", min_count: int = 3) -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters, seen >= ``min_count`` times) of ``source``, sorted."""
    counts = Counter(w for s in sentences(source) for w in _WORD.findall(s))
    return tuple(sorted(w for w, c in counts.items() if c >= min_count))


class Haystack:
    """Consecutive filler sentences from a seeded offset; ``text(n, needles)`` renders n of them with needles."""

    def __init__(self, rng: random.Random, source: str = "wiki"):
        self.pool = sentences(source)
        self.start = rng.randrange(len(self.pool))

    @property
    def max_size(self) -> int:
        return len(self.pool)

    def text(self, n: int, needles: Sequence[tuple[float, str]] = ()) -> str:
        """n filler sentences with each (depth in [0, 1], needle) inserted before sentence round(depth * n)."""
        pool, start = self.pool, self.start
        parts = [pool[(start + i) % len(pool)] for i in range(n)]
        for depth, needle in sorted(needles, key=lambda item: item[0], reverse=True):
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle depth must be in [0, 1], got {depth}")
            parts.insert(round(depth * n), needle)
        return " ".join(parts)


def distinct_words(rng: random.Random, count: int, source: str = "wiki") -> list[str]:
    """``count`` distinct words of the source's vocabulary, in seeded random order."""
    pool = vocabulary(source)
    if count > len(pool):
        raise ValueError(f"asked for {count} distinct words but the {source!r} vocabulary has {len(pool)}")
    return rng.sample(pool, count)


__all__ = ["Haystack", "distinct_words", "sentences", "vocabulary"]
