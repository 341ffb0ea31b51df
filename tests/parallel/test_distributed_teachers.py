"""Distillation teachers on 2 gloo processes (dp_shard=2) against the same distillation in 1 process: a kdarch and
a Hugging Face teacher sharded with FSDP2 (`distill.teacher_shard`) give the 1-process losses while each rank holds
only its half of the teacher's weights; a logit cache gives them too, each rank looking up exactly its own rows.
A fresh run's tokenizer is written by rank 0 only after every rank looked for a saved one."""
import json
import time
from pathlib import Path

import torch

from kdarch.config import get_preset
from kdarch.model import CausalLM
from kdarch.testing import spawn_gloo
from kdarch.train.config import TrainSection

CFG = get_preset("debug", n_layers=4, bias_update_speed=0.01)
STEPS, BATCH, ACCUM = 4, 4, 2
REL = 1e-4


def _data() -> torch.Tensor:
    from kdarch.train.data import embedded_corpus
    raw = "\n\n".join(embedded_corpus()).encode()[:64 * 32]
    return torch.tensor(list(raw), dtype=torch.long).view(64, 32)  # byte tokens: real text, 64 rows of 32


def _cfg() -> TrainSection:
    return TrainSection(steps=STEPS, batch_size=BATCH, grad_accum=ACCUM, lr=3e-3, warmup_steps=1, log_every=1,
                        checkpoint_every=STEPS, progress=False, deterministic=True, threads=1, device="cpu")


def _teacher(kind: str, cache_dir: str | None):
    from kdarch.distill.logit_cache import CachedTeacher
    from kdarch.distill.teachers import ModelTeacher
    if kind == "cache":
        return CachedTeacher(cache_dir)
    torch.manual_seed(1)
    if kind == "kdarch":
        return ModelTeacher(CausalLM(get_preset("debug")).eval())
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64))
    return ModelTeacher(hf.float().eval(), name="llama")


def _run(run_dir, kind: str, cache_dir: str | None, shard: bool):
    from kdarch.train.config import DistillSection
    from kdarch.train.loop import train
    from kdarch.train.objective import DistillObjective
    torch.manual_seed(0)
    student = CausalLM(CFG)
    teacher = _teacher(kind, cache_dir)
    objective = DistillObjective(teacher, student, DistillSection(teacher_shard=shard), total_steps=STEPS)
    rows = train(student, _cfg(), _data(), run_dir, objective=objective).rows
    return teacher, rows


RUNS = {"kdarch": ({"dp_shard": 2}, "kdarch"), "hf": ({"dp_shard": 2}, "hf"), "cache": ({"dp_shard": 2}, "cache"),
        "kdarch, ep=2": ({"dp_shard": 2, "ep": 2}, "kdarch"), "kdarch, HSDP": ({"dp_replicate": 2}, "kdarch")}
"""The 2-process runs: (plan, teacher); a teacher is sharded over all data ranks whatever the student's layout."""


def _worker(rank, out_dir, cache_dir):
    from torch.distributed.tensor import DTensor

    from kdarch.distill.logit_cache import LogitCache
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    from kdarch.parallel.teacher import teacher_model
    asked, get = [], LogitCache.get

    def recording_get(self, indices_B):  # the rows this rank looks up
        asked.append(torch.as_tensor(indices_B).tolist())
        return get(self, indices_B)
    LogitCache.get = recording_get
    out = {}
    for name, (plan, kind) in RUNS.items():
        runtime.init_distributed(ParallelConfig(**plan), CFG)
        try:
            teacher, rows = _run(Path(out_dir) / name, kind, cache_dir, shard=kind != "cache")
        finally:
            runtime.teardown()
        model = teacher_model(teacher)
        params = list(model.parameters()) if model is not None else []
        out[name] = {"rows": rows, "total": sum(p.numel() for p in params),
                     "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
                     "dtensors": sum(isinstance(p, DTensor) for p in params), "params": len(params)}
        if kind == "cache":
            out["asked"] = asked
    Path(out_dir, f"out{rank}.json").write_text(json.dumps(out))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-6)


def test_sharded_teachers_and_logit_cache_under_dp_shard2_equal_one_process(tmp_path):
    from kdarch.distill.logit_cache import write_logit_cache
    from kdarch.train.data import Batches
    cache = write_logit_cache(_teacher("kdarch", None), _data(), tmp_path / "cache", k=16, dtype="float32",
                              shard_size=8)
    refs = {kind: _run(tmp_path / f"ref_{kind}", kind, str(cache), shard=False)[1]  # 1 process: whole teachers
            for kind in ("kdarch", "hf", "cache")}
    spawn_gloo(_worker, 2, str(tmp_path), str(cache))
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    for name, (plan, kind) in RUNS.items():
        rows, ref_rows = outs[0][name]["rows"], refs[kind]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows, ref_rows)]
        print(f"{name} teacher{' sharded' if kind != 'cache' else ''}, {plan}: per-step loss relative "
              f"differences {[f'{x:.1e}' for x in rel]}")
        for key in sorted(set(ref_rows[0]) - {"tokens_per_s", "ep_bytes_sent"}):
            assert max(_rel(a[key], b[key]) for a, b in zip(rows, ref_rows)) < REL, (name, key)
        assert ref_rows[-1]["loss"] < ref_rows[0]["loss"]
        if kind != "cache":  # each rank holds its shard of every teacher weight, and nothing more
            total = outs[0][name]["total"]
            assert outs[0][name]["dtensors"] == outs[0][name]["params"] > 0
            assert outs[0][name]["local"] + outs[1][name]["local"] == total
            assert all(o[name]["local"] <= 0.55 * total for o in outs), [o[name]["local"] for o in outs]
    assert outs[0]["cache"]["dtensors"] == 0
    # the logit cache: rank r looked up exactly rows [2r, 2r + 2) of every micro-batch of the global batch
    batches = Batches(_data(), BATCH, seed=_cfg().seed)
    micro = [next(batches)[0].tolist() for _ in range(STEPS * ACCUM)]
    for r, o in enumerate(outs):
        assert o["asked"] == [m[2 * r:2 * r + 2] for m in micro]


# --- the tokenizer of a fresh run ---------------------------------------------------------------------------
def _worker_tokenizer(rank, out_dir, corpus):
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    from kdarch.train import pipeline
    from kdarch.train.config import DataSection, RunConfig
    from kdarch.train.tokenizer import BPETokenizer
    if rank == 0:  # writes slowly: a broken tokenizer.json first, the real one 3 s later
        save = BPETokenizer.save

        def slow_save(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            Path(directory, "tokenizer.json").write_text("{")
            time.sleep(3)
            return save(self, directory)
        BPETokenizer.save = slow_save
    else:  # arrives late: while rank 0 would be writing
        split = pipeline.split_documents

        def late_split(*a, **kw):
            time.sleep(1)
            return split(*a, **kw)
        pipeline.split_documents = late_split
    runtime.init_distributed(ParallelConfig(dp_shard=2), CFG)
    try:
        run = RunConfig(data=DataSection(dataset=corpus, vocab_size=300, seq_len=16))
        data = pipeline.prepare_data(run, Path(out_dir) / "run", log=lambda *_: None)
        Path(out_dir, f"vocab{rank}.json").write_text(json.dumps(data.tokenizer.get_vocab(), sort_keys=True))
    finally:
        runtime.teardown()


def test_fresh_run_tokenizer_is_written_after_every_rank_looked(tmp_path):
    from kdarch.train.data import embedded_corpus
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in embedded_corpus()[:12]))
    spawn_gloo(_worker_tokenizer, 2, str(tmp_path), str(corpus))
    vocabs = [(tmp_path / f"vocab{r}.json").read_text() for r in range(2)]
    assert vocabs[0] == vocabs[1] and len(json.loads(vocabs[0])) == 300
    saved = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())  # complete, rank 0's
    assert len(saved["model"]["vocab"]) == 300

