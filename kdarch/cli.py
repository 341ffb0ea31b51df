"""The `kdarch` command line (also `python -m kdarch`).

    kdarch distill [--out DIR]         the main job: teacher -> distilled student vs scratch, with a report
    kdarch distill --quick             the same pipeline on debug-sized models: a first look in about a minute
    kdarch distill --task arithmetic   sequence-level (reasoning) distillation on checkable arithmetic
    kdarch train --config F.toml       train one model (e.g. a teacher) on a dataset
    kdarch eval --model DIR            held-out loss / perplexity (and agreement with --teacher)
    kdarch generate --model DIR        continue a prompt (sampling, or greedy with MTP drafting)
    kdarch convert SRC DST --format hf kdarch <-> Hugging Face DeepseekV3 directories
    kdarch cache-teacher --teacher DIR --out CACHE   top-k teacher logits for a dataset, sharded on disk
    kdarch info [--preset NAME]        sizes of a preset: parameters, active parameters, KV-cache bytes/token
    kdarch plan CONFIG --gpus N        a parallel plan on paper: memory/GPU, all-to-all, bubbles, tokens/s (--search)
    kdarch demo                        a one-minute tour: the tiny student trained briefly, generation

Every run command takes --config FILE.toml and --section.field flags that override it; `kdarch train
--help` lists each field with its meaning.

Exit status: 0 done; 2 a usage or configuration error (a flag, a field, a path, a vocabulary: one line naming
it, before any work where it can be known); 1 a failure while running (e.g. training diverged); 130 / 143
interrupted by Ctrl-C / SIGTERM after writing a checkpoint (continue with --resume).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from kdarch.config import PRESETS, get_preset


def embedded_text() -> bytes:
    """Real English text that ships with every Python: the pydoc topic help."""
    from kdarch.train.data import embedded_corpus
    return "\n\n".join(embedded_corpus()).encode("utf-8")


def cmd_info(args) -> int:
    cfg = get_preset(args.preset)
    print(json.dumps({"preset": args.preset, **cfg.figures()}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from kdarch.model import CausalLM

    torch.manual_seed(args.seed)
    cfg = get_preset("tiny", max_seq_len=256)
    model = CausalLM(cfg)
    print(f"kdarch demo: preset 'tiny' (MLA + {cfg.n_routed_experts}-expert top-{cfg.num_experts_per_tok} MoE "
          f"+ {cfg.n_mtp_modules} MTP module)")
    fig = cfg.figures()
    print(f"  parameters: {fig['params_total'] / 1e6:.2f}M total, {fig['params_active'] / 1e6:.2f}M active/token"
          f" (counted in the model: {model.num_params() / 1e6:.2f}M)")
    latent, full = fig["kv_cache_bytes_per_token"], fig["kv_cache_bytes_per_token_full_heads"]
    print(f"  KV cache per token (bf16): {latent} B latent vs {full} B full-head ({full / latent:.1f}x smaller)")

    data = torch.tensor(list(embedded_text()), dtype=torch.long)  # byte-level tokens (ids < 256)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.attach_bias_update(opt)
    seq, batch = 128, 8
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, data.numel() - seq, (batch,))
        ids = torch.stack([data[s:s + seq] for s in starts])
        out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {out.lm_loss.item():.3f}  mtp {out.mtp_loss.item():.3f}  "
                  f"{step * batch * seq / (time.perf_counter() - t0):.0f} tok/s")
    prompt = list(b"The ")
    t0 = time.perf_counter()
    new = model.generate([prompt], args.new_tokens, temperature=0.8, top_k=40,
                         generator=torch.Generator().manual_seed(args.seed))[0]
    dt = time.perf_counter() - t0
    text = bytes(t for t in prompt + new if t < 256).decode("utf-8", errors="replace")
    print(f"  sampled {len(new)} tokens (T=0.8, top-k 40) in {dt:.2f}s on the latent KV cache: {text!r}")
    from kdarch.model import generate_speculative
    drafted, stats = generate_speculative(model, prompt, args.new_tokens)
    same = drafted == model.generate([prompt], args.new_tokens)[0]
    print(f"  greedy with the MTP module drafting: {len(drafted)} tokens in {stats.main_steps + 1} main-model steps "
          f"(draft acceptance {stats.acceptance:.0%}); {'identical to' if same else 'DIFFERENT from'} plain greedy")
    return 0


def _run_config(args):
    from kdarch.train.config import load_run_config
    from kdarch.train.flags import overrides_from_args
    return load_run_config(args.config, {**overrides_from_args(args), **args.stage_overrides})


def _report_path(out, report: dict) -> None:
    rows = {k: {f: v for f, v in report[k].items() if f != "per_sequence"} for k in ("teacher", "student", "scratch")
            if k in report}
    extra = {k: report[k] for k in ("student_minus_scratch", "gap_closed") if k in report}
    print(json.dumps({**rows, **extra}, indent=2, default=str))
    print(f"report: {out / 'report.json'} (summary {out / 'report.md'})")


def _start_parallel(args, run, model_cfg=None):
    """Under torchrun (WORLD_SIZE > 1): join the process group, check [parallel] against the world size (and the
    model), build the DeviceMesh; None in a 1-process run."""
    from kdarch.checks import ConfigError
    from kdarch.parallel import runtime
    from kdarch.train.device import resolve_device
    if runtime.env_world_size() == 1:
        return None
    if args.out is None:
        raise ConfigError("--out: expected a run directory under torchrun (every rank must name the same one)")
    return runtime.init_distributed(run.parallel, model_cfg, resolve_device(run.train.device).type)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0 under torchrun: rank 0 tells the run's story once."""


def _parallel_run_dir(ctx, args, prefix: str) -> Path:
    """The run directory: made (or checked, on --resume) by rank 0 alone, the others wait for it."""
    from kdarch.train.pipeline import prepare_run_dir
    out = prepare_run_dir(args.out, args.resume, prefix) if ctx is None or ctx.is_main else Path(args.out)
    if ctx is not None:
        ctx.barrier()
    return out


def cmd_train(args) -> int:
    from kdarch.train.pipeline import check_train, log_to_stderr, run_train
    run = _run_config(args)
    check_train(run)  # before the run directory exists
    ctx = _start_parallel(args, run, get_preset(run.model.preset, **run.model.overrides))
    try:
        out = args.out_dir = _parallel_run_dir(ctx, args, "train")
        row = run_train(run, out, resume=args.resume, log=log_to_stderr if ctx is None or ctx.is_main else _quiet)
        if ctx is None or ctx.is_main:
            print(json.dumps(row, indent=2))
            print(f"model: {out / 'model'}")
    finally:
        if ctx is not None:
            from kdarch.parallel import runtime
            runtime.teardown()
    return 0


def cmd_distill(args) -> int:
    from kdarch.train.pipeline import check_distill, log_to_stderr, run_distill
    from kdarch.train.reasoning import run_arithmetic, task_stages
    run = _run_config(args)
    if args.quick and args.task != "lm":
        raise ValueError(f"--quick: expected with --task lm (the quick run is the default pipeline), got --task "
                          f"{args.task}")
    task_stages(run) if args.task == "arithmetic" else check_distill(run, quick=args.quick)  # before the run dir
    ctx = _start_parallel(args, run)  # each stage's model is checked against [parallel] when it trains
    try:
        log = log_to_stderr if ctx is None or ctx.is_main else _quiet
        out = args.out_dir = _parallel_run_dir(ctx, args, f"distill-{'quick' if args.quick else args.task}")
        log(f"kdarch distill ({args.task}{', quick' if args.quick else ''}): run directory {out}")
        if args.task == "arithmetic":
            report = run_arithmetic(run, out, resume=args.resume, log=log)
        else:
            report = run_distill(run, out, resume=args.resume, quick=args.quick, log=log)
        if ctx is None or ctx.is_main:
            _report_path(out, report)
    finally:
        if ctx is not None:
            from kdarch.parallel import runtime
            runtime.teardown()
    return 0


def _device(args):
    from kdarch.train.device import check_device, resolve_device
    check_device(args.device, "--device")
    return resolve_device(args.device)


def _load_model_and_tokenizer(path, device):
    from kdarch.pretrained import from_pretrained
    from kdarch.train.tokenizer import ByteTokenizer, load_tokenizer
    model = from_pretrained(path, device=device).eval()
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError):  # a byte-level model needs no file; any other one does
        tok = ByteTokenizer() if model.config.vocab_size == ByteTokenizer().vocab_size else None
    return model, tok


def run_config_of(model_dir: Path) -> Path | None:
    """The config.toml of the run that trained the model in `model_dir`: beside it, or in the stage, run or
    checkpoint directories above it (model/, <stage>/model/, <stage>/checkpoints/step_N/)."""
    for d in [model_dir, *list(model_dir.resolve().parents)[:3]]:
        if (d / "config.toml").is_file():
            return d / "config.toml"
    return None


def cmd_eval(args) -> int:
    from kdarch.distill.loading import load_teacher
    from kdarch.train.config import load_run_config
    from kdarch.train.data import load_documents, pack, split_documents
    from kdarch.train.evaluate import evaluate_lm
    from kdarch.train.flags import overrides_from_args
    from kdarch.train.pipeline import teacher_top1
    config = args.config or run_config_of(Path(args.model))
    run = load_run_config(config, overrides_from_args(args))
    print(f"kdarch eval: {'data settings from ' + str(config) if config else 'default data settings'}",
          file=sys.stderr)
    model, tok = _load_model_and_tokenizer(args.model, _device(args))
    if tok is None:
        raise FileNotFoundError(f"--model: expected a model directory with its tokenizer.json (kdarch models saved "
                                f"by the train script carry theirs), got {args.model}, which has none")
    docs = load_documents(run.data.dataset, field=run.data.text_field)
    if args.split == "heldout":
        docs = split_documents(docs, run.data.heldout_fraction, run.data.split_seed)[1]
    ids_NT = pack(docs, tok, run.data.seq_len)
    n = run.train.eval_sequences
    top1 = None
    if args.teacher:
        teacher = load_teacher(args.teacher, device=model.embed.weight.device,
                               student_vocab_size=model.config.vocab_size, student_fingerprint=tok.fingerprint)
        table = teacher_top1(teacher, ids_NT, n)
        top1 = lambda idx, ids: table[idx]  # noqa: E731
    row = evaluate_lm(model, ids_NT, max_sequences=n, teacher_top1=top1)
    print(json.dumps({"model": str(args.model), "config": str(config) if config else None, "data": run.data.dataset,
                      "split": args.split, **row}, indent=2))
    return 0


def cmd_generate(args) -> int:
    model, tok = _load_model_and_tokenizer(args.model, _device(args))
    if tok is None:
        raise FileNotFoundError(f"--model: expected a model directory with its tokenizer.json, got {args.model}, "
                                f"which has none")
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt: expected some text, got an empty prompt")
    t0 = time.perf_counter()
    if args.speculative and args.compile:
        raise ValueError("--compile: expected without --speculative (drafting runs on a growing cache)")
    if args.speculative:
        from kdarch.model import generate_speculative
        new, stats = generate_speculative(model, prompt, args.max_new_tokens)
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()  # plain greedy decoding of the same prompt, for the comparison
        plain = model.generate([prompt], args.max_new_tokens)[0]
        greedy_rate = len(plain) / (time.perf_counter() - t1)
        same = "the same tokens" if list(plain) == list(new) else "OTHER TOKENS than greedy"
        extra = (f"MTP drafting: acceptance {stats.acceptance:.0%}, {stats.main_steps} main-model steps; plain greedy "
                 f"{greedy_rate:.0f} tok/s (speculative / greedy {len(new) / dt / greedy_rate:.2f}x), {same}")
    else:
        generator = torch.Generator(model.embed.weight.device).manual_seed(args.seed)
        new = model.generate([prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, generator=generator, compile=args.compile)[0]
        dt = time.perf_counter() - t0
        extra = f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}" + (
            ", compiled (time includes compilation)" if args.compile else "")
    print(args.prompt + tok.decode(new))
    print(f"[{len(new)} tokens in {dt:.2f}s, {len(new) / dt:.0f} tok/s; {extra}]", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    import shutil

    from kdarch.pretrained import from_pretrained, save_pretrained
    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise FileExistsError(f"DST: expected a new or empty directory, got {str(dst)!r}, which is not empty; pass "
                              f"--force to write into it")
    model = from_pretrained(args.src)
    dst = save_pretrained(model, dst, format=args.format)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(args.src) / name).is_file():
            shutil.copy2(Path(args.src) / name, Path(dst) / name)
    print(f"{args.src} -> {dst} ({args.format} format)")
    if args.format == "hf":
        from kdarch.convert.hf import mtp_layers_note
        note = mtp_layers_note(json.loads((dst / "config.json").read_text()))
        if note:
            print(f"note: {note}")
    return 0


def cmd_cache_teacher(args) -> int:

    import tempfile

    from kdarch.convert.gguf import import_gguf, is_gguf
    from kdarch.distill.loading import load_teacher
    from kdarch.distill.logit_cache import LogitCache, write_logit_cache
    from kdarch.train.device import resolve_dtype
    from kdarch.train.pipeline import log_to_stderr, prepare_data
    run = _run_config(args)
    out, tdir = Path(args.out), Path(args.teacher)
    if is_gguf(tdir):
        tdir = import_gguf(tdir)
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare_data(run, Path(scratch), tokenizer_dir=tdir, log=log_to_stderr)
    teacher = load_teacher(tdir, dtype=resolve_dtype(run.distill.teacher_dtype, _device(args)), device=_device(args),
                           student_vocab_size=data.tokenizer.vocab_size, student_fingerprint=data.tokenizer.fingerprint)
    t0 = time.perf_counter()
    write_logit_cache(teacher, data.train_NT, out, k=args.k, dtype=args.dtype, shard_size=args.shard_size,
                      batch_size=args.batch_size,
                      progress=lambda done, total: print(f"\rcache-teacher: {done}/{total} sequences", end="",
                                                         file=sys.stderr, flush=True))
    data.tokenizer.save(out)  # beside the manifest: `kdarch distill` takes the cache's tokenizer from here
    cache = LogitCache(out)
    print(file=sys.stderr)
    print(json.dumps({"cache": str(out), "sequences": len(cache), "k": args.k, "dtype": args.dtype,
                      "bytes_per_token": cache.bytes_per_token, "seconds": time.perf_counter() - t0}, indent=2))
    print(f"distill from it with: kdarch distill --distill.teacher {out} (same [data] settings)")
    return 0


def cmd_plan(args) -> int:
    from kdarch.parallel.cluster import Cluster
    from kdarch.parallel.plan import Plan, estimate, format_estimate, load_model_config, search
    cfg = load_model_config(args.config)
    cluster = Cluster(gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory,
                      intra_node_gbps=args.intra_bw, inter_node_gbps=args.inter_bw, peak_tflops=args.peak_tflops)
    dp_shard = args.dp_shard or max(1, args.gpus // (args.dp_replicate * args.pp * args.tp))
    plan = Plan(dp_replicate=args.dp_replicate, dp_shard=dp_shard, ep=args.ep, pp=args.pp, pp_schedule=args.pp_schedule,
                pp_microbatches=args.microbatches, tp=args.tp, micro_batch_size=args.micro_batch_size,
                seq_len=args.seq_len or min(4096, cfg.max_seq_len), global_batch=args.global_batch,
                zero_stage=args.zero_stage, recompute=args.recompute, param_dtype=args.param_dtype,
                grad_dtype=args.grad_dtype, optim_dtype=args.optim_dtype, master_weights=not args.no_master_weights,
                dispatch_dtype=args.dispatch_dtype)
    kw = dict(mfu=args.mfu, model=args.config)
    found = search(cfg, cluster, plan, top=args.top, **kw) if args.search else [estimate(cfg, cluster, plan, **kw)]
    if args.search and not found:
        raise ValueError(f"--search: expected at least one plan that fits {args.gpu_memory:g} GiB per GPU, got none")
    if args.json:
        print(json.dumps([e.to_dict() for e in found] if args.search else found[0].to_dict(), indent=2))
    else:
        print("\n\n".join((f"#{i + 1} " if args.search else "") + format_estimate(e) for i, e in enumerate(found)))
    return 0


DEVICE_HELP = 'where the model runs: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"'


def build_parser() -> argparse.ArgumentParser:
    from kdarch.distill.logit_cache import DEFAULT_SHARD_SIZE
    from kdarch.pretrained import FORMATS
    from kdarch.train.flags import STAGE_FLAGS_HELP, ArgumentParser, add_config_flags
    p = ArgumentParser(prog="kdarch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub.choices  # name -> subparser

    def run_parser(name: str, help: str, sections: tuple[str, ...], epilog: str | None = None):
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", metavar="FILE.toml",
                        help="TOML run configuration; --section.field flags override it")
        sp.add_argument("--out", metavar="DIR", help="run directory (default: a fresh runs/<command>-<time>)")
        sp.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoints (finished stages are kept)")
        add_config_flags(sp, sections)
        return sp

    tr = run_parser("train", "train one model (e.g. a teacher) on a dataset with next-token + MTP loss",
                    ("model", "data", "train", "parallel"))
    tr.set_defaults(fn=cmd_train)
    di = run_parser("distill", "distill a student from a teacher (kdarch or Hugging Face directory, or a logit "
                    "cache); with no teacher, train one on the data first; compare with a scratch student",
                    ("model", "data", "train", "distill", "parallel"), epilog=STAGE_FLAGS_HELP)
    di.add_argument("--task", choices=("lm", "arithmetic"), default="lm",
                    help="lm: logit distillation on text (default); arithmetic: sequence-level reasoning "
                         "distillation on generated multi-step arithmetic")
    di.add_argument("--quick", action="store_true",
                    help="the whole default pipeline (tokenizer, teacher, student, scratch, report) on debug-sized "
                         "models: a first look in about a minute")
    di.set_defaults(fn=cmd_distill)

    ev = sub.add_parser("eval", help="held-out loss, perplexity and top-1 agreement with a teacher",
                        description="Evaluate a model on the held-out split of its run's data: the [data] settings "
                        "(dataset, held-out fraction, split seed, sequence length) come from --config, else from "
                        "the config.toml its run wrote (found beside or above --model), else the defaults; "
                        "--data.* flags override them.")
    ev.add_argument("--model", required=True, metavar="DIR", help="a kdarch model directory (with tokenizer.json)")
    ev.add_argument("--config", metavar="FILE.toml", help="run configuration (default: the run's config.toml)")
    ev.add_argument("--split", choices=("heldout", "all"), default="heldout",
                    help="evaluate the held-out split the train script made (same fraction and seed), or everything")
    ev.add_argument("--teacher", metavar="DIR", help="teacher directory for top-1 agreement")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_config_flags(ev, ("data", "train.eval_sequences"))
    ev.set_defaults(fn=cmd_eval)

    ge = sub.add_parser("generate", help="continue a prompt with a trained model")
    ge.add_argument("--model", required=True, metavar="DIR", help="a kdarch model directory (with tokenizer.json)")
    ge.add_argument("--prompt", required=True, help="text to continue")
    ge.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    ge.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    ge.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ge.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed")
    ge.add_argument("--speculative", action="store_true", help="greedy decoding with the MTP modules drafting")
    ge.add_argument("--compile", action="store_true",
                    help="decode on a static cache with a compiled step (a CUDA graph on CUDA)")
    ge.add_argument("--device", default="auto", help=DEVICE_HELP)
    ge.set_defaults(fn=cmd_generate)

    co = sub.add_parser("convert", help="convert a model directory between kdarch and Hugging Face DeepseekV3")
    co.add_argument("src", help="kdarch or Hugging Face DeepseekV3 directory")
    co.add_argument("dst", help="output directory")
    co.add_argument("--format", choices=FORMATS, required=True,
                    help="output format: kdarch, or hf (Hugging Face DeepseekV3, loads in transformers)")
    co.add_argument("--force", action="store_true", help="write into a DST that is not empty")
    co.set_defaults(fn=cmd_convert)

    ca = sub.add_parser("cache-teacher", help="write a teacher's top-k log-probs + tail mass for the training data "
                        "(packed exactly as `kdarch distill` packs it) into a checksummed, sharded logit cache")
    ca.add_argument("--config", metavar="FILE.toml", help="TOML run configuration ([data] is used)")
    ca.add_argument("--teacher", required=True, metavar="DIR", help="kdarch or Hugging Face model directory")
    ca.add_argument("--out", required=True, metavar="DIR", help="cache directory (an interrupted write resumes)")
    ca.add_argument("--k", type=int, default=64, help="top-k entries kept per token")
    ca.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="stored log-prob dtype")
    ca.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="sequences per shard file")
    ca.add_argument("--batch-size", type=int, default=8, help="teacher batch size")
    ca.add_argument("--device", default="auto", help=DEVICE_HELP + " (the teacher's)")
    add_config_flags(ca, ("data", "distill"))
    ca.set_defaults(fn=cmd_cache_teacher)

    pl = sub.add_parser("plan", help="estimate a parallel plan on paper: memory per GPU, expert all-to-all, pipeline "
                        "bubbles, step time and tokens/s (or --search the plans that fit)")
    pl.add_argument("config", metavar="CONFIG", help="a preset, deepseek-v3-671b, or a kdarch / HF config.json")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    for flag, kind, default, text in (
            ("--gpus-per-node", int, 8, "GPUs per node"), ("--gpu-memory", float, 80.0, "memory per GPU, GiB"),
            ("--intra-bw", float, 400.0, "intra-node bandwidth per GPU, GB/s"),
            ("--inter-bw", float, 50.0, "inter-node bandwidth per GPU, GB/s"),
            ("--peak-tflops", float, 989.0, "dense peak per GPU of the GEMM dtype, TFLOP/s"),
            ("--mfu", float, 0.4, "fraction of peak reached while computing (bubbles and comm. come on top)"),
            ("--dp-replicate", int, 1, "data-parallel replicas"),
            ("--dp-shard", int, None, "ZeRO/FSDP ranks (default: gpus / (dp_replicate*pp*tp))"),
            ("--ep", int, 1, "expert-parallel ranks (borrowed from dp_shard*tp)"), ("--pp", int, 1, "pipeline ranks"),
            ("--tp", int, 1, "tensor-parallel ranks"), ("--microbatches", int, None, "micro-batches per step"),
            ("--micro-batch-size", int, 1, "sequences per micro-batch"),
            ("--seq-len", int, None, "tokens per sequence (default min(4096, max_seq_len))"),
            ("--global-batch", int, None, "sequences per step (--search default: 8 per GPU)"),
            ("--zero-stage", int, 3, "what dp_shard shards: 1 optimizer, 2 + grads, 3 + params"),
            ("--top", int, 10, "plans shown by --search")):
        pl.add_argument(flag, type=kind, default=default, help=text)
    from kdarch.parallel.plan import SCHEDULES
    pl.add_argument("--pp-schedule", choices=SCHEDULES, default="1F1B", help="pipeline schedule")
    for flag, default in (("--param-dtype", "bf16"), ("--grad-dtype", "fp32"), ("--optim-dtype", "fp32")):
        pl.add_argument(flag, choices=("fp32", "bf16"), default=default, help=f"default {default}")
    pl.add_argument("--dispatch-dtype", choices=("fp32", "bf16", "fp8"), default="bf16", help="expert dispatch dtype")
    pl.add_argument("--no-master-weights", action="store_true", help="no fp32 master copy of bf16 weights")
    pl.add_argument("--recompute", action="store_true", help="recompute every block in the backward")
    pl.add_argument("--search", action="store_true", help="every valid plan that fits, fastest first")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(fn=cmd_plan)

    info = sub.add_parser("info", help="print a preset's sizes")
    info.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    info.set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo",
                          help="a one-minute tour: the tiny student trained briefly on embedded text, generation")
    demo.add_argument("--steps", type=int, default=60, help="training steps on embedded text (default 60)")
    demo.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    demo.add_argument("--new-tokens", type=int, default=48, help="tokens to generate")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(fn=cmd_demo)
    return p


def resume_command(argv: list[str], out: Path) -> str:
    """The command line that continues an interrupted run: the same arguments with --resume --out OUT."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif a != "--resume" and not a.startswith("--out="):
            kept.append(a)
    return shlex.join(["kdarch", *kept, "--resume", "--out", str(out)])


def main(argv: list[str] | None = None) -> int:
    from kdarch.train.flags import stage_overrides
    from kdarch.train.interrupt import Interrupted
    from kdarch.train.loop import TrainingError
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = parser.commands[args.command]
    args.stage_overrides = stage_overrides(extra, sub) if extra and args.command == "distill" else {}
    if extra and args.command != "distill":
        sub.unknown_flag(extra[0])
    try:
        return args.fn(args)
    except Interrupted as e:
        if e.checkpoint is None:
            print(f"kdarch {args.command}: interrupted again: stopped at once (the last complete checkpoint is "
                  f"kept)", file=sys.stderr)
        else:
            print(f"interrupted at step {e.step}; checkpoint written; continue with: "
                  f"{resume_command(sys.argv[1:] if argv is None else argv, args.out_dir)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"kdarch {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        # Bad input: one clear line, not a traceback from deep inside (KDARCH_DEBUG=1 shows it).
        if os.environ.get("KDARCH_DEBUG"):
            raise
        print(f"kdarch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, ImportError) as e:
        if os.environ.get("KDARCH_DEBUG"):
            raise
        print(f"kdarch {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
