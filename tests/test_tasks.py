"""Tasks: generators are deterministic, fit their length and really hold their answers; scorers; file loaders."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from topklab.tasks import PromptCodec, available, contains_word, make, match_all
from topklab.tasks.aggregation import SHORT_CONTEXT
from topklab.tasks.loaders import cut_middle, extract_choice, normalize

pytest.importorskip("gensim")

GENERATED = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
# byte-level tokens: 2K bytes hold a few hundred words, enough for every task (cwe needs 60 list entries)
LENGTH = 2048


@pytest.fixture(scope="module")
def codec():
    return PromptCodec(None)


@pytest.fixture(scope="module")
def chat_codec():
    """A real (tiny, locally trained) Hugging Face tokenizer with a ChatML template, like SmolLM2's."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, pre_tokenizers, decoders, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(["The special magic number is hidden in the text.", "What is the pass key?"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PromptCodec(fast)


def test_registry_lists_every_task():
    assert set(GENERATED) | {"longbench_v2", "helmet"} <= set(available())


@pytest.mark.parametrize("name", GENERATED)
def test_generators_are_deterministic_by_seed(codec, name):
    task, length = make(name), LENGTH
    first, again = task.sample(codec, length, 0, seed=3), task.sample(codec, length, 0, seed=3)
    assert first == again
    others = [task.sample(codec, length, i, seed=s) for i, s in ((1, 3), (0, 4))]
    for other in others:
        assert other.answers != first.answers and other.text != first.text


@pytest.mark.parametrize("name", GENERATED)
def test_answers_are_in_the_context_and_survive_tokenization(codec, name):
    task, length = make(name), LENGTH
    for index in range(3):
        sample = task.sample(codec, length, index)
        decoded = codec.decode(sample.input_ids)
        assert sample.context in sample.text and decoded == sample.text
        for answer in sample.answers:
            assert contains_word(sample.context, answer), (name, answer)
        assert match_all(sample.context, sample.answers) == 1.0


@pytest.mark.parametrize("name", GENERATED)
def test_samples_fit_their_length_and_fill_it(codec, name):
    task = make(name)
    for length in (LENGTH, 3000):
        sample = task.sample(codec, length, 0)
        assert len(sample.input_ids) + sample.max_new_tokens <= length
        draft = task.draft_for(length, 0, 0)  # one more filler unit would not fit: the fit is the largest
        bigger = codec.prompt_ids(codec.render(draft.render(sample.size + 1)))
        assert len(bigger) + sample.max_new_tokens > length


def test_answer_budget_override_keeps_the_total_within_length(codec):
    sample = make("passkey").sample(codec, 1024, 0, max_new_tokens=100)
    assert sample.max_new_tokens == 100 and len(sample.input_ids) + 100 <= 1024


def test_chat_template_wraps_the_prompt_and_leaves_the_answer_prefix_open(chat_codec):
    sample = make("niah_single").sample(chat_codec, 1024, 0)
    key = re.search(r"magic numbers for ([a-z]+-[a-z]+) is", sample.context).group(1)
    assert sample.text.startswith("<|im_start|>user\n")
    assert sample.text.endswith(f"<|im_end|>\n<|im_start|>assistant\nThe special magic number for {key} mentioned "
                                "in the provided text is")
    assert len(sample.input_ids) + sample.max_new_tokens <= 1024
    assert sample.answers[0] in chat_codec.decode(sample.input_ids)
    assert chat_codec.eos_ids() == {chat_codec.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_niah_variants_plant_the_right_needles(codec):
    needle = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")
    expected = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 4),
                "niah_multiquery": (4, 1, 4)}
    for name, (keys, per_key, answers) in expected.items():
        sample = make(name).sample(codec, 2048, 0)
        found = needle.findall(sample.context)
        assert len({k for k, _ in found}) == keys and len(found) == keys * per_key
        assert len(sample.answers) == answers and set(sample.answers) <= {v for _, v in found}
        queried = {k for k, v in found if v in sample.answers}
        assert all(k in sample.text.split(sample.context)[1] for k in queried)  # the question names them


def test_variable_tracking_chain_is_in_order_and_complete(codec):
    sample = make("vt", num_chains=2).sample(codec, 2048, 1)
    statements = re.findall(r"VAR ([A-Z]{5}) = (VAR ([A-Z]{5})|\d{5})\.", sample.context)
    assert len(statements) == 10
    chain = [sample.answers[0]]
    for name, source, previous in statements:
        if previous in chain:
            chain.append(name)
    assert tuple(chain) == sample.answers
    value = next(source for name, source, _ in statements if name == sample.answers[0])
    assert f"assigned the value {value} in the text above" in sample.text


def test_common_words_are_the_most_common(codec):
    """RULER's 30/3 frequencies from 4K tokens where they fit with at least 10 uncommon words, else 6/1 (byte tokens
    at exactly 4K: 300 common items alone take ~4K), never a near-trivial list of a few uncommon words."""
    for length, (common, uncommon), index in ((2048, (6, 1), 0), (SHORT_CONTEXT, (6, 1), 0), (SHORT_CONTEXT, (6, 1), 3),
                                              (8192, (30, 3), 1)):
        sample = make("cwe").sample(codec, length, index)
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", sample.context))
        assert {w for w, c in counts.items() if c == common} == set(sample.answers)
        assert set(counts.values()) == {common, uncommon}
        assert len(counts) - len(sample.answers) >= len(sample.answers)


def test_frequent_words_are_strictly_the_most_frequent(codec):
    for length in (1024, 3000):
        sample = make("fwe").sample(codec, length, 2)
        ranked = Counter(sample.context.split()).most_common()
        assert {w for w, _ in ranked[:3]} == set(sample.answers)
        assert ranked[2][1] > ranked[3][1]


def test_scorers_on_known_cases():
    assert match_all("The pass key is 12345.", ["12345"]) == 1.0
    assert match_all("The pass key is 123456.", ["12345"]) == 0.0  # a longer number is not the answer
    assert match_all("numbers: 1111111, 3333333", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert match_all("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert match_all("partyline", ["party"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        match_all("x", [])
    cwe = make("cwe")
    assert cwe.score("1. alpha 2. beta", ["alpha", "beta", "gamma", "delta"]) == 0.5
    assert extract_choice('The correct answer is (C).') == "C"
    assert extract_choice("The correct answer is B") == "B"
    assert extract_choice("I think (D) fits") == "D"
    assert extract_choice("no idea") is None
    assert extract_choice("The correct answer is Because of the ending, (A)") == "A"  # "B" is a word's start
    assert extract_choice("A careful reading shows the answer is C.") is None  # "A" is the article
    assert extract_choice(" (B). ") == "B"
    assert normalize("The  Eiffel Tower!") == "eiffel tower"


def test_bad_input_errors(codec):
    with pytest.raises(ValueError, match="unknown task 'nope'.*passkey"):
        make("nope")
    with pytest.raises(ValueError, match="unknown parameter.*colour"):
        make("passkey", colour=1)
    with pytest.raises(ValueError, match="takes no file"):
        make("passkey:/tmp/x.jsonl")
    with pytest.raises(ValueError, match="too short for task 'passkey'.*at least"):
        make("passkey").sample(codec, 64, 0)
    with pytest.raises(ValueError, match="num_queries"):
        make("niah_single", num_queries=2)
    with pytest.raises(ValueError, match="length must be a positive int"):
        make("passkey").sample(codec, 0, 0)
    with pytest.raises(ValueError, match="256 ids"):
        PromptCodec(None, vocab_size=100)


# -- loaders -----------------------------------------------------------------------------------------------------
def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _longbench(i: int, words: int = 50) -> dict:
    return {"_id": f"q{i}", "domain": "Single-Document QA", "difficulty": "easy", "length": "short",
            "question": f"Which city is number {i}?", "choice_A": "Paris", "choice_B": "Rome", "choice_C": "Oslo",
            "choice_D": "Lima", "answer": "ABCD"[i % 4],
            "context": f"START{i} " + " ".join(f"word{j}" for j in range(words)) + f" END{i}"}


def test_longbench_v2_loader_reads_samples_and_cuts_long_contexts(tmp_path, codec):
    path = _write_jsonl(tmp_path / "lb2.jsonl", [_longbench(i, words=20 if i else 2000) for i in range(3)])
    task = make(f"longbench_v2:{path}")
    assert task.count == 3 and task.label == "longbench_v2:lb2"
    samples = [task.sample(codec, 1024, i, seed=0) for i in range(3)]
    assert sorted(s.answers[0] for s in samples) == ["A", "B", "C"]  # a permutation of the records
    for s in samples:
        assert len(s.input_ids) + s.max_new_tokens <= 1024
        assert "(A) Paris" in s.text and "The correct answer is" in s.text
        number = re.search(r"START(\d)", s.context).group(1)  # the head and the tail survive the cut
        assert f"END{number}" in s.context
    long = next(s for s in samples if "START0" in s.context)
    assert " ... " in long.context and "word1999" in long.context and "word1000" not in long.context
    assert task.score("The correct answer is (A)", long.answers) == float(long.answers[0] == "A")
    assert [s.answers for s in samples] == [task.sample(codec, 1024, i).answers for i in range(3)]
    with pytest.raises(ValueError, match="has 3 samples"):
        task.sample(codec, 1024, 3)


def test_longbench_v2_reads_the_json_list_of_its_release(tmp_path, codec):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_longbench(0), _longbench(1)]), encoding="utf-8")
    assert make("longbench_v2", path=str(path)).count == 2


def test_helmet_loader_reads_its_three_record_shapes(tmp_path, codec):
    qa = _write_jsonl(tmp_path / "kilt_nq.jsonl", [{
        "question": "who wrote hamlet", "answers": ["William Shakespeare", "Shakespeare"],
        "ctxs": [{"title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare."},
                 {"title": "Other", "text": "Unrelated passage."}]}])
    kv = _write_jsonl(tmp_path / "json_kv.jsonl", [{
        "context": json.dumps({"a1b2": "c3d4", "e5f6": "g7h8"}), "question": "e5f6", "answer": "g7h8", "num_kvs": 2}])
    recall = _write_jsonl(tmp_path / "ruler_mv.jsonl", [{
        "context": "One magic number for kiwi is 11. Another is 22.", "query": "kiwi", "outputs": ["11", "22"]}])
    sample = make(f"helmet:{qa}").sample(codec, 1024, 0)
    assert "Document (Title: Hamlet): Hamlet is a tragedy" in sample.context and sample.text.endswith("Answer:")
    task = make(f"helmet:{qa}")
    assert task.score("Answer: william shakespeare.", sample.answers) == 1.0
    assert task.score("Marlowe", sample.answers) == 0.0
    sample = make(f"helmet:{kv}").sample(codec, 1024, 0)
    assert "Key: e5f6" in sample.text and sample.text.endswith("Corresponding value:")
    task = make(f"helmet:{recall}")
    sample = task.sample(codec, 1024, 0)
    assert sample.answers == ("11", "22") and "kiwi" in sample.text
    assert task.score("11 and 33", sample.answers) == 0.5


def test_loader_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_longbench(0)) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        make(f"longbench_v2:{bad}")
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"question": "q", "context": "c"}])
    with pytest.raises(ValueError, match="record 0 lacks field.*answer.*choice_A"):
        make(f"longbench_v2:{missing}")
    letter = _write_jsonl(tmp_path / "letter.jsonl", [{**_longbench(0), "answer": "E"}])
    with pytest.raises(ValueError, match="one of A, B, C, D"):
        make(f"longbench_v2:{letter}")
    no_answer = _write_jsonl(tmp_path / "helmet.jsonl", [{"context": "c", "question": "q"}])
    with pytest.raises(ValueError, match="answer, answers or outputs"):
        make(f"helmet:{no_answer}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        make(f"helmet:{empty}")
    text = tmp_path / "records.txt"
    text.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        make(f"helmet:{text}")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        make(f"helmet:{tmp_path / 'absent.jsonl'}")
    with pytest.raises(ValueError, match="needs a data file"):
        make("helmet")


def test_cut_middle_keeps_head_and_tail():
    assert cut_middle("abcdef", 10) == "abcdef"
    assert cut_middle("abcdefghij", 4) == "ab ... ij"
    assert cut_middle("abcdefghij", 0) == " ... "
