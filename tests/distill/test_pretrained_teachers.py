"""Pretrained teachers of other architectures: Hugging Face directories (Llama, Gemma-3, Qwen2) and GGUF files.

Each teacher is a small random model built here; the reference is the in-memory model itself, so the checks say
that loading (from a directory, or from a GGUF file through the import) gives back the same function. The GGUF
file is written with the `gguf` package from the model's own tensors and a kdarch tokenizer's vocabulary."""

import json

import pytest
import torch

from kdarch.convert.gguf import import_gguf
from kdarch.distill import HFTeacher, load_teacher
from kdarch.train.data import embedded_corpus, pack
from kdarch.train.tokenizer import BPETokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(embedded_corpus()[:60], 320)


def hf_model(arch: str, vocab_size: int, seed: int = 0):
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab_size, **SMALL)
        cls = transformers.LlamaForCausalLM
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(vocab_size=vocab_size, head_dim=8, sliding_window=8, **SMALL)
        cls = transformers.Gemma3ForCausalLM
    else:
        cfg = transformers.Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=False, **SMALL)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    return cls(cfg).eval()


def ids(V, B=2, T=20, seed=1):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_hf_teacher_of_any_causal_lm_architecture(arch, tokenizer, tmp_path):
    V = tokenizer.vocab_size
    m = hf_model(arch, V)
    m.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    x = ids(V, T=20)  # longer than Gemma's sliding window
    with torch.no_grad():
        ref = m(x).logits
    t = load_teacher(tmp_path, dtype=torch.float32)
    assert isinstance(t, HFTeacher) and t.fingerprint == tokenizer.fingerprint and t.vocab_size == V
    assert t.name.startswith(f"{type(m).__name__}@sha256:")
    torch.testing.assert_close(t(x).signal, ref, rtol=1e-5, atol=1e-5)
    bf16 = load_teacher(tmp_path)  # the default compute dtype, float32 logits
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16(x).signal.dtype == torch.float32
    torch.testing.assert_close(bf16(x).signal, ref, rtol=0, atol=0.05)


def write_gguf(model, tokenizer, path):
    """A Qwen2 GGUF file (float32 tensors, a byte-level BPE vocabulary) holding `model` and `tokenizer`."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3: control, 1: normal
    merges = json.loads(tokenizer.to_hf().to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for key, t in model.state_dict().items():
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_teacher_is_the_model_it_was_written_from(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("KDARCH_CACHE", str(tmp_path / "cache"))
    V = tokenizer.vocab_size
    m = hf_model("qwen2", V)
    path = write_gguf(m, tokenizer, tmp_path / "tiny.gguf")
    x = ids(V)
    with torch.no_grad():
        ref = m(x).logits
    t = load_teacher(path, dtype=torch.float32)
    torch.testing.assert_close(t(x).signal, ref, rtol=1e-6, atol=1e-6)
    imported = import_gguf(path)
    assert imported.parent == tmp_path / "cache" / "gguf" and imported.name.startswith("tiny-")
    assert tokenizer.get_vocab().items() <= load_tokenizer(imported).get_vocab().items()  # every token, same id

    stamp = (imported / "gguf_source.json").stat().st_mtime_ns  # imported once: the next load reads the directory
    assert import_gguf(path) == imported and (imported / "gguf_source.json").stat().st_mtime_ns == stamp
    write_gguf(hf_model("qwen2", V, seed=1), tokenizer, path)  # other bytes under the same name: imported afresh
    assert import_gguf(path) != imported
    assert not torch.allclose(load_teacher(path, dtype=torch.float32)(x).signal, ref)


def test_gguf_errors(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match=r"model.gguf: expected a GGUF file \(starting with the bytes b'GGUF'\), "
                                         r"got one starting with b'PK\\x03\\x04'"):
        import_gguf(fake)
    with pytest.raises(FileNotFoundError, match="expected a .gguf file, got .*missing.gguf"):
        import_gguf(tmp_path / "missing.gguf")


def test_rows_begin_as_the_tokenizer_begins_every_text(tokenizer, tmp_path):
    """A tokenizer whose post-processor adds a BOS (as Gemma's and Llama's do) gets it at the start of every
    packed row; kdarch's own tokenizers add none, and their rows are the plain stream."""
    from tokenizers import processors

    docs = embedded_corpus()[:8]
    plain = pack(docs, tokenizer, 16)
    assert tokenizer.prefix_ids == [] and plain[0, 0] != tokenizer.bos_id
    hf = tokenizer.to_hf()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>",
                                                                                           tokenizer.bos_id)])
    hf.save(str(tmp_path / "tokenizer.json"))
    with_bos = load_tokenizer(tmp_path)
    assert with_bos.prefix_ids == [tokenizer.bos_id]
    rows = pack(docs, with_bos, 16)
    assert (rows[:, 0] == tokenizer.bos_id).all()
    stream = plain.reshape(-1)
    torch.testing.assert_close(rows[:, 1:].reshape(-1), stream[:rows[:, 1:].numel()], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_distill_from_a_hugging_face_teacher_fills_its_report_row(arch, tokenizer, tmp_path, capsys):
    """`kdarch distill` from a Llama / Gemma-3 directory whose tokenizer adds a BOS: the student takes that
    tokenizer (every row begins with the BOS), and the teacher's report row has what a student's has."""
    from tokenizers import processors

    from kdarch.cli import main

    teacher = tmp_path / "teacher"
    hf_model(arch, tokenizer.vocab_size).save_pretrained(teacher)
    hf = tokenizer.to_hf()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>",
                                                                                           tokenizer.bos_id)])
    hf.save(str(teacher / "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(embedded_corpus()[:6]))
    out = tmp_path / "run"
    assert main(["distill", "--out", str(out), "--distill.teacher", str(teacher), "--distill.teacher_dtype",
                 "float32", "--model.preset", "debug", "--data.dataset", str(corpus), "--data.seq_len", "32",
                 "--train.steps", "2", "--train.batch_size", "4", "--train.eval_sequences", "4",
                 "--train.progress", "false"]) == 0
    report = json.loads((out / "report.json").read_text())
    row = report["teacher"]
    assert row["source"] == f"Hugging Face model {teacher}"
    assert row["params_total"] == sum(p.numel() for p in hf_model(arch, tokenizer.vocab_size).parameters())
    assert row["params_active"] == row["params_total"] and row["dtype"] == "float32"
    assert row["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x head dim x fp32
    assert row["generate_tokens_per_s"] > 0 and row["generate_repeats"] == 3 and row["peak_memory_mb"] > 0
    assert row["top1_agreement"] == 1.0 and 0 < row["eval_loss"] < 10
    s, b, t = (report[k]["eval_loss"] for k in ("student", "scratch", "teacher"))  # the teacher's loss counts
    assert report["gap_closed"] == pytest.approx((b - s) / (b - t))
    tok = load_tokenizer(out / "student" / "model")
    assert tok.prefix_ids == [tokenizer.bos_id]


def test_compiled_teacher_gives_the_eager_logits(tokenizer, tmp_path):
    m = hf_model("llama", tokenizer.vocab_size)
    m.save_pretrained(tmp_path)
    x = ids(tokenizer.vocab_size)
    eager, compiled = (load_teacher(tmp_path, dtype=torch.float32, compile=c) for c in (False, True))
    assert eager.name == compiled.name  # the same weights: compiling changes how, not what
    torch.testing.assert_close(compiled(x).signal, eager(x).signal, rtol=1e-5, atol=1e-5)
