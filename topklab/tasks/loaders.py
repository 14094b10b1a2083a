"""LongBench v2 and HELMET from local files, as tasks of the same harness (no hub access needed).

Files are JSONL (one JSON object per line) or JSON (a list of objects, or ``{"data": [...]}`` as HELMET's .json
files). Sample ``i`` of a task is record ``order[i]``, ``order`` a seeded permutation of the file's records, so
``--samples N`` takes the same N records for every length. A context too long for the target length is cut in the
middle (its head and tail kept, joined by " ... "), as LongBench v2's own harness does.

LongBench v2 (``longbench_v2:PATH``; THUDM/LongBench-v2's data.json, 503 multiple-choice questions). Fields:
    question (str), choice_A, choice_B, choice_C, choice_D (str), answer ("A".."D"), context (str);
    optional and ignored: _id, domain, sub_domain, difficulty, length.
    Prompt: LongBench v2's zero-shot template. Score: 1 if the chosen letter (parsed from "The correct answer
    is (X)", else the first standalone A-D) equals ``answer``.

HELMET (``helmet:PATH``; one preprocessed file of princeton-nlp/HELMET per dataset). Each record has one of:
    - retrieval QA (kilt_nq, kilt_triviaqa, kilt_hotpotqa, kilt_popqa): question (str), answers (list[str]),
      ctxs (list of {"title": str, "text": str}); the passages become the context.
    - JSON key-value retrieval (json_kv): context (str, the JSON object), question (str, the key), answer (str),
      num_kvs (int; marks the format).
    - RULER-style and generic: context (str), question or query (str, may be empty), and answer (str or
      list[str]) or outputs (list[str]).
    Score: HELMET's substring exact match (an answer, normalised like SQuAD, inside the normalised prediction;
    best over answers), or for ``outputs`` records RULER's recall (the share of outputs found).
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from topklab.tasks.base import Draft, Prompt, Task, match_all, register

LONGBENCH_V2_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
    "What is the correct answer to this question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
HELMET_QA_TEMPLATE = ("Use the given documents to write a concise and short answer to the question. Write your answer "
                      "in the following format:\nAnswer: [answer]\n\n{context}\n\nQuestion: {question}")
HELMET_KV_TEMPLATE = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
                      "Key: {question}")
GENERIC_TEMPLATE = "{context}\n\n{question}"


def read_records(path: str | Path) -> list[dict]:
    """The records of a .jsonl or .json file, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); a .jsonl file holds one JSON object "
                                 "per line") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        records = data["data"] if isinstance(data, dict) and "data" in data else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}")
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .json")
    if not records:
        raise ValueError(f"{path} holds no records")
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {number} is a {type(record).__name__}, expected a JSON object")
    return records


def cut_middle(text: str, size: int) -> str:
    """``text`` if it has <= size characters, else its first and last size/2 characters around " ... "."""
    if size >= len(text):
        return text
    head = size // 2
    return text[:head] + " ... " + text[len(text) - (size - head):]


@dataclass
class FileTask(Task):
    """A task read from a local file: one record per sample, the context cut in the middle to fit."""

    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"task {self.name or type(self).__name__} needs a data file: write NAME:PATH")
        self.records  # read and check the file now, not in the middle of a run

    @functools.cached_property
    def records(self) -> list[dict]:
        records = read_records(self.path)
        for number, record in enumerate(records):
            missing = self.missing_fields(record)
            if missing:
                raise ValueError(f"{self.path}: record {number} lacks field(s) {', '.join(missing)}; "
                                 f"see topklab.tasks.loaders for the expected format")
        return records

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def label(self) -> str:
        return f"{self.name}:{Path(self.path).stem}"

    def key(self) -> str:
        stat = Path(self.path).stat()
        return json.dumps({"task": self.name, "version": self.version, "file": str(Path(self.path).resolve()),
                           "bytes": stat.st_size, "mtime": stat.st_mtime_ns}, sort_keys=True)

    def draft_for(self, length: int, index: int, seed: int) -> Draft:
        order = list(range(self.count))
        random.Random(seed).shuffle(order)
        record = self.records[order[index]]
        context, answers = self.context(record), tuple(self.answers(record))

        def render(size: int) -> Prompt:
            cut = cut_middle(context, size)
            user, prefix = self.prompt(record, cut)
            return Prompt(cut, user, prefix)

        return Draft(answers, render, min_size=0, max_size=len(context))

    def missing_fields(self, record: dict) -> list[str]:
        raise NotImplementedError

    def context(self, record: dict) -> str:
        raise NotImplementedError

    def answers(self, record: dict) -> Sequence[str]:
        raise NotImplementedError

    def prompt(self, record: dict, context: str) -> tuple[str, str]:
        """(user message, answer prefix) around an already cut context."""
        raise NotImplementedError


_CHOICES = ("A", "B", "C", "D")


@register("longbench_v2")
@dataclass
class LongBenchV2(FileTask):
    name = "longbench_v2"
    max_new_tokens = 16

    def missing_fields(self, record: dict) -> list[str]:
        need = ["question", "context", "answer", *(f"choice_{c}" for c in _CHOICES)]
        missing = [f for f in need if not isinstance(record.get(f), str)]
        if "answer" not in missing and record["answer"] not in _CHOICES:
            missing.append("answer (one of A, B, C, D)")
        return missing

    def context(self, record: dict) -> str:
        return record["context"]

    def answers(self, record: dict) -> Sequence[str]:
        return [record["answer"]]

    def prompt(self, record: dict, context: str) -> tuple[str, str]:
        choices = {c: record[f"choice_{c}"] for c in _CHOICES}
        return LONGBENCH_V2_TEMPLATE.format(context=context, question=record["question"], **choices), ""

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return float(extract_choice(prediction) == answers[0])


def extract_choice(prediction: str) -> str | None:
    """The letter of "The correct answer is (X)" / "... is X", else of the first "(X)", else a prediction that is
    a bare letter, else None (a stray "A" in a sentence is the article, not a choice)."""
    found = re.search(r"correct answer is\s*\(?([A-D])\)?(?![A-Za-z])", prediction) \
        or re.search(r"\(([A-D])\)", prediction) or re.fullmatch(r"\W*([A-D])\W*", prediction)
    return found.group(1) if found else None


@register("helmet")
@dataclass
class Helmet(FileTask):
    name = "helmet"
    max_new_tokens = 32

    @staticmethod
    def shape(record: dict) -> str:
        if "ctxs" in record:
            return "qa"
        if "outputs" in record:
            return "recall"
        return "kv" if "num_kvs" in record else "generic"

    def missing_fields(self, record: dict) -> list[str]:
        if "ctxs" in record:
            bad = not isinstance(record["ctxs"], list) or not all(isinstance(c, dict) and "text" in c for c in record["ctxs"])
            return [f for f in ("question", "answers") if f not in record] + (["ctxs (list of {title, text})"] if bad else [])
        missing = [] if isinstance(record.get("context"), str) else ["context"]
        if not any(f in record for f in ("answer", "answers", "outputs")):
            missing.append("answer, answers or outputs")
        return missing

    def context(self, record: dict) -> str:
        if "ctxs" in record:
            return "\n\n".join(f"Document (Title: {c.get('title', '')}): {c['text']}" for c in record["ctxs"])
        return record["context"]

    def answers(self, record: dict) -> Sequence[str]:
        value = record.get("outputs", record.get("answers", record.get("answer")))
        values = [value] if isinstance(value, str) else list(value)
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{self.path}: answers must be a string or a non-empty list of strings, got {value!r}")
        return values

    def prompt(self, record: dict, context: str) -> tuple[str, str]:
        question = record.get("question", record.get("query", ""))
        shape = self.shape(record)
        if shape == "qa":
            return HELMET_QA_TEMPLATE.format(context=context, question=question), "Answer:"
        if shape == "kv":
            return HELMET_KV_TEMPLATE.format(context=context, question=question), "Corresponding value:"
        return GENERIC_TEMPLATE.format(context=context, question=question).strip(), "Answer:"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        if self.shape(self.records[0]) == "recall":
            return match_all(prediction, answers)  # whole values: "1234567" is not in "91234567"
        return max(float(normalize(a) in normalize(prediction)) for a in answers)


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())
