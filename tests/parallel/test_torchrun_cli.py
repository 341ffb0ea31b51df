"""`torchrun -m kdarch train|distill` against `python -m kdarch train|distill`: the same losses (dp_shard=2, ep=2;
pp=2 DualPipeV, training and distilling); rank 0 alone writes the run directory and prints the result; a [parallel]
plan that does not fit the world size fails with one line naming the field."""
import json
import os
import subprocess
import sys

FLAGS = ["--model.preset", "debug", "--model.n_layers", "4", "--data.tokenizer", "bytes", "--data.seq_len", "32",
         "--train.steps", "4", "--train.batch_size", "4", "--train.log_every", "1", "--train.threads", "1",
         "--train.deterministic", "true", "--train.progress", "false", "--train.eval_sequences", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_train_equals_one_process(tmp_path):
    one = subprocess.run([sys.executable, "-m", "kdarch", "train", *FLAGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, "-m", "kdarch", "train", *FLAGS, "--parallel.dp_shard", "2", "--parallel.ep",
                          "2", "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert two.stdout.count('"eval_loss"') == 1  # rank 0 alone prints the result
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "two" / "checkpoints").exists()  # the finished stage's checkpoint was discarded once


def test_torchrun_plan_that_does_not_fit_fails_naming_the_field(tmp_path):
    res = subprocess.run([*TORCHRUN, "-m", "kdarch", "train", *FLAGS, "--parallel.dp_shard", "4", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode != 0
    assert "kdarch train: error: parallel.dp_replicate: expected pp*dp_replicate*dp_shard*tp == world size 2" \
        in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_torchrun_distill_with_dualpipev_equals_one_process(tmp_path):
    """`torchrun -m kdarch distill` with pp=2 DualPipeV from a kdarch teacher trained here: the student's losses
    are the 1-process run's; relation KD, which a pipeline's last stage cannot compute, is refused by the loop."""
    teacher = subprocess.run([sys.executable, "-m", "kdarch", "train", *FLAGS, "--out", str(tmp_path / "teacher")],
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    distill = [*FLAGS, "--distill.teacher", str(tmp_path / "teacher" / "model"), "--scratch", "false"]
    one = subprocess.run([sys.executable, "-m", "kdarch", "distill", *distill, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    pp_flags = ["--parallel.pp", "2", "--parallel.pp_schedule", "DualPipeV", "--parallel.pp_microbatches", "4"]
    pp = subprocess.run([*TORCHRUN, "-m", "kdarch", "distill", *distill, *pp_flags, "--out", str(tmp_path / "pp")],
                        capture_output=True, text=True, timeout=300, env=ENV)
    assert pp.returncode == 0, pp.stderr[-3000:]
    a, b = _losses(tmp_path / "one" / "student"), _losses(tmp_path / "pp" / "student")
    assert len(a) == len(b) == 4 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert (tmp_path / "pp" / "report.json").is_file()
    res = subprocess.run([*TORCHRUN, "-m", "kdarch", "distill", *distill, *pp_flags, "--distill.relation_weight",
                          "0.1", "--out", str(tmp_path / "feat")], capture_output=True, text=True, timeout=300,
                         env=ENV)
    assert res.returncode != 0
    assert "kdarch distill: error: distill.relation_weight: expected 0 with parallel.pp=2" in res.stderr, \
        res.stderr[-2000:]


def test_torchrun_train_with_dualpipev_equals_one_process(tmp_path):
    one = subprocess.run([sys.executable, "-m", "kdarch", "train", *FLAGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    pp = subprocess.run([*TORCHRUN, "-m", "kdarch", "train", *FLAGS, "--parallel.pp", "2", "--parallel.pp_schedule",
                         "DualPipeV", "--parallel.pp_microbatches", "4", "--out", str(tmp_path / "pp")],
                        capture_output=True, text=True, timeout=300, env=ENV)
    assert pp.returncode == 0, pp.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "pp")
    assert len(a) == len(b) == 4 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_torchrun_on_policy_distill_equals_one_process(tmp_path):
    """`torchrun -m kdarch distill` with distill.on_policy = 0.5 over dp_shard=2: each rank samples its own rows
    through the sharded student, and the losses are the 1-process run's."""
    teacher = subprocess.run([sys.executable, "-m", "kdarch", "train", *FLAGS, "--out", str(tmp_path / "teacher")],
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    distill = [*FLAGS, "--distill.teacher", str(tmp_path / "teacher" / "model"), "--scratch", "false",
               "--distill.on_policy", "0.5", "--distill.rollout_tokens", "6", "--distill.rollout_temperature", "1.0"]
    one = subprocess.run([sys.executable, "-m", "kdarch", "distill", *distill, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, "-m", "kdarch", "distill", *distill, "--parallel.dp_shard", "2", "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = [[json.loads(line) for line in (tmp_path / d / "student" / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert [r["on_policy"] for r in rows[0]] == [r["on_policy"] for r in rows[1]] == [0.0, 1.0, 0.0, 1.0]
    rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(*rows)]
    print(f"torchrun on-policy distill, dp_shard=2: per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
    assert len(rel) == 4 and max(rel) < 1e-4, rel
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["student"]["on_policy"]["sequences"] == 2 * 4  # both ranks' rollouts, summed
