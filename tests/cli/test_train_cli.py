"""The train script end to end on the debug preset: every command, the report, resume after SIGKILL, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdarch.cli import main

FAST = ["--model.preset", "debug", "--data.tokenizer", "bytes", "--data.seq_len", "32", "--train.batch_size", "4",
        "--train.log_every", "1", "--train.eval_sequences", "4", "--train.progress", "false"]


@pytest.fixture(scope="module", autouse=True)
def small_corpus(tmp_path_factory):
    """A 40 KB slice of the embedded corpus (12 documents), so that whole-dataset passes take seconds."""
    from kdarch.train.data import embedded_corpus
    corpus = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(embedded_corpus()[:12]):
        (corpus / f"{i:02d}.txt").write_text(doc)
    FAST.extend(["--data.dataset", str(corpus)])
    yield corpus
    del FAST[-2:]

CHAIN = """
[data]
tokenizer = "bytes"
seq_len = 32
[train]
steps = 3
batch_size = 4
warmup_steps = 1
log_every = 1
eval_sequences = 4
progress = false
[distill]
alpha = "adaptive:0.9->0.2"
temperature = "linear:2.0->1.0"
top_k = 16
feature_weight = 0.1
relation_weight = 0.1
[teacher]
model = {preset = "debug", hidden_size = 96, n_heads = 6}
train = {steps = 4}
[[students]]
name = "student"
model = {preset = "debug"}
[[students]]
name = "student2"
model = {preset = "debug", n_layers = 1, n_dense_layers = 1}
"""

MODEL_FIELDS = {"eval_loss", "perplexity", "top1_agreement", "params_total", "params_active",
                "kv_cache_bytes_per_token", "generate_tokens_per_s", "peak_memory_mb"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--out", str(out), "--train.steps", "3", *FAST]) == 0
    return out


def test_train_writes_a_model_metrics_and_checkpoint(trained, capsys):
    """`kdarch train --out DIR` lays DIR out like one stage of `kdarch distill`."""
    model_dir = trained / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (trained / "config.toml").is_file()
    # finished: the model and done.json stay, the checkpoints (weights + twice as much optimizer state) go
    assert json.loads((trained / "done.json").read_text())["steps"] == 3 and not (trained / "checkpoints").exists()


def test_resume_of_a_finished_run_loads_it(trained, capsys):
    before = (trained / "model" / "model.safetensors").read_bytes()
    assert main(["train", "--out", str(trained), "--resume", "--train.steps", "3", *FAST]) == 0
    assert "finished earlier (3 steps)" in capsys.readouterr().err
    assert (trained / "model" / "model.safetensors").read_bytes() == before


def test_eval_generate_convert(trained, tmp_path, capsys):
    model_dir = str(trained / "model")
    assert main(["eval", "--model", model_dir, "--data.seq_len", "32", "--train.eval_sequences", "4",
                 "--teacher", model_dir]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["eval_tokens"] == 4 * 31 and row["top1_agreement"] == 1.0 and row["perplexity"] > 1
    assert row["config"] == str(trained / "config.toml") and row["data"] == FAST[-1]  # the run's own data
    assert main(["generate", "--model", model_dir, "--prompt", "The ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--max-new-tokens", "4", "--speculative"]) == 0
    err = capsys.readouterr().err
    assert "MTP drafting: acceptance" in err and "tok/s (speculative / greedy" in err and "the same tokens" in err
    sampled = ["generate", "--model", model_dir, "--prompt", "The ", "--max-new-tokens", "6", "--seed", "3"]
    capsys.readouterr()
    assert main(sampled) == 0
    eager = capsys.readouterr().out
    from kdarch.model import generation
    with pytest.MonkeyPatch.context() as mp:  # the compiled step traced by aot_eager: seconds, not inductor's minute
        mp.setattr(generation, "compiled_decode_step", lambda device_type: torch.compile(
            generation.decode_step, fullgraph=True, backend="aot_eager"))
        assert main([*sampled, "--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert main([*sampled, "--compile", "--speculative"]) == 2
    assert "--compile: expected without --speculative" in capsys.readouterr().err
    hf = tmp_path / "hf"
    assert main(["convert", model_dir, str(hf), "--format", "hf"]) == 0
    assert json.loads((hf / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert (hf / "tokenizer.json").is_file()
    back = tmp_path / "back"
    assert main(["convert", str(hf), str(back), "--format", "kdarch"]) == 0
    from kdarch.pretrained import from_pretrained
    a, b = from_pretrained(model_dir), from_pretrained(back)
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_cache_teacher_then_distill_from_the_cache(trained, tmp_path, capsys):
    teacher = str(trained / "model")
    cache = tmp_path / "cache"
    data = ["--data.tokenizer", "bytes", "--data.seq_len", "32", *FAST[-2:]]
    assert main(["cache-teacher", "--teacher", teacher, "--out", str(cache), "--k", "8", "--shard-size", "4096",
                 "--batch-size", "64", *data]) == 0
    info = json.loads(capsys.readouterr().out.split("\ndistill from it")[0])
    assert info["k"] == 8 and 0 < info["bytes_per_token"] < 100
    out = tmp_path / "student"
    assert main(["distill", "--out", str(out), "--distill.teacher", str(cache), "--train.steps", "2", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["name"].startswith("CausalLM@")  # the id recorded in the cache's manifest
    # A cache covers the training sequences only: no held-out evaluation or agreement for it.
    assert "eval_loss" not in report["teacher"] and "top1_agreement" not in report["student"]
    assert report["teacher"]["cache_k"] == 8 and report["teacher"]["cache_sequences"] == info["sequences"]
    from kdarch import from_pretrained  # what the cache recorded of its teacher: sizes and the dtype it ran in
    from kdarch.train.device import resolve_dtype
    assert report["teacher"]["params_total"] == from_pretrained(teacher).config.num_params()
    assert report["teacher"]["dtype"] == str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert MODEL_FIELDS - {"top1_agreement"} <= set(report["student"]) & set(report["scratch"])
    # The cache refuses data it was not computed on.
    assert main(["distill", "--out", str(tmp_path / "other"), "--distill.teacher", str(cache), "--train.steps", "1",
                 *FAST, "--data.seq_len", "16"]) == 2
    assert f"was computed on other data ({info['sequences']} sequences x 32 tokens)" in capsys.readouterr().err


def test_distill_chain_report(tmp_path, capsys):
    cfg = tmp_path / "chain.toml"
    cfg.write_text(CHAIN)
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg), "--out", str(out), *FAST[-2:]]) == 0
    printed, logged = capsys.readouterr()
    assert f"report: {out / 'report.json'}" in printed
    # distill.student_init = "auto": the wider teacher's weights do not fit the first student; the second student
    # takes the first's.
    assert ("[student] random initialisation: its teacher's weights do not fit: the student's "
            "layers.0.attn_norm.weight: expected the teacher's shape (96,), got (64,)") in logged
    assert "[student2] initialised from student: teacher blocks [0] of 2" in logged
    report = json.loads((out / "report.json").read_text())
    for key in ("teacher", "student", "scratch"):
        assert MODEL_FIELDS <= set(report[key]), key
    assert report["teacher"]["top1_agreement"] == 1.0
    assert [r["name"] for r in report["chain"]] == ["student", "student2"]
    assert "init" not in report["chain"][0] and report["chain"][1]["init"].startswith("teacher blocks [0] of 2")
    assert report["chain"][1]["teacher"] == "student"
    s, b, t = (report[k]["eval_loss"] for k in ("student", "scratch", "teacher"))
    assert report["gap_closed"] == pytest.approx((b - s) / (b - t))
    assert report["student"]["params_total"] == report["scratch"]["params_total"]
    assert report["student"]["train_tokens"] == report["scratch"]["train_tokens"]
    assert (out / "report.md").read_text().startswith("# kdarch distillation report")
    assert (out / "config.toml").is_file()
    rows = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert {"kd_loss", "soft", "alpha", "temperature", "feature_loss", "relation_loss", "mtp_kd_loss"} <= set(rows[0])
    assert rows[0]["temperature"] == 2.0 and rows[-1]["temperature"] < 2.0
    # Finished stages are not retrained on --resume; a non-empty run directory needs it.
    assert main(["distill", "--config", str(cfg), "--out", str(out), *FAST[-2:]]) == 2
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the loaded teacher's own weights / reloaded in fp32
def test_a_student_can_start_from_its_teacher_s_weights(trained, tmp_path, capsys, dtype):
    out = tmp_path / "inherit"
    assert main(["distill", "--out", str(out), "--distill.teacher", str(trained / "model"), "--distill.student_init",
                 "teacher", "--distill.teacher_dtype", dtype, "--train.steps", "1", "--scratch", "false", *FAST]) == 0
    init = "teacher blocks [0, 1] of 2, 8 of 8 routed experts per MoE block by routed weight, 1 MTP module(s)"
    assert "[student] initialised from CausalLM@" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["student"]["init"] == init
    rows = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["alpha"] == 0.5  # distill.alpha = "auto" for an inherited student


def test_tiny_dataset_and_vocab_mismatch(trained, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("too short")
    assert main(["train", "--out", str(tmp_path / "a"), *FAST, "--data.dataset", str(small)]) == 2
    assert "but one sequence needs seq_len = 32" in capsys.readouterr().err
    # The teacher was trained on bytes; a student with a BPE vocabulary speaks another tokenizer.
    from kdarch.train.data import embedded_corpus
    from kdarch.train.tokenizer import BPETokenizer
    BPETokenizer.train(embedded_corpus()[:5], 400).save(tmp_path / "bpe")
    assert main(["distill", "--out", str(tmp_path / "b"), *FAST, "--data.tokenizer", str(tmp_path / "bpe"),
                 "--distill.teacher", str(trained / "model")]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and 'distill.cross_tokenizer = "uld" or "align"' in err and "Traceback" not in err


@pytest.mark.parametrize("mode, extra", [("align", []), ("uld", []),
                                         ("align", ["--distill.on_policy", "0.5", "--distill.rollout_tokens", "8"])])
def test_distill_from_a_teacher_of_another_tokenizer(trained, tmp_path, capsys, mode, extra):
    """The bytes teacher grades a BPE student through the byte-span alignment (its own samples too, on-policy);
    the student keeps its tokenizer."""
    from kdarch.train.data import embedded_corpus
    from kdarch.train.tokenizer import BPETokenizer
    BPETokenizer.train(embedded_corpus()[:5], 400).save(tmp_path / "bpe")
    out = tmp_path / mode
    assert main(["distill", "--out", str(out), *FAST, "--data.tokenizer", str(tmp_path / "bpe"), "--train.steps", "3",
                 "--distill.teacher", str(trained / "model"), "--distill.cross_tokenizer", mode, *extra]) == 0
    assert "distilled with distill.cross_tokenizer" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["eval_loss"] > 0 and "top1_agreement" not in report["student"]  # other tokens
    t, st, b = (report[k]["bits_per_byte"] for k in ("teacher", "student", "scratch"))  # the same text's bytes
    assert "eval_loss" not in report["teacher"] and report["gap_closed_bits_per_byte"] == pytest.approx((b - st) /
                                                                                                       (b - t))
    assert report["teacher"]["params_total"] > 0 and report["teacher"]["generate_tokens_per_s"] > 0
    rows = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["aligned_fraction"] <= 1 and r["soft"] >= 0 for r in rows)
    assert json.loads((out / "student" / "model" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    if extra:
        assert [r["on_policy"] for r in rows] == [0.0, 1.0, 0.0] and report["student"]["on_policy"]["rollouts"] == 1


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "kdarch", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_reproduces_the_losses(tmp_path):
    args = ["train", *FAST, "--train.steps", "40", "--train.checkpoint_every", "5", "--train.keep_last", "2"]
    straight = _run([*args, "--out", str(tmp_path / "a")])
    killed = _run([*args, "--out", str(tmp_path / "b")])
    ckpts = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "step_00000010").is_dir():
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read() if killed.poll() else "timeout"
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (ckpts / "step_00000040").exists(), "the run finished before it could be killed"
    resumed = _run([*args, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    assert "resumed from" in resumed.stderr.read()

    def losses(run):
        return [(r["step"], r["loss"], r["grad_norm"])
                for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert losses("b") == losses("a")
    assert [s for s, _, _ in losses("a")] == list(range(1, 41))


def _losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_resume_reproduces_the_losses(tmp_path, sig, code):
    """Ctrl-C / SIGTERM mid-run: the step finishes, a checkpoint is written, one line says how to go on, exit
    130 / 143 without a traceback; --resume then gives the uninterrupted run's losses exactly."""
    args = ["train", *FAST, "--train.steps", "30", "--train.checkpoint_every", "1000"]
    straight = _run([*args, "--out", str(tmp_path / "a")])
    stopped = _run([*args, "--out", str(tmp_path / "b")])
    metrics, deadline = tmp_path / "b" / "metrics.jsonl", time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert stopped.poll() is None and time.time() < deadline, stopped.stderr.read() if stopped.poll() else "timeout"
        time.sleep(0.01)
    stopped.send_signal(sig)
    assert stopped.wait(timeout=120) == code
    err = stopped.stderr.read()
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("interrupted at step "))
    step = int(line.split()[3].rstrip(";"))
    assert 3 <= step < 30, line  # stopped mid-run, at a step boundary
    assert "checkpoint written; continue with: kdarch train" in line
    assert line.endswith(f"--resume --out {tmp_path / 'b'}")
    assert (tmp_path / "b" / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
    resumed = _run([*args, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_a_second_signal_stops_at_once_without_a_half_checkpoint(tmp_path, monkeypatch, capsys):
    """A first Ctrl-C during step 2, a second one while that step's checkpoint is being written: the write is
    abandoned (no step-2 directory, no temp left), step 1's checkpoint stays, the exit is clean (130)."""
    from kdarch.train import checkpoint, loop

    def signal_on(n, fn):
        calls = {"n": 0}

        def wrapped(*args, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return fn(*args, **kw)
        return wrapped
    monkeypatch.setattr(loop.LMObjective, "__call__", signal_on(2, loop.LMObjective.__call__))
    monkeypatch.setattr(checkpoint, "save_pretrained", signal_on(2, checkpoint.save_pretrained))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *FAST, "--train.steps", "5", "--train.checkpoint_every", "1"]) == 130
    assert "interrupted again: stopped at once" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]


@pytest.mark.parametrize("precision", [["--train.dtype", "bfloat16"], ["--model.fp8", "true"]])
def test_train_in_bf16_and_fp8(tmp_path, precision):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--train.steps", "3", *FAST, *precision]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["skipped_steps"] == 0
    from kdarch.pretrained import from_pretrained
    assert from_pretrained(out / "model").config.fp8 == ("--model.fp8" in precision)


def test_quick_run_is_the_default_pipeline_on_small_models(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["distill", "--quick", "--out", str(out), "--train.steps", "2", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"teacher", "student", "scratch", "gap_closed"} <= set(report)
    from kdarch.train.pipeline import QUICK_STUDENT, QUICK_TEACHER
    for stage, want in (("teacher", QUICK_TEACHER), ("student", QUICK_STUDENT), ("scratch", QUICK_STUDENT)):
        cfg = json.loads((out / stage / "model" / "config.json").read_text())
        assert cfg["hidden_size"] == want.model.overrides.get("hidden_size", 64), stage
        assert json.loads((out / stage / "done.json").read_text())["steps"] == 2  # [train] over the quick stages
    assert report["student"]["init"].startswith("teacher blocks [0, 3] of 4, 8 of 16 routed experts")
    capsys.readouterr()
    assert main(["distill", "--quick", "--task", "arithmetic", "--out", str(tmp_path / "x")]) == 2
    assert "--quick: expected with --task lm" in capsys.readouterr().err
