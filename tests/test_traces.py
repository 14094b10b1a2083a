import json

import pytest
import torch

from topklab.decoding.capture import capture, resolve_layers
from topklab.fidelity.traces import LayerTrace, TraceError, TraceFile, save_trace
from topklab.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3)


@pytest.fixture
def trace_file(tmp_path, rng):
    layers = {
        i: LayerTrace(i, torch.randn(1, 4, 12, 8, generator=rng), torch.randn(1, 2, 12, 8, generator=rng),
                      torch.randn(1, 2, 12, 8, generator=rng), torch.randn(1, 12, 16, generator=rng), 0.3, 9)
        for i in (0, 2)
    }
    path = save_trace(tmp_path / "t.safetensors", layers, torch.arange(12)[None], {"model": "m"})
    return path, layers


def test_round_trip_and_lazy_layers(trace_file):
    path, layers = trace_file
    tf = TraceFile(path).verify()
    assert tf.layers == [0, 2] and tf.prompt_len == 9 and tf.length == 12 and tf.info == {"model": "m"}
    got = tf.layer(2)
    for field in ("q", "k", "v", "hidden"):
        torch.testing.assert_close(getattr(got, field), getattr(layers[2], field), atol=2e-3, rtol=1e-3)
    assert got.scale == pytest.approx(0.3) and got.group_size == 2
    with pytest.raises(KeyError, match="holds layers"):
        tf.layer(1)


def test_truncated_file(trace_file, tmp_path):
    path, _ = trace_file
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(TraceError, match="truncated or corrupt"):
            TraceFile(bad).verify()


def test_flipped_byte_is_caught_by_checksum(trace_file, tmp_path):
    path, _ = trace_file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x55
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="checksum mismatch"):
        TraceFile(bad).verify()


def test_not_a_trace_and_wrong_version(tmp_path, trace_file):
    from safetensors.torch import load_file, save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    with pytest.raises(TraceError, match="not a topklab trace"):
        TraceFile(plain)
    path, _ = trace_file
    from safetensors import safe_open

    header = json.loads(safe_open(str(path), "pt").metadata()["topklab"])
    header["version"] = 999
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"topklab": json.dumps(header)})
    with pytest.raises(TraceError, match="version 999"):
        TraceFile(old)
    with pytest.raises(FileNotFoundError):
        TraceFile(tmp_path / "missing.safetensors")


def _resave_with_header(path, out, edit):
    """The trace's tensors under a header changed by ``edit`` (a dict -> None), as a hand edit or bit rot would."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    header = json.loads(safe_open(str(path), "pt").metadata()["topklab"])
    edit(header)
    save_file(load_file(str(path)), str(out), metadata={"topklab": json.dumps(header)})
    return out


@pytest.mark.parametrize("edit", [
    lambda h: h.update(scale=0.75),  # every mass, KL and output error would shift silently
    lambda h: h.update(prompt_len=3),
    lambda h: h.update(layers=[0, 5]),
    lambda h: h["crc32"].pop("input_ids"),
    lambda h: h.pop("header_crc32"),
])
def test_edited_header_fails_its_checksum(trace_file, tmp_path, edit):
    path, _ = trace_file
    with pytest.raises(TraceError, match="fails its checksum"):
        TraceFile(_resave_with_header(path, tmp_path / "edited.safetensors", edit))


def test_header_with_a_valid_checksum_is_still_checked(trace_file, tmp_path):
    """A header whose checksum matches but that lacks a field or a layer's tensors is refused up front, not deep
    inside a metric."""
    from topklab.fidelity.traces import _header_crc

    path, _ = trace_file

    def resealed(edit):
        def apply(header):
            edit(header)
            header["header_crc32"] = _header_crc(header)
        return apply

    with pytest.raises(TraceError, match="'scale' is missing"):
        TraceFile(_resave_with_header(path, tmp_path / "a.safetensors", resealed(lambda h: h.pop("scale"))))
    with pytest.raises(TraceError, match=r"layer5\.q"):
        TraceFile(_resave_with_header(path, tmp_path / "b.safetensors", resealed(lambda h: h.update(layers=[0, 5]))))
    TraceFile(_resave_with_header(path, tmp_path / "c.safetensors", resealed(lambda h: None))).verify()


def test_capture_records_post_rope_attention(model, rng):
    """Dense attention recomputed from the captured q, k, v equals what the model fed into o_proj."""
    ids = torch.randint(0, 256, (2, 24), generator=rng)
    seen = {}
    attn = model.model.layers[1].self_attn
    handle = attn.o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    traces, got_ids = capture(model, ids, layers=[1], prompt_len=20)
    handle.remove()
    t = traces[1]
    assert t.q.shape == (2, 4, 24, 16) and t.k.shape == (2, 2, 24, 16) and t.hidden.shape == (2, 24, 64)
    assert t.prompt_len == 20 and torch.equal(got_ids, ids)
    k = t.k.repeat_interleave(t.group_size, dim=1)
    v = t.v.repeat_interleave(t.group_size, dim=1)
    logits = (t.q @ k.transpose(-1, -2)) * t.scale
    logits = logits.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    out = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(2, 24, -1)
    torch.testing.assert_close(out, seen["x"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("generation", [{}, {"cache_implementation": "static"}, {"eos_token_id": [300, 301]}])
def test_capture_decode_steps_equal_teacher_forcing(model, rng, generation, monkeypatch):
    """Also when the model's generation config asks for a static cache (whose buffer's tail is not the new keys) or
    lists several EOS ids (Llama 3 style)."""
    for key, value in generation.items():
        monkeypatch.setattr(model.generation_config, key, value)
        if key == "eos_token_id":
            monkeypatch.setattr(model.config, key, value)
    ids = torch.randint(0, 256, (1, 16), generator=rng)
    generated, seq = capture(model, ids, layers="all", decode_steps=4)
    forced, _ = capture(model, seq, layers="all", prompt_len=16)
    assert seq.shape == (1, 19)
    for layer in generated:
        for field in ("q", "k", "v", "hidden"):
            torch.testing.assert_close(getattr(generated[layer], field), getattr(forced[layer], field),
                                       atol=1e-5, rtol=1e-4)


def test_resolve_layers(model):
    assert resolve_layers(model, None) == [0, 1, 2]
    assert resolve_layers(model, "spread:2") == [0, 2]
    assert resolve_layers(model, "2,0") == [0, 2]
    with pytest.raises(ValueError, match="do not exist"):
        resolve_layers(model, [5])


def test_capture_input_errors(model):
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        capture(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_len"):
        capture(model, torch.zeros(1, 5, dtype=torch.long), prompt_len=9)
