"""Passkey retrieval: one number hidden in filler text (the classic long-context sanity check)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from topklab.tasks.base import Draft, Prompt, Task, register
from topklab.tasks.haystack import Haystack


@register("passkey")
@dataclass
class Passkey(Task):
    digits: int = 5
    filler: str = "wiki"

    name = "passkey"
    max_new_tokens = 12

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 12:
            raise ValueError(f"passkey: digits must be in [1, 12], got {self.digits}")

    def draft(self, rng: random.Random, length: int) -> Draft:
        key = str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))
        depth = rng.random()
        haystack = Haystack(rng, self.filler)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def render(size: int) -> Prompt:
            context = haystack.text(size, [(depth, needle)])
            user = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                    f"memorize it. I will quiz you about it afterwards.\n\n{context}\n\nWhat is the pass key?")
            return Prompt(context, user, "The pass key is")

        return Draft((key,), render, min_size=1, max_size=haystack.max_size)
