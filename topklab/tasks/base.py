"""The task protocol, the task registry, scoring functions and prompt encoding.

A task draws the random content of one sample (needles, keys, words) from a seeded generator and renders it at
any *size* (filler sentences, list words); `Task.sample` then picks the largest size whose prompt, encoded with the
model's own tokenizer and chat template, fits the target length. So a sample always fits its length, and the same
seed gives the same sample.

Lengths count the whole sequence: prompt tokens + the answer budget (``max_new_tokens``, the task's own unless
overridden) <= length, as RULER does, so a task evaluated at the model's window never runs past it.

    task = make("niah_multikey")            # or make("passkey", digits=6)
    sample = task.sample(PromptCodec(tokenizer), length=4096, index=0, seed=0)
    task.score(prediction, sample.answers)  # in [0, 1]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

log = logging.getLogger(__name__)


# -- samples and prompts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """What the model reads: ``user`` (instruction + context + question) and the start of its answer."""

    context: str  # the haystack / document part of ``user``, where the answers must be
    user: str
    answer_prefix: str = ""


@dataclass(frozen=True)
class Draft:
    """A sample's random content, renderable at any size in [min_size, max_size]."""

    answers: tuple[str, ...]
    render: Callable[[int], Prompt]
    min_size: int
    max_size: int
    fallback: "Draft | None" = None  # a plainer rendering of the same content, for lengths this one cannot fit


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # target length: len(input_ids) + max_new_tokens <= length
    index: int
    seed: int
    input_ids: tuple[int, ...]  # the full prompt, chat-templated, ready for the model
    text: str  # the same prompt as text
    context: str
    answers: tuple[str, ...]
    max_new_tokens: int
    size: int  # filler units the fitted prompt holds

    @property
    def answer(self) -> str:
        """The answer column: the value, or a JSON list when there are several."""
        return self.answers[0] if len(self.answers) == 1 else json.dumps(list(self.answers))


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255): the fallback for models without a tokenizer (tiny random models)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class PromptCodec:
    """Encodes prompts the way one model reads them: its tokenizer and, when it has one, its chat template.

    ``tokenizer=None`` uses `ByteTokenizer` (the model's vocabulary must hold 256 ids). ``chat=None`` applies the
    chat template whenever the tokenizer has one; the answer prefix follows the assistant turn's opening.
    """

    def __init__(self, tokenizer=None, *, chat: bool | None = None, vocab_size: int | None = None):
        if tokenizer is None and vocab_size is not None and vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(
                f"the byte-level fallback tokenizer needs a vocabulary of >= 256 ids, the model has {vocab_size}; "
                "pass the model's tokenizer"
            )
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.is_bytes = tokenizer is None
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("chat=True but the tokenizer has no chat template")
        self.chat = has_template if chat is None else chat

    def encode(self, text: str) -> list[int]:
        if self.is_bytes:
            return self.tokenizer.encode(text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if self.is_bytes:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render(self, prompt: Prompt) -> str:
        """The full prompt text the model reads."""
        if self.chat:
            opening = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt.user}], tokenize=False,
                                                         add_generation_prompt=True)
            return opening + prompt.answer_prefix
        return prompt.user + ("\n" + prompt.answer_prefix if prompt.answer_prefix else "")

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (the chat template carries its own special tokens; plain text gets BOS)."""
        if self.is_bytes:
            return self.tokenizer.encode(text)
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def eos_ids(self) -> set[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return {eos} if isinstance(eos, int) else set()


# -- scoring ---------------------------------------------------------------------------------------------------
def contains_word(prediction: str, answer: str) -> bool:
    """``answer`` occurs in ``prediction`` as a whole word or number, case-insensitively ("42" is not in "1423")."""
    pattern = rf"(?<![0-9A-Za-z]){re.escape(answer.strip())}(?![0-9A-Za-z])"
    return re.search(pattern, prediction, flags=re.IGNORECASE) is not None


def match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: the share of expected values found in the prediction (partial credit)."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    return sum(contains_word(prediction, a) for a in answers) / len(answers)


# -- the task protocol -------------------------------------------------------------------------------------------
class Task:
    """Base class. Subclasses are ``@dataclass``es (fields = task parameters) registered with `register`, and
    implement `draft`; `score` defaults to `match_all`."""

    #: The registered name (variants registered from one class get theirs from `make`).
    name: str = ""
    #: Tokens the answer may take; the prompt leaves room for them within the target length.
    max_new_tokens: ClassVar[int] = 32
    #: Bump when a change alters the samples, so that cached results are not reused.
    version: ClassVar[int] = 1

    def draft(self, rng: random.Random, length: int) -> Draft:
        raise NotImplementedError

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return match_all(prediction, answers)

    def params(self) -> dict[str, object]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def key(self) -> str:
        """Everything a sample depends on besides length, index and seed (for result caching)."""
        return json.dumps({"task": self.name, "version": self.version, "params": self.params()}, sort_keys=True,
                          default=str)

    def sample(self, codec: PromptCodec, length: int, index: int, seed: int = 0,
               max_new_tokens: int | None = None) -> Sample:
        """Sample ``index`` at ``length`` tokens: the largest rendering whose prompt + answer budget fits."""
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int (tokens), got {length!r}")
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {new_tokens}")
        budget = length - new_tokens
        if self.count is not None and index >= self.count:
            raise ValueError(f"task {self.label!r} has {self.count} samples; index {index} is out of range")
        draft = self.draft_for(length, index, seed)
        while True:
            try:
                size, ids, text, prompt = _fit(draft, codec, budget, self.label, length)
                break
            except TooShortError:
                if draft.fallback is None:
                    raise
                draft = draft.fallback
        return Sample(self.label, length, index, seed, tuple(ids), text, prompt.context, draft.answers, new_tokens, size)

    def draft_for(self, length: int, index: int, seed: int) -> Draft:
        """The random content of sample ``index`` (what `sample` fits to the length)."""
        return self.draft(sample_rng(self.name, length, index, seed), length)

    @property
    def count(self) -> int | None:
        """How many distinct samples exist (None: unlimited, as for generated tasks)."""
        return None

    @property
    def label(self) -> str:
        """The name in result tables (file-backed tasks add their file's name)."""
        return self.name


def sample_rng(task: str, length: int, index: int, seed: int) -> random.Random:
    """The generator of one sample: the same (task, length, index, seed) always draws the same content."""
    digest = hashlib.sha256(f"{task}|{length}|{index}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class TooShortError(ValueError):
    """A length below a task's smallest prompt plus its answer budget."""


def _fit(draft: Draft, codec: PromptCodec, budget: int, name: str, length: int):
    """Largest size in [min_size, max_size] whose prompt has <= budget tokens.

    Tokens grow about linearly with the size, so the search extrapolates from what it has measured (a few
    tokenizer calls instead of a full bisection at long lengths) and bisects only when that stalls.
    """
    cache: dict[int, tuple[int, list[int], str, Prompt]] = {}

    def tokens(size: int) -> int:
        if size not in cache:
            prompt = draft.render(size)
            text = codec.render(prompt)
            ids = codec.prompt_ids(text)
            cache[size] = (len(ids), ids, text, prompt)
        return cache[size][0]

    first, last = draft.min_size, draft.max_size
    if tokens(first) > budget:
        need = tokens(first) + length - budget
        raise TooShortError(
            f"length {length} is too short for task {name!r}: its smallest prompt takes {tokens(first)} tokens and "
            f"the answer {length - budget} more; use a length of at least {need}"
        )
    lo, hi = first, None  # tokens(lo) <= budget < tokens(hi)
    probe = min(last, first + 64)
    rate = max(1e-3, (tokens(probe) - tokens(first)) / max(1, probe - first))
    for attempt in range(64):
        if lo == last or (hi is not None and hi - lo <= 1):
            break
        if hi is None:
            guess = lo + max(1, round((budget - tokens(lo)) / rate))
        elif attempt < 12:
            guess = lo + round((budget - tokens(lo)) * (hi - lo) / (tokens(hi) - tokens(lo)))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), last if hi is None else hi - 1)
        if tokens(guess) <= budget:
            lo = guess
            rate = max(rate / 2, (tokens(lo) - tokens(first)) / max(1, lo - first))
        else:
            hi = guess
    if lo == last and tokens(lo) < 0.9 * budget:
        log.warning("%s at length %d: the filler ran out at %d tokens", name, length, tokens(lo))
    _, ids, text, prompt = cache[lo]
    return lo, ids, text, prompt


# -- the registry ----------------------------------------------------------------------------------------------
REGISTRY: dict[str, type[Task]] = {}
_PRESETS: dict[str, dict[str, object]] = {}


def register(name: str, **preset) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make ``cls`` available as ``name``, built with the parameters ``preset`` (variants of one
    class, e.g. the NIAH flavours, register several names)."""

    def decorate(cls: type[Task]) -> type[Task]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"task name {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
        REGISTRY[name] = cls
        _PRESETS[name] = preset
        return cls

    return decorate


def available() -> list[str]:
    """Registered task names."""
    return sorted(REGISTRY)


def make(spec: str, **params) -> Task:
    """Build a task: ``make("niah_multikey")``, ``make("passkey", digits=6)``; a file-backed task takes its file
    after a colon, ``make("longbench_v2:/data/longbench_v2.jsonl")`` (same as ``path=...``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a task name must be a non-empty string such as 'passkey', got {spec!r}")
    name, _, path = spec.strip().partition(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if path:
        if "path" not in fields:
            raise ValueError(f"task {name!r} takes no file; write just {name!r}")
        params = {"path": path, **params}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for task {name!r}; valid: {', '.join(sorted(fields)) or '(none)'}")
    task = cls(**{**_PRESETS[name], **params})
    task.name = name
    return task


def make_with_filler(spec: str, filler: str | None) -> Task:
    """``make(spec)`` with its haystack text set to ``filler`` ('wiki', a .txt file or folder), for the tasks that
    have one; ``None`` (or a task without a haystack) keeps the task's own."""
    task = make(spec)
    return make(spec, filler=filler) if filler is not None and hasattr(task, "filler") else task


__all__ = [
    "ByteTokenizer", "Draft", "Prompt", "PromptCodec", "REGISTRY", "Sample", "Task", "available", "contains_word",
    "make", "match_all", "register", "sample_rng",
]
