"""Needle in a haystack, RULER's four flavours: one key, distractor keys, several values of one key, several
queried keys. Needles are "One of the special magic numbers for <key> is: <7-digit number>." at random depths;
keys are two words of the filler's vocabulary joined by a hyphen."""

from __future__ import annotations

import random
from dataclasses import dataclass

from topklab.tasks.base import Draft, Prompt, Task, register
from topklab.tasks.haystack import Haystack, distinct_words


@register("niah_single")
@register("niah_multikey", num_keys=4)
@register("niah_multivalue", num_values=4)
@register("niah_multiquery", num_keys=4, num_queries=4)
@dataclass
class NeedleInHaystack(Task):
    num_keys: int = 1  # keys with needles (the queried ones and distractors)
    num_values: int = 1  # needles (values) per key
    num_queries: int = 1  # keys asked for; their values are the answers
    filler: str = "wiki"

    name = "niah_single"  # make() names the registered variant
    max_new_tokens = 48

    def __post_init__(self) -> None:
        if min(self.num_keys, self.num_values, self.num_queries) < 1:
            raise ValueError("niah: num_keys, num_values and num_queries must be >= 1")
        if self.num_queries > self.num_keys:
            raise ValueError(f"niah: num_queries ({self.num_queries}) cannot exceed num_keys ({self.num_keys})")

    def draft(self, rng: random.Random, length: int) -> Draft:
        words = distinct_words(rng, 2 * self.num_keys, self.filler)
        keys = [f"{a}-{b}" for a, b in zip(words[::2], words[1::2])]
        values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), self.num_keys * self.num_values)]
        needles = [(rng.random(), f"One of the special magic numbers for {key} is: {values[i * self.num_values + j]}.")
                   for i, key in enumerate(keys) for j in range(self.num_values)]
        haystack = Haystack(rng, self.filler)
        queried = keys[: self.num_queries]
        answers = tuple(values[: self.num_queries * self.num_values])
        several = len(answers) > 1
        subject = ", ".join(queried[:-1]) + " and " + queried[-1] if len(queried) > 1 else queried[0]
        noun = "numbers" if several else "number"
        if several:
            question = f"What are all the special magic numbers for {subject} mentioned in the provided text?"
            prefix = f"The special magic numbers for {subject} mentioned in the provided text are"
        else:
            question = f"What is the special magic number for {subject} mentioned in the provided text?"
            prefix = f"The special magic number for {subject} mentioned in the provided text is"

        def render(size: int) -> Prompt:
            context = haystack.text(size, needles)
            user = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize them. I will "
                    f"quiz you about the {noun} afterwards.\n{context}\n{question}")
            return Prompt(context, user, prefix)

        return Draft(answers, render, min_size=1, max_size=haystack.max_size)
