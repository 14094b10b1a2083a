"""Aggregation tasks, where plain Top-k attention is known to suffer (the answer depends on many keys at once).

- ``cwe`` (common words extraction): a numbered list of words where ``num_common`` words repeat ``freq_common``
  times and the others ``freq_uncommon`` times; name the common ones. Below 4096 tokens the frequencies drop to
  6 and 1, as in RULER.
- ``fwe`` (frequent words extraction): coded words with Zipf counts ``floor(size / rank**alpha)``; name the
  ``num_answers`` most frequent (their counts are strictly above the next rank's by construction).

Words that occur in a task's own instructions are never answers, so echoing the question earns nothing.
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass

from topklab.tasks.base import Draft, Prompt, Task, register
from topklab.tasks.haystack import distinct_words, vocabulary

SHORT_CONTEXT = 4096

CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                   "the ones that appear most often.\n{context}\nQuestion: What are the {n} most common words in the "
                   "above list?")
CWE_PREFIX = "Answer: The top {n} words that appear most often in the list are:"
FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. Find the {n} most "
                   "frequently appeared coded words.\n{context}\nQuestion: Do not provide any explanation. What are "
                   "the {n} most frequently appeared words in the above coded text?")
FWE_PREFIX = "Answer: According to the coded text above, the {n} most frequently appeared words are:"


def _instruction_words(*templates: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+", " ".join(templates).lower()))


@register("cwe")
@dataclass
class CommonWords(Task):
    num_common: int = 10
    freq_common: int = 30
    freq_uncommon: int = 3
    filler: str = "wiki"  # the text whose vocabulary the words come from

    name = "cwe"
    max_new_tokens = 120
    version = 2  # 2: at least num_common uncommon words, the short layout where the long one cannot fit

    def __post_init__(self) -> None:
        if self.num_common < 1 or not self.freq_common > self.freq_uncommon >= 1:
            raise ValueError("cwe: need num_common >= 1 and freq_common > freq_uncommon >= 1")

    def draft(self, rng: random.Random, length: int) -> Draft:
        banned = _instruction_words(CWE_INSTRUCTION, CWE_PREFIX)
        words = [w for w in distinct_words(rng, len(vocabulary(self.filler)), self.filler) if w not in banned]
        common, uncommon = words[: self.num_common], words[self.num_common :]
        seed = rng.random()

        def layout(freq_common: int, freq_uncommon: int, fallback: Draft | None = None) -> Draft:
            def render(size: int) -> Prompt:
                items = common * freq_common + uncommon[:size] * freq_uncommon
                random.Random(f"{seed}|{size}").shuffle(items)
                context = " ".join(f"{i + 1}. {word}" for i, word in enumerate(items))
                user = CWE_INSTRUCTION.format(context=context, n=self.num_common)
                return Prompt(context, user, CWE_PREFIX.format(n=self.num_common))

            # at least as many uncommon words as common ones (as RULER), or the task is near trivial
            return Draft(tuple(common), render, min_size=self.num_common, max_size=len(uncommon), fallback=fallback)

        short = layout(6, 1)  # RULER's frequencies below 4K tokens, and where the long ones do not fit
        return short if length < SHORT_CONTEXT else layout(self.freq_common, self.freq_uncommon, fallback=short)


@register("fwe")
@dataclass
class FrequentWords(Task):
    alpha: float = 2.0
    num_answers: int = 3
    vocab: int = 1000  # distinct coded words available

    name = "fwe"
    max_new_tokens = 50

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.num_answers < 1 or self.vocab <= self.num_answers:
            raise ValueError("fwe: need alpha > 0, num_answers >= 1 and vocab > num_answers")

    def _counts(self, size: int) -> list[int]:
        counts = [int(size / rank**self.alpha) for rank in range(1, self.vocab + 1)]
        return [c for c in counts if c > 0]

    def draft(self, rng: random.Random, length: int) -> Draft:
        banned = _instruction_words(FWE_INSTRUCTION, FWE_PREFIX)
        coded: set[str] = set()
        while len(coded) < self.vocab:
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))
            if word not in banned:
                coded.add(word)
        words = sorted(coded)
        rng.shuffle(words)
        seed = rng.random()
        # from this size on, the last answer's unfloored count beats the next rank's by >= 1, so the floors differ
        r = self.num_answers
        smallest = math.ceil(1 / (r**-self.alpha - (r + 1) ** -self.alpha))

        def render(size: int) -> Prompt:
            items = [w for w, c in zip(words, self._counts(size)) for _ in range(c)]
            random.Random(f"{seed}|{size}").shuffle(items)
            context = " ".join(items)
            user = FWE_INSTRUCTION.format(context=context, n=self.num_answers)
            return Prompt(context, user, FWE_PREFIX.format(n=self.num_answers))

        return Draft(tuple(words[: self.num_answers]), render, min_size=smallest, max_size=1 << 24)
