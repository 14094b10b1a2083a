"""Long-context tasks and the evaluation harness behind `topklab eval`.

Generated, RULER-style (offline, filler from the bundled Wikipedia text, deterministic by seed, fitted to a target
length with the model's own tokenizer): ``passkey``, ``niah_single``, ``niah_multikey``, ``niah_multivalue``,
``niah_multiquery``, ``vt`` (variable tracking), ``cwe`` / ``fwe`` (common / frequent words extraction).
From local files (see `topklab.tasks.loaders`): ``longbench_v2:PATH``, ``helmet:PATH``.

    from topklab.tasks import PromptCodec, make
    task = make("niah_multikey")
    sample = task.sample(PromptCodec(tokenizer), length=4096, index=0, seed=0)
    task.score("... 1234567 ...", sample.answers)

The harness (`topklab.tasks.evaluate`): `run_evaluation(EvalConfig(...))` and `read_results(out)`.
"""

from topklab.tasks import aggregation, loaders, niah, passkey, variable_tracking  # noqa: F401  (registers the tasks)
from topklab.tasks.base import (
    ByteTokenizer,
    Draft,
    Prompt,
    PromptCodec,
    Sample,
    Task,
    available,
    contains_word,
    make,
    make_with_filler,
    match_all,
    register,
)

__all__ = [
    "ByteTokenizer", "Draft", "Prompt", "PromptCodec", "Sample", "Task", "available", "contains_word", "make",
    "make_with_filler", "match_all", "register",
]
