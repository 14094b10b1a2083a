"""Native Top-k fine-tuning and the model zoo: Top-k training attention (forward, gradients, masks), the training
loop, zoo config -> model -> checkpoint -> load, and the errors bad configs raise."""

import dataclasses
import inspect
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from topklab.decoding.topk_training_attention import TopkTrainingAttention, topk_training_attention, visible_keys
from topklab.models import tiny_model
from topklab.tasks import ByteTokenizer, PromptCodec
from topklab.training.reuse import checkpoint_identity, reusable_checkpoint
from topklab.training.topk_sft import (
    TaskData,
    TopkSpec,
    TrainConfig,
    answer_text,
    finetune,
    load_trainable,
    learning_rate,
    main as sft_main,
    save_checkpoint,
    task_batches,
    token_loss,
    train,
)
from topklab.training.zoo import (
    EOS_ID,
    PAD_ID,
    build_model,
    byte_tokenizer,
    config_from_dict,
    is_byte_tokenizer,
    load_config,
    load_zoo_model,
    train_zoo_model,
)

TINY = {
    "name": "tiny",
    "seed": 3,
    "model": {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "intermediate": 64, "max_position": 1024},
    "data": {"tasks": ["passkey"], "lengths": [700], "loss_on": "answer"},
    "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 1},
}


def _random_qkv(rng, batch=2, heads=4, kv_heads=2, q_len=12, dim=8):
    q = torch.randn(batch, heads, q_len, dim, generator=rng, requires_grad=True)
    k = torch.randn(batch, kv_heads, q_len, dim, generator=rng, requires_grad=True)
    v = torch.randn(batch, kv_heads, q_len, dim, generator=rng, requires_grad=True)
    return q, k, v


# -- Top-k training attention -------------------------------------------------------------------------------------
def test_topk_forward_with_k_at_least_context_equals_dense():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: those rows see nothing in either path
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        with topk_training_attention(model, k=40):
            full = model(ids, attention_mask=mask).logits
        with topk_training_attention(model, k=1.0):
            ratio = model(ids, attention_mask=mask).logits
        with topk_training_attention(model, k=3):
            sparse = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(full[:, 6:], dense[:, 6:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[1], dense[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ratio, full, atol=1e-6, rtol=1e-6)
    assert (sparse[1, 3:] - dense[1, 3:]).abs().max() > 1e-3  # past 3 keys Top-k changes the output
    torch.testing.assert_close(sparse[1, :3], dense[1, :3], atol=1e-5, rtol=1e-5)  # the first 3 positions see <= 3


def test_gradients_reach_only_the_selected_keys(rng):
    q, k, v = _random_qkv(rng)
    hook = TopkTrainingAttention(k=3)
    out, _ = hook(SimpleNamespace(layer_idx=0), q, k, v, None, scaling=0.5)
    row, head, position = 1, 2, 10  # one query: batch 1, head 2 (reads KV head 1), position 10
    out[row, position, head].square().sum().backward()
    scores = (q[row, head, position] @ k[row, 1, : position + 1].T).detach()
    chosen = scores.topk(3).indices
    outside = torch.ones(position + 1, dtype=torch.bool)
    outside[chosen] = False
    key_grad, value_grad = k.grad[row, 1], v.grad[row, 1]
    assert key_grad[: position + 1][outside].abs().max() == 0  # unselected keys: no gradient through the scores
    assert value_grad[: position + 1][outside].abs().max() == 0
    assert key_grad[position + 1 :].abs().max() == 0  # future keys: causal
    assert (key_grad[chosen].abs().sum(-1) > 0).all() and (value_grad[chosen].abs().sum(-1) > 0).all()
    assert k.grad[row, 0].abs().max() == 0 and k.grad[0].abs().max() == 0  # other KV head and sequence untouched

    # the gradient is that of a softmax renormalised over the selected keys
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    probs = torch.softmax(0.5 * q2[row, head, position] @ k2[row, 1, chosen].T, dim=-1)
    (probs @ v2[row, 1, chosen]).square().sum().backward()
    torch.testing.assert_close(q.grad[row, head, position], q2.grad[row, head, position], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k.grad[row, 1], k2.grad[row, 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers stay dense in both
def test_dense_prefix_teacher_forces_topk_decoding(family):
    """One pass with a dense prompt and Top-k answer rows gives the logits of step-by-step Top-k decoding."""
    from topklab.decoding.topk_attention import topk_attention

    model = tiny_model(family, seed=4, layers=6 if family == "gemma3" else 2)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))
    prompt = 40
    with torch.no_grad():
        dense = model(ids).logits
        with topk_training_attention(model, k=5, dense_prefix=prompt):
            forced = model(ids).logits
        argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with topk_attention(model, "exact", k=5):
            out = model(ids[:, :prompt], use_cache=True)
            steps = [out.logits[:, -1]]
            for t in range(prompt, ids.shape[1] - 1):
                out = model(ids[:, t : t + 1], use_cache=True, **{argument: getattr(out, argument)})
                steps.append(out.logits[:, -1])
    torch.testing.assert_close(forced[:, :prompt], dense[:, :prompt], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forced[0, prompt - 1 : -1], torch.cat(steps), atol=1e-4, rtol=1e-4)
    assert (forced[:, prompt:] - dense[:, prompt:]).abs().max() > 1e-3


def test_visible_keys_from_transformers_masks():
    causal = visible_keys(None, batch=2, q_len=3, kv_len=5, device="cpu")
    assert causal.shape == (2, 3, 5)
    assert causal[0].tolist() == [[True, True, True, False, False], [True] * 4 + [False], [True] * 5]
    additive = torch.zeros(1, 1, 2, 4)
    additive[..., 0] = torch.finfo(torch.float32).min
    assert visible_keys(additive, 3, 2, 4, "cpu")[2, 0].tolist() == [False, True, True, True]
    boolean = torch.tensor([[[[True, False], [True, True]]]])
    assert visible_keys(boolean, 1, 2, 2, "cpu")[0].tolist() == [[True, False], [True, True]]


def test_training_hook_options_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="ratio"):
        TopkTrainingAttention(k=1.5)
    with pytest.raises(ValueError, match="per must be"):
        TopkTrainingAttention(k=4, per="token")
    with pytest.raises(ValueError, match="sinks"):
        TopkTrainingAttention(k=4, sinks=-1)
    with pytest.raises(ValueError, match="window"):  # the training config's options, checked alike
        TrainConfig(topk={"k": 4, "window": 2.5})
    with pytest.raises(ValueError, match="layer"), topk_training_attention(model, k=4, dense_layers=[7]):
        pass
    with pytest.raises(ValueError, match="dropout"):
        TopkTrainingAttention(k=4)(SimpleNamespace(layer_idx=0), *(torch.ones(1, 2, 3, 4) for _ in range(3)), None,
                                   dropout=0.1)


def test_dense_layers_stay_dense():
    model = tiny_model("llama", seed=2)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        with topk_training_attention(model, k=2, dense_layers=[0, 1]):
            kept = model(ids).logits
    torch.testing.assert_close(kept, dense, atol=1e-5, rtol=1e-5)


# -- the training loop ------------------------------------------------------------------------------------------
def _held_out_loss(model, batch, topk):
    with torch.no_grad(), topk_training_attention(model, topk.k):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_loss(logits, batch)[0].item()


def test_short_topk_finetune_lowers_the_loss():
    torch.manual_seed(0)
    config = config_from_dict(TINY)
    model = build_model(config)
    codec = PromptCodec(None)  # the zoo's byte ids
    data = TaskData(("passkey", "niah_single"), (700,), "answer", data_seed=5)
    held_out = next(task_batches(data, codec, 8, EOS_ID, PAD_ID, seed=99))
    topk = TopkSpec(k=0.05)
    before = _held_out_loss(model, held_out, topk)
    frame = train(model, task_batches(data, codec, 4, EOS_ID, PAD_ID, seed=1),
                  TrainConfig(steps=10, batch_size=4, lr=1e-2, warmup=2, topk=topk))
    after = _held_out_loss(model, held_out, topk)
    assert list(frame.columns) == ["step", "loss", "answer_loss", "lr", "tokens", "seconds"] and len(frame) == 10
    assert after < before - 1.0, (before, after)  # ~5.6 (uniform over 258 ids) -> digits learned
    assert frame["loss"].tail(3).mean() < frame["loss"].head(3).mean()


def test_task_batches_mark_the_answer_and_pad_right():
    codec = PromptCodec(byte_tokenizer())
    data = TaskData(("passkey",), (700,), "answer", data_seed=5)
    batch = next(task_batches(data, codec, 3, EOS_ID, PAD_ID, seed=0))
    again = next(task_batches(data, codec, 3, EOS_ID, PAD_ID, seed=0))
    assert all(torch.equal(batch[name], again[name]) for name in batch)  # reproducible by seed
    for row in range(3):
        valid = batch["attention_mask"][row].bool()
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert (ids[~valid] == PAD_ID).all() and valid[: int(valid.sum())].all()  # right padding
        target = labels[labels != -100].tolist()
        assert target[-1] == EOS_ID
        answer = ByteTokenizer().decode(target[:-1])
        assert answer.strip(" .").isdigit()
        assert answer.strip(" .") in ByteTokenizer().decode(ids[valid].tolist())  # the answer is in the context
    data = TaskData(("passkey",), (700,), "all", answer_weight=4.0, data_seed=5)
    everything = next(task_batches(data, codec, 2, EOS_ID, PAD_ID, seed=0))
    valid = everything["attention_mask"].bool()
    assert (everything["labels"][valid] != -100).all()
    assert set(everything["weights"][valid & everything["answer"]].tolist()) == {4.0}
    assert set(everything["weights"][valid & ~everything["answer"]].tolist()) == {1.0}
    assert (everything["weights"][~valid] == 0).all()


def test_loader_workers_do_not_change_the_batches():
    codec = PromptCodec(byte_tokenizer())
    data = TaskData(("passkey", "niah_single"), (700, 800), data_seed=5)
    alone = list(task_batches(data, codec, 2, EOS_ID, PAD_ID, seed=4, steps=4))
    pooled = list(task_batches(data, codec, 2, EOS_ID, PAD_ID, seed=4, steps=4, workers=2))
    assert len(alone) == len(pooled) == 4
    for a, b in zip(alone, pooled):
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_byte_codec_fast_path_gives_the_tokenizer_ids():
    tokenizer = byte_tokenizer()
    assert is_byte_tokenizer(tokenizer) and not is_byte_tokenizer(None)
    data = TaskData(("niah_multikey", "vt"), (900,), data_seed=6)
    slow = next(task_batches(data, PromptCodec(tokenizer), 2, EOS_ID, PAD_ID, seed=1))
    fast = next(task_batches(data, PromptCodec(None), 2, EOS_ID, PAD_ID, seed=1))
    assert all(torch.equal(slow[name], fast[name]) for name in slow)


def test_token_loss_weighs_tokens():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 2, 3, 1]])
    batch = {"labels": labels, "weights": torch.tensor([[0.0, 1.0, 1.0, 3.0]]),
             "answer": torch.tensor([[False, False, False, True]])}
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none")
    loss, answer_loss = token_loss(logits, batch)
    torch.testing.assert_close(loss, (per_token[0] + per_token[1] + 3 * per_token[2]) / 5)
    assert answer_loss == pytest.approx(per_token[2].item())


def test_answer_text_and_learning_rate_schedule():
    assert answer_text(["123"]) == " 123."
    assert answer_text(["a", "b", "c"]) == " a, b and c."
    config = TrainConfig(steps=100, lr=1.0, warmup=10, final_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(100, config) == pytest.approx(0.1)
    assert all(learning_rate(s, config) >= learning_rate(s + 1, config) for s in range(10, 100))


def test_finetune_saves_a_checkpoint_that_records_its_settings(tmp_path):
    config = config_from_dict(TINY)
    base = train_zoo_model(config, tmp_path / "base")
    model, tokenizer = load_zoo_model(base)
    data = TaskData(("passkey",), (700,), data_seed=2)
    finetune(model, tokenizer, data, TrainConfig(steps=2, batch_size=2, topk=TopkSpec(k=8)), tmp_path / "ft")
    meta = json.loads((tmp_path / "ft" / "training.json").read_text())
    assert meta["kind"] == "topk_sft" and meta["train"]["topk"]["k"] == 8
    assert meta["base_training"]["kind"] == "zoo"
    tuned, _ = load_zoo_model(tmp_path / "ft")
    assert not torch.equal(tuned.model.embed_tokens.weight, load_zoo_model(base)[0].model.embed_tokens.weight)


def test_sft_command_line_needs_exactly_one_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft_main(["--model", "x", "--out", str(tmp_path), "--k", "4", "--dense"])
    assert "exactly one" in capsys.readouterr().err


# -- the zoo -----------------------------------------------------------------------------------------------------
def test_zoo_config_to_checkpoint_to_load_round_trip(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    config = load_config(path)
    out = train_zoo_model(config, tmp_path / "ck")
    assert {"config.json", "model.safetensors", "zoo.json", "tokenizer.json", "train_log.csv"} <= {
        p.name for p in out.iterdir()}
    model, tokenizer = load_zoo_model(out)
    retrained = train_zoo_model(load_config(path), tmp_path / "again")  # reproducible by seed
    twin, _ = load_zoo_model(retrained)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 258

    text = "Hé 12345 </s>\n"
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)  # same ids as the tasks' byte tokens
    assert tokenizer.decode(tokenizer(text)["input_ids"] + [EOS_ID], skip_special_tokens=True) == text
    from topklab.models import load_model

    hf_model, hf_tokenizer = load_model(str(out))  # a plain Hugging Face folder, as `topklab eval --model` reads it
    assert hf_tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits)


def test_zoo_config_from_toml(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text('name = "toml-tiny"\nseed = 1\n[model]\nlayers = 1\nhidden = 16\nheads = 2\nkv_heads = 1\n'
                    'intermediate = 32\nmax_position = 1024\n[data]\ntasks = ["passkey"]\nlengths = [700]\n'
                    '[train]\nsteps = 3\n[train.topk]\nk = 0.02\n')
    config = load_config(path)
    assert config.model.layers == 1 and config.train.topk == TopkSpec(k=0.02) and config.train.seed == 1


@pytest.mark.parametrize("change, message", [
    ({"name": ""}, "non-empty 'name'"),
    ({"colour": "red"}, "unknown key.*'colour'"),
    ({"model": {"layer": 2}}, "unknown key.*'layer'.*valid: "),
    ({"model": {"hidden": 30, "heads": 4}}, "multiple of model.heads"),
    ({"model": {"heads": 4, "kv_heads": 3}}, "multiple of model.kv_heads"),
    ({"model": {"layers": 0}}, "model.layers must be a positive int"),
    ({"data": {"lengths": [2048]}}, "exceed model.max_position"),
    ({"data": {"tasks": ["passkey", "sudoku"]}}, "unknown task 'sudoku'"),
    ({"data": {"data_seed": 0}}, "topklab eval"),
    ({"data": {"loss_on": "prompt"}}, "loss_on"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"topk": {"k": 2.5}}}, "ratio"),
    ({"train": {"topk": {"k": 4, "heads": 2}}}, "train.topk"),
    ({"train": {"dtype": "int8"}}, "train.dtype"),
    ({"seed": "zero"}, "seed must be an int"),
])
def test_bad_zoo_configs_raise_clear_errors(change, message):
    raw = json.loads(json.dumps(TINY))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_bad_config_files_and_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{name: ")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("name: x")
    with pytest.raises(ValueError, match=".json or .toml"):
        load_config(yaml)
    with pytest.raises(ValueError, match="needs a 'name'"):
        config_from_dict({"seed": 1})
    with pytest.raises(FileNotFoundError, match="not a zoo checkpoint"):
        load_zoo_model(tmp_path)


@pytest.mark.slow
def test_topk_finetuning_runs_on_smollm2(tmp_path):
    from topklab.models import load_model

    model, tokenizer = load_model("smollm2")
    codec = PromptCodec(tokenizer)
    data = TaskData(("passkey",), (400,), "answer", data_seed=3)
    batch = next(task_batches(data, codec, 1, tokenizer.eos_token_id, tokenizer.eos_token_id, seed=0))
    topk = TopkSpec(k=0.05)
    before = _held_out_loss(model, batch, topk)
    train(model, iter([batch] * 2), TrainConfig(steps=2, batch_size=1, lr=1e-4, warmup=0, topk=topk))
    after = _held_out_loss(model, batch, topk)
    assert math.isfinite(before) and after < before
    saved = save_checkpoint(model, tokenizer, tmp_path / "sft", {"steps": 2})  # a GGUF-loaded model saves
    reloaded, _ = load_trainable(str(saved), "cpu")
    assert _held_out_loss(reloaded, batch, topk) == pytest.approx(after, rel=1e-5)


# -- reusing finished work ---------------------------------------------------------------------------------------
def test_checkpoints_are_written_whole_and_reused_only_for_their_settings(tmp_path, caplog):
    class Killed(Exception):
        pass

    class DyingTokenizer:  # the run is killed after the weights are written, before training.json
        def save_pretrained(self, folder):
            raise Killed

    folder = tmp_path / "ft"
    model, tokenizer = load_trainable("tiny-llama", "cpu")
    with pytest.raises(Killed):
        save_checkpoint(model, DyingTokenizer(), folder, {})
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temporary folder left

    data, config = TaskData(("passkey",), (400,), data_seed=2), TrainConfig(steps=1, batch_size=1, warmup=0)
    assert not reusable_checkpoint(folder, "tiny-llama", data, config)
    finetune(model, tokenizer, data, config, folder)
    assert reusable_checkpoint(folder, "tiny-llama", data, config)
    assert reusable_checkpoint(folder, "tiny-llama", data, dataclasses.replace(config, log_every=1, workers=2))
    with caplog.at_level(logging.INFO, logger="topklab.training.reuse"):
        assert not reusable_checkpoint(folder, "tiny-llama", data, dataclasses.replace(config, steps=2))
        assert not reusable_checkpoint(folder, "tiny-llama", data, dataclasses.replace(config, topk=TopkSpec(k=8)))
        assert not reusable_checkpoint(folder, "tiny-llama", dataclasses.replace(data, data_seed=3), config)
        assert not reusable_checkpoint(folder, "another-base", data, config)
    one_key = dataclasses.replace(config, topk=TopkSpec(k=1))
    finetune(model, tokenizer, data, one_key, folder)
    assert reusable_checkpoint(folder, "tiny-llama", data, one_key)
    assert not reusable_checkpoint(folder, "tiny-llama", data, dataclasses.replace(config, topk=TopkSpec(k=1.0)))
    assert "train.steps: 1 -> 2" in caplog.text and "base: ['tiny-llama', None] -> ['another-base', None]" in caplog.text

    identity = checkpoint_identity(folder)  # a re-trained checkpoint at the same path is another model
    save_checkpoint(model, None, folder, {"kind": "other"})
    assert checkpoint_identity(folder) != identity and checkpoint_identity("tiny-llama") == ["tiny-llama", None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"] and not (folder / "train_log.csv").exists()


def test_checkpoint_folder_is_replaced_only_when_it_is_one(tmp_path, monkeypatch):
    """A folder of other files (or the working directory) is refused, not wiped; a failed final rename puts the
    earlier checkpoint back; the folder is as readable as any other (not mkdtemp's 0700)."""
    import os

    from topklab import io

    def write(text):
        return lambda folder: [(folder / "weights.bin").write_text(text), (folder / "done.json").write_text("{}")]

    shared = tmp_path / "results"
    shared.mkdir()
    (shared / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files and no done.json"):
        io.atomic_folder(shared, write("a"), marker="done.json")
    assert [p.name for p in shared.iterdir()] == ["notes.txt"]

    folder = io.atomic_folder(tmp_path / "ck", write("first"), marker="done.json")
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    real_replace = os.replace

    def fails(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(io.os, "replace", fails)
    with pytest.raises(OSError, match="disk gone"):
        io.atomic_folder(folder, write("second"), marker="done.json")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert (folder / "weights.bin").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["ck", "results"]
    monkeypatch.chdir(folder)
    with pytest.raises(ValueError, match="working directory"):
        io.atomic_folder(".", write("third"), marker="done.json")
    assert (folder / "weights.bin").read_text() == "first"
