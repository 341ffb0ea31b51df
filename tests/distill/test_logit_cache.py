"""The on-disk logit cache: written top-k equals a plain-PyTorch top-k of the teacher's log-probs up to the value
dtype's rounding; sizes, checksums, manifest validation, vocabulary checks; CachedTeacher refuses other data;
an interrupted write resumes to identical files, recomputing only what was missing."""
import json

import pytest
import torch
from safetensors.torch import load_file

from kdarch import CausalLM, get_preset
from kdarch.distill import TopKTeacher, kd_loss
from kdarch.distill.logit_cache import MANIFEST, CachedTeacher, LogitCache, ids_dtype_for, write_logit_cache
from kdarch.distill.teachers import ModelTeacher
from kdarch.distill.vocab import VocabMismatchError, vocab_fingerprint

FP = vocab_fingerprint({f"t{i}": i for i in range(256)})
N, T, K, SHARD = 10, 12, 8, 4  # three shards: 4 + 4 + 2 sequences
ROUNDING = {"bfloat16": 2 ** -8, "float16": 2 ** -11, "float32": 1e-6}


class CountingTeacher(ModelTeacher):
    """Counts the sequences it computes; raises after `fail_after` calls (an interrupted write)."""

    def __init__(self, model, fail_after=None):
        super().__init__(model, name="debug-teacher", fingerprint=FP)
        self.rows, self.calls, self.fail_after = 0, 0, fail_after

    def _run(self, input_ids_BT, indices_B, hidden_states):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        self.rows += input_ids_BT.shape[0]
        return super()._run(input_ids_BT, indices_B, hidden_states)


@pytest.fixture(scope="module")
def teacher_model():
    torch.manual_seed(0)
    return CausalLM(get_preset("debug")).eval()


@pytest.fixture(scope="module")
def data():
    return torch.randint(0, 256, (N, T), generator=torch.Generator().manual_seed(1))


def write(model, data, path, **kw):
    t = CountingTeacher(model, kw.pop("fail_after", None))
    write_logit_cache(t, data, path, **{"k": K, "shard_size": SHARD, "batch_size": 3, **kw})
    return t


def files(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher_model, data):
    path = tmp_path_factory.mktemp("cache") / "c"
    write(teacher_model, data, path)
    return path


# ---------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_equals_topk_of_the_teachers_logprobs(tmp_path, teacher_model, data, dtype):
    write(teacher_model, data, tmp_path, dtype=dtype)
    with torch.no_grad():
        logp = teacher_model(data).logits.double().log_softmax(-1)  # [N, T, V], independent of the cache's batching
    cache = LogitCache(tmp_path)
    assert len(cache) == N and (cache.k, cache.seq_len, cache.vocab_size, cache.dtype) == (K, T, 256, dtype)
    assert cache.teacher_id == "debug-teacher" and cache.fingerprint == FP
    order = torch.tensor([7, 0, 9, 4, 4])  # across shards, repeated, unsorted
    ids, tk = cache.get(order)
    assert torch.equal(ids, data[order]) and ids.dtype == torch.int64
    assert tk.ids.shape == tk.values.shape == (5, T, K) and tk.values.dtype == torch.float32
    assert tk.values_are == "logprobs" and tk.mode == "tail"
    ref_vals = logp[order].topk(K, -1).values
    tol = ROUNDING[dtype]
    torch.testing.assert_close(tk.values.double(), ref_vals, rtol=tol, atol=1e-6)  # top-k values, sorted
    torch.testing.assert_close(tk.values.double(), logp[order].gather(-1, tk.ids), rtol=tol, atol=1e-6)  # at the ids
    ref_tail = 1 - logp[order].gather(-1, tk.ids).exp().sum(-1)
    torch.testing.assert_close(tk.tail_mass.double(), ref_tail, rtol=1e-5, atol=1e-6)
    shard = load_file(str(tmp_path / "shard_00000.safetensors"))
    assert shard["topk_ids"].dtype == torch.uint16 and shard["input_ids"].dtype == torch.int32
    assert shard["topk_logprobs"].dtype == getattr(torch, dtype) and shard["tail_mass"].dtype == torch.float32


def test_layout_sizes_and_manifest(cache_dir, data):
    m = json.loads((cache_dir / MANIFEST).read_text())
    assert [(s["file"], s["start"], s["count"]) for s in m["shards"]] == [
        ("shard_00000.safetensors", 0, 4), ("shard_00001.safetensors", 4, 4), ("shard_00002.safetensors", 8, 2)]
    assert sorted(f.name for f in cache_dir.iterdir()) == [MANIFEST] + [s["file"] for s in m["shards"]]
    on_disk = sum(f.stat().st_size for f in cache_dir.iterdir())
    assert LogitCache(cache_dir).bytes_per_token == pytest.approx(on_disk / (N * T))
    assert ids_dtype_for(65536) == "uint16" and ids_dtype_for(65537) == "int32"


def test_get_bad_indices(cache_dir):
    cache = LogitCache(cache_dir)
    with pytest.raises(IndexError, match=r"indices: expected sequence indices in \[0, 10\), got 10"):
        cache.get([3, 10])
    with pytest.raises(IndexError, match=r"indices: expected sequence indices in \[0, 10\), got -1"):
        cache.get([-1])
    for bad in ([], [[1, 2]], [1.0], torch.tensor([True])):
        with pytest.raises(ValueError, match="1-D list or tensor of sequence indices"):
            cache.get(bad)


# ---------------------------------------------------------------------------------------------------- integrity
def copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_shard_is_refused_naming_it(cache_dir, tmp_path):
    c = copy(cache_dir, tmp_path / "c")
    f = c / "shard_00001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit in the tensor data: same size, other checksum
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: corrupt \(its size or sha256 differs"):
        LogitCache(c)
    LogitCache(c, verify=False)  # same size: only the checksum could tell
    raw[:8] = (10 ** 9).to_bytes(8, "little")  # a header length far past the end of the file
    f.write_bytes(bytes(raw))
    cache = LogitCache(c, verify=False)
    with pytest.raises(ValueError, match="shard_00001.safetensors: not a readable safetensors file"):
        cache.get([5])
    f.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ValueError, match="shard_00001.safetensors: corrupt"):
        LogitCache(c, verify=False)
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard_00001.safetensors: missing \(listed in manifest.json\)"):
        LogitCache(c)


def tamper(m, how):
    if how == "missing_k":
        del m["k"]
    elif how == "k_string":
        m["k"] = "8"
    elif how == "k_too_big":
        m["k"] = 300
    elif how == "dtype":
        m["dtype"] = "int8"
    elif how == "format":
        m["format"] = "something-else"
    elif how == "start":
        m["shards"][1]["start"] = 5
    elif how == "count":
        m["shards"][2]["count"] = 4
    elif how == "sha":
        m["files"]["shard_00000.safetensors"]["sha256"] = "xyz"
    elif how == "unlisted_file":
        del m["files"]["shard_00001.safetensors"]
    elif how == "version":
        m["format_version"] = 1
    elif how == "duplicate":
        m["shards"].insert(1, m["shards"][0])
    elif how == "incomplete":  # what an interrupted write leaves: the last shard neither listed nor recorded
        del m["files"][m["shards"].pop()["file"]]
    return m


@pytest.mark.parametrize("how, match", [
    ("missing_k", "manifest.json: k: expected an int >= 1, got 'nothing'"),
    ("k_string", "manifest.json: k: expected an int >= 1, got '8'"),
    ("k_too_big", "manifest.json: k: expected an int <= vocab_size=256, got 300"),
    ("dtype", "manifest.json: dtype: expected one of"),
    ("format", "manifest.json: format: expected 'kdarch-logit-cache', got 'something-else'"),
    ("version", "manifest.json: format_version: expected 2"),
    ("start", r"shards\[1\].start: expected a multiple of shard_size=4"),
    ("count", r"shards\[2\].count: expected 2, got 4"), ("sha", "files: expected a map of file name"),
    ("unlisted_file", r"shards\[1\].file: expected a file listed under 'files'"),
    ("duplicate", "listed once each"), ("incomplete", "expected all 3 shards; it lists 2: the write was interrupted")])
def test_tampered_manifest_is_refused_naming_the_field(cache_dir, tmp_path, how, match):
    c = copy(cache_dir, tmp_path / "c")
    (c / MANIFEST).write_text(json.dumps(tamper(json.loads((c / MANIFEST).read_text()), how)))
    with pytest.raises(ValueError, match=match):
        LogitCache(c)


def test_manifest_lying_about_shapes_or_json(cache_dir, tmp_path):
    c = copy(cache_dir, tmp_path / "c")
    m = json.loads((c / MANIFEST).read_text())
    (c / MANIFEST).write_text(json.dumps({**m, "seq_len": T - 1}))  # valid on its own, wrong for the shards
    with pytest.raises(ValueError, match=r"shard_00000.safetensors: input_ids: expected torch.int32 \(4, 11\) "
                                         r"\(from the manifest\), got an int32 tensor of shape \(4, 12\)"):
        LogitCache(c).get([0])
    (c / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not a readable JSON file"):
        LogitCache(c)
    with pytest.raises(FileNotFoundError, match="expected a logit cache directory"):
        LogitCache(tmp_path)


def test_expected_vocab_and_fingerprint(cache_dir):
    LogitCache(cache_dir, expect_vocab_size=256, expect_fingerprint=FP)
    with pytest.raises(VocabMismatchError, match="cached vocab size 256 .*expected 300"):
        LogitCache(cache_dir, expect_vocab_size=300)
    other = vocab_fingerprint({"a": 0})
    with pytest.raises(VocabMismatchError, match=f"fingerprint {FP} .*expected {other}"):
        LogitCache(cache_dir, expect_fingerprint=other)


# ---------------------------------------------------------------------------------------------------- CachedTeacher
def test_cached_teacher_serves_rows_and_refuses_other_data(cache_dir, data):
    t = CachedTeacher(cache_dir)
    assert (t.name, t.fingerprint, t.vocab_size) == ("debug-teacher", FP, 256)
    idx = torch.tensor([8, 2])
    sig = t(data[idx], idx).signal
    ref_ids, ref = LogitCache(cache_dir).get(idx)
    assert isinstance(sig, TopKTeacher) and torch.equal(sig.ids, ref.ids) and torch.equal(sig.values, ref.values)
    prefix = t(data[idx, :5], idx).signal  # causal rows: a prefix of a cached sequence is served too
    assert torch.equal(prefix.ids, ref.ids[:, :5]) and torch.equal(prefix.tail_mass, ref.tail_mass[:, :5])
    assert CachedTeacher(cache_dir, mode="renormalise")(data[idx], idx).signal.mode == "renormalise"
    s = torch.randn(2, T, 256, requires_grad=True)
    assert kd_loss(s, sig, data[idx]).isfinite()

    wrong = data[idx].clone()
    wrong[1, 3] = (wrong[1, 3] + 1) % 256
    with pytest.raises(ValueError, match=r"differ from the cache's at sequence index 2 \(token 3"):
        t(wrong, idx)
    with pytest.raises(ValueError, match="at sequence index 8"):
        t(data[[2, 8]], [8, 2])  # the right rows under the wrong indices
    with pytest.raises(ValueError, match="indices_B: expected the dataset sequence index of every batch row, got None"):
        t(data[idx])
    with pytest.raises(ValueError, match="holds no hidden states"):
        t(data[idx], idx, hidden_states=True)
    with pytest.raises(ValueError, match=r"indices_B: expected one index per batch row \(2\), got 3"):
        t(data[idx], [8, 2, 1])
    with pytest.raises(ValueError, match="input_ids: expected at most the cache's 12 tokens per sequence, got 13"):
        t(torch.cat([data[idx], data[idx, :1]], 1), idx)
    with pytest.raises(ValueError, match="mode: expected one of 'tail', 'renormalise', got 'dense'"):
        CachedTeacher(cache_dir, mode="dense")


def test_cached_bigger_teacher_aligns_to_the_student(tmp_path):
    torch.manual_seed(0)
    m = CausalLM(get_preset("debug", vocab_size=300)).eval()
    with torch.no_grad():
        m.head.weight[256:] *= 1.5  # padding rows that win some top-k places
    data = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(2))
    write_logit_cache(ModelTeacher(m, fingerprint=FP), data, tmp_path, k=K, shard_size=2, dtype="float32")
    raw = LogitCache(tmp_path).get([0, 1, 2])[1]
    assert (raw.ids >= 256).any()
    t = CachedTeacher(tmp_path).align_to(256, student_fingerprint=FP)
    sig = t(data, [0, 1, 2]).signal
    assert t.vocab_size == 256 and sig.ids.max() < 256 and sig.k < K
    with torch.no_grad():
        logp = m(data).logits.double().log_softmax(-1)
    torch.testing.assert_close(sig.tail_mass.double(), 1 - logp.gather(-1, sig.ids).exp().sum(-1), rtol=1e-4, atol=1e-5)
    assert kd_loss(torch.randn(3, T, 256), sig, None, alpha=1.0, kind="reverse_kl").isfinite()


# ---------------------------------------------------------------------------------------------------- writing, resume
def test_resume_after_a_lost_shard_recomputes_only_it(cache_dir, tmp_path, teacher_model, data):
    c = copy(cache_dir, tmp_path / "c")
    before = files(cache_dir)
    m = json.loads((c / MANIFEST).read_text())
    del m["files"][m["shards"].pop()["file"]]
    (c / MANIFEST).write_text(json.dumps(m))
    (c / "shard_00002.safetensors").unlink()
    seen = []
    t = write(teacher_model, data, c, progress=lambda done, total: seen.append((done, total)))
    assert t.rows == 2 and files(c) == before
    assert seen[0] == (8, N) and seen[-1] == (N, N)
    assert write(teacher_model, data, c).rows == 0  # complete: nothing to do


def test_resume_after_a_crash_mid_shard(cache_dir, tmp_path, teacher_model, data):
    c = tmp_path / "c"
    with pytest.raises(RuntimeError, match="interrupted"):
        write(teacher_model, data, c, fail_after=3)  # batches of 3: shard 0 = 2 calls, dies inside shard 1
    m = json.loads((c / MANIFEST).read_text())
    assert [s["file"] for s in m["shards"]] == ["shard_00000.safetensors"]
    assert sorted(f.name for f in c.iterdir()) == [MANIFEST, "shard_00000.safetensors"]
    (c / ".shard_00001.safetensors.abc123.tmp").write_bytes(b"half a shard")  # left by a killed process
    (c / "shard_00002.safetensors").write_bytes(b"written but never listed")
    t = write(teacher_model, data, c)
    assert t.rows == N - SHARD and files(c) == files(cache_dir)


def test_resume_recomputes_a_corrupt_listed_shard(cache_dir, tmp_path, teacher_model, data):
    c = copy(cache_dir, tmp_path / "c")
    f = c / "shard_00000.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x80]))
    assert write(teacher_model, data, c).rows == SHARD and files(c) == files(cache_dir)


def test_other_arguments_on_an_existing_cache_are_refused(cache_dir, tmp_path, teacher_model, data):
    c = copy(cache_dir, tmp_path / "c")
    other = data.clone()
    other[9, 0] = (other[9, 0] + 1) % 256
    for kw, field in ((dict(k=4), "k=8"), (dict(dtype="float32"), "dtype='bfloat16'"),
                      (dict(shard_size=5), "shard_size=4"), (dict(teacher_id="other"), "teacher_id='debug-teacher'"),
                      (dict(fingerprint="sha256:00"), "fingerprint="), (dict(data=other), "input_ids_sha256="),
                      (dict(data=data[:, :6]), "seq_len=12")):
        d = kw.pop("data", data)
        with pytest.raises(ValueError, match=f"holds a logit cache with {field}.*another directory"):
            write(teacher_model, d, c, **kw)
    assert files(c) == files(cache_dir)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
        write(teacher_model, data, tmp_path / "foreign")


def test_write_bad_arguments(tmp_path, teacher_model, data, cache_dir):
    t = ModelTeacher(teacher_model)
    for kw, match in ((dict(k=0), r"k: expected an int in \[1, 256\], got 0"),
                      (dict(k=257), r"k: expected an int in \[1, 256\], got 257"),
                      (dict(shard_size=0), "shard_size: expected an int >= 1"),
                      (dict(batch_size=1.5), "batch_size: expected an int >= 1, got 1.5"),
                      (dict(dtype="int8"), "dtype: expected one of"),
                      (dict(teacher_id=""), "teacher_id: expected a non-empty")):
        with pytest.raises(ValueError, match=match):
            write_logit_cache(t, data, tmp_path / "x", **kw)
    for bad in (data[0], data.float(), data[:0]):
        with pytest.raises(ValueError, match=r"input_ids: expected a non-empty int tensor \[N, T\]"):
            write_logit_cache(t, bad, tmp_path / "x")
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 256\), got 505"):
        write_logit_cache(t, data + 250, tmp_path / "x")
    with pytest.raises(TypeError, match="teacher: expected a kdarch.distill Teacher"):
        write_logit_cache("teacher", data, tmp_path / "x")
    with pytest.raises(TypeError, match="teacher: expected a kdarch.distill Teacher"):
        write_logit_cache(teacher_model, data, tmp_path / "x")  # a bare module: wrap it, ModelTeacher(module)
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="the teacher's signal: expected dense logits"):
        write_logit_cache(CachedTeacher(cache_dir), data, tmp_path / "y")

