"""Variable tracking (RULER's multi-hop task): chains of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ...
scattered in filler text; the answer is every variable of the queried chain."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from topklab.tasks.base import Draft, Prompt, Task, register
from topklab.tasks.haystack import Haystack


@register("vt")
@dataclass
class VariableTracking(Task):
    num_chains: int = 1  # the queried chain plus distractor chains
    num_hops: int = 4  # assignments after the first: a chain names num_hops + 1 variables
    filler: str = "wiki"

    name = "vt"
    max_new_tokens = 30

    def __post_init__(self) -> None:
        if self.num_chains < 1 or self.num_hops < 1:
            raise ValueError("vt: num_chains and num_hops must be >= 1")

    def draft(self, rng: random.Random, length: int) -> Draft:
        names: set[str] = set()
        while len(names) < self.num_chains * (self.num_hops + 1):
            names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
        names = sorted(names)
        rng.shuffle(names)
        values = [str(v) for v in rng.sample(range(10_000, 100_000), self.num_chains)]
        needles, chains = [], []
        for c, value in enumerate(values):
            chain = names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)]
            statements = [f"VAR {chain[0]} = {value}."]
            statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            needles += zip(sorted(rng.random() for _ in statements), statements)
            chains.append(chain)
        haystack = Haystack(rng, self.filler)
        answers = tuple(chains[0])
        query = values[0]

        def render(size: int) -> Prompt:
            context = haystack.text(size, needles)
            user = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    f"{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
            prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {len(answers)} "
                      f"variables are assigned the value {query}, they are:")
            return Prompt(context, user, prefix)

        return Draft(answers, render, min_size=1, max_size=haystack.max_size)
