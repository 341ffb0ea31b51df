"""The runs behind `kdarch train` and `kdarch distill`: data, stages, evaluation, report.

`kdarch distill` with no teacher given is the package's end-to-end demonstration on real text: a tokenizer
learnt on the training split, a teacher trained on it, the tiny MoE+MLA+MTP student distilled from the
teacher (then, for a chain, each further student from the previous one), the same student architecture
trained from scratch on the same token budget, and all of them evaluated on held-out documents. Each stage
lives in its own directory under the run (checkpoints, metrics, the final model with its tokenizer), so
`--resume` continues a killed run where it stopped and finished stages are not retrained.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kdarch.checks import ConfigError
from kdarch.config import PRESETS, ModelConfig, get_preset
from kdarch.convert.gguf import import_gguf, is_gguf
from kdarch.convert.hf import HF_MODEL_TYPE
from kdarch.distill.cross_tokenizer import CrossTokenizerTeacher, retokenize
from kdarch.distill.inherit import check_inheritable, inherit_from_teacher
from kdarch.distill.loading import load_teacher
from kdarch.distill.logit_cache import CachedTeacher, LogitCache, input_ids_sha256
from kdarch.distill.teacher_signal import TopKTeacher
from kdarch.distill.teachers import HFTeacher, ModelTeacher, Teacher
from kdarch.io import MANIFEST, discard_directory, read_json, write_json, write_text
from kdarch.model import CausalLM
from kdarch.parallel.runtime import barrier, is_main_process
from kdarch.pretrained import KDARCH_MODEL_TYPE, from_pretrained, save_pretrained
from kdarch.train.checkpoint import CHECKPOINTS
from kdarch.train.config import DataSection, ModelSection, RunConfig, Stage, TrainSection
from kdarch.train.data import load_documents, pack, split_documents
from kdarch.train.device import PeakMemory, check_device, device_label, resolve_device, resolve_dtype
from kdarch.train.evaluate import (
    evaluate_cross_tokenizer_teacher,
    evaluate_lm,
    generation_speed,
    generation_speeds,
    speculative_speed,
    token_bytes,
)
from kdarch.train.loop import set_seed, train
from kdarch.train.objective import DistillObjective, Objective
from kdarch.train.report import write_report
from kdarch.train.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

DEFAULT_TEACHER = Stage("teacher", ModelSection("tiny", {"n_layers": 6, "n_routed_experts": 32}),
                        TrainSection(steps=300))
"""The embedded default's teacher: the tiny preset deepened to 6 layers with 32 routed experts (2.5x the
student's parameters, 1.4x its active parameters), trained on 3x the student's tokens. On two CPU cores a
wider dense teacher learns less per second: what makes the teacher better than the student is its capacity
and its longer training within the same minutes. 300 steps rather than 180: its student starts from its
weights (distill.student_init), so the teacher's training is the student's head start, and a teacher this
much better is one whose soft labels still help the student rather than hold it back
(benchmarks/distill_ablation.py)."""
DEFAULT_STUDENT = Stage("student", ModelSection("tiny", {"mtp_loss_weight": 0.1}), TrainSection(steps=100))
"""The embedded default's student (and its scratch twin): the tiny preset (MLA + 16-expert MoE + 1 MTP module)
with the MTP loss at weight 0.1 instead of 0.3 — in 100 steps the main head gains more from the trunk than
the MTP head loses (benchmarks/distill_ablation.py), and MTP drafting still accepts most drafts. Same width,
heads and expert shape as the teacher, so it starts from 4 of the teacher's 6 blocks and 16 of its 32 experts
per block (distill.student_init = "auto")."""
QUICK_TEACHER = Stage("teacher", ModelSection("debug", {"n_layers": 4, "n_routed_experts": 16}),
                      TrainSection(steps=200))
QUICK_STUDENT = Stage("student", ModelSection("debug", {"mtp_loss_weight": 0.1}), TrainSection(steps=100))
"""`kdarch distill --quick`: the same pipeline on the debug preset's sizes, a first look in about a minute (the
student starts from 2 of the teacher's 4 blocks and 8 of its 16 experts per block, as the default's does; the
teacher's 200 steps put it ahead of the scratch student: 4.90 vs 5.43 held-out loss, 59 s in all on a Xeon)."""


@dataclass
class Data:
    tokenizer: Tokenizer
    train_NT: torch.Tensor
    heldout_NT: torch.Tensor
    seq_len: int
    pad_id: int | None = None
    """Set when rows hold one document each, padded: padding is then never a target."""

    @functools.cached_property
    def token_bytes_V(self) -> torch.Tensor:
        """[V] the UTF-8 bytes of each token's text: held-out losses per byte (`evaluate.token_bytes`)."""
        return token_bytes(self.tokenizer)


def prepare_data(run: RunConfig, run_dir: Path, tokenizer_dir: Path | None = None, log=print) -> Data:
    """Documents -> train / held-out split -> tokenizer (trained, given, or the teacher's) -> packed sequences.
    The tokenizer is saved under run_dir/tokenizer and reused on resume."""
    cfg = run.data
    docs = load_documents(cfg.dataset, field=cfg.text_field)
    train_docs, heldout_docs = split_documents(docs, cfg.heldout_fraction, cfg.split_seed)
    saved = run_dir / "tokenizer"
    found = (saved / "tokenizer.json").exists()
    if found:
        tok = load_tokenizer(saved)
    elif cfg.tokenizer == "bpe" and tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").exists():
        tok = load_tokenizer(tokenizer_dir)
        log(f"tokenizer: the teacher's ({tokenizer_dir})")
    elif cfg.tokenizer == "bpe":
        t0 = time.perf_counter()
        tok = BPETokenizer.train(train_docs, cfg.vocab_size)
        log(f"tokenizer: byte-level BPE, {tok.vocab_size} ids, trained on {len(train_docs)} documents in "
            f"{time.perf_counter() - t0:.1f}s")
    else:
        tok = load_tokenizer(cfg.tokenizer)
    barrier()  # under torchrun every rank has looked for a saved tokenizer before rank 0 writes one
    if not found and is_main_process():  # under torchrun rank 0 writes the run
        tok.save(saved)
    data = Data(tok, pack(train_docs, tok, cfg.seq_len), pack(heldout_docs, tok, cfg.seq_len), cfg.seq_len)
    log(f"data: {data.train_NT.numel():,} training tokens ({data.train_NT.shape[0]} x {cfg.seq_len}), "
        f"{data.heldout_NT.numel():,} held-out tokens from {len(heldout_docs)} unseen documents")
    return data


def build_model(section: ModelSection, data: Data, seed: int) -> CausalLM:
    cfg = section.build(data.tokenizer.vocab_size, data.seq_len)
    cfg = cfg.replace(bos_token_id=data.tokenizer.bos_id, eos_token_id=data.tokenizer.eos_id)
    set_seed(seed)
    return CausalLM(cfg)


@dataclass
class StageRun:
    name: str
    model: CausalLM
    rows: list[dict]
    seconds: float
    tokens: int
    peak_memory_mb: float
    directory: Path
    teacher: str | None = None
    device: str | None = None


def run_stage(stage: Stage, data: Data, run_dir: Path, *, objective_for: Callable[[CausalLM], Objective] | None = None,
              init: Callable[[CausalLM], str] | None = None, resume: bool = False, teacher: str | None = None,
              stage_dir: Path | None = None, log=print) -> StageRun:
    """Train one model (LM objective, or the objective `objective_for(model)` builds) in `stage_dir` (default
    run_dir / stage.name): checkpoints/ while it trains, metrics.jsonl, and at the end the final model/ with its
    tokenizer and done.json. `init(model)` overwrites the seeded initialisation and says how (a resumed
    checkpoint then overwrites both). A finished stage's checkpoints are then deleted (they are most of a run's
    size and only needed to continue it) unless train.keep_checkpoints; on resume a finished stage is loaded,
    not run."""
    stage_dir = stage_dir or run_dir / stage.name
    final, done = stage_dir / "model", stage_dir / STAGE_DONE
    if resume and done.is_file():
        return _finished_stage(stage, data, final, read_json(done), teacher, log)
    model = build_model(stage.model, data, stage.train.seed)
    if init is not None:
        log(f"[{stage.name}] initialised from {teacher}: {init(model)}")
    objective = objective_for(model) if objective_for is not None else None
    what = f"distilling from {teacher}" if teacher else "language modelling"
    log(f"[{stage.name}] {model.config.num_params() / 1e6:.2f}M parameters "
        f"({model.config.num_active_params() / 1e6:.2f}M active), {stage.train.steps} steps, {what}")
    device = resolve_device(stage.train.device)
    with PeakMemory(device) as mem:
        res = train(model, stage.train, data.train_NT, stage_dir, objective=objective, resume=resume, name=stage.name)
    if is_main_process():
        save_pretrained(model, final)
        data.tokenizer.save(final)
        write_json(done, {"steps": res.steps, "tokens": res.tokens, "seconds": res.seconds,
                          "peak_memory_mb": mem.peak_mb, "device": device_label(device)})
        if not stage.train.keep_checkpoints and (stage_dir / CHECKPOINTS).is_dir():
            discard_directory(stage_dir / CHECKPOINTS)
    last = res.rows[-1] if res.rows else {}
    log(f"[{stage.name}] done in {res.seconds:.0f}s, final training loss {last.get('loss', float('nan')):.3f}; "
        f"model saved to {final}")
    return StageRun(stage.name, model, res.rows, res.seconds, res.tokens, mem.peak_mb, final, teacher,
                    device_label(device))


def _finished_stage(stage: Stage, data: Data, final: Path, done: dict, teacher: str | None, log) -> StageRun:
    """A stage an earlier run finished: its model (which must be the one the config describes) and figures."""
    model = from_pretrained(final).eval()
    want = build_model(stage.model, data, stage.train.seed).config
    if model.config != want:
        diff = [f.name for f in dataclasses.fields(want) if getattr(want, f.name) != getattr(model.config, f.name)]
        raise ConfigError(f"--resume: the finished stage {stage.name!r} in {final.parent} has another model than the "
                          f"configuration describes (fields {diff}); resume with the configuration that made it")
    rows = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines() if x.strip()]
    log(f"[{stage.name}] finished earlier ({done['steps']} steps); loaded {final}")
    return StageRun(stage.name, model, rows, done["seconds"], done["tokens"], done["peak_memory_mb"], final, teacher,
                    done.get("device"))


INHERIT_SAMPLE_ROWS = 64
"""Training rows the teacher's routing is measured on to choose the experts a student inherits."""


def inherit_init(teacher: CausalLM, train_NT: torch.Tensor, record: dict, student: CausalLM) -> str:
    """The student starts from its kdarch teacher's weights; records and returns what it took."""
    got = inherit_from_teacher(student, teacher, train_NT[:INHERIT_SAMPLE_ROWS])
    record["init"] = got.summary(teacher.config.n_layers, teacher.config.n_routed_experts)
    return record["init"]


def generation_prompts(data: Data) -> list[list[int]]:
    """The prompts every report row's generation speed is measured on: the first 16 tokens of 4 held-out rows."""
    return [data.heldout_NT[i, :16].tolist() for i in range(min(4, data.heldout_NT.shape[0]))]


def measure(run: StageRun, data: Data, *, eval_sequences: int, teacher_top1_NT: torch.Tensor | None,
            speculative: bool = True, speed: bool = True) -> dict:
    """The report row of one model; with `speculative`, a model with MTP modules also gets its MTP drafts'
    acceptance and self-speculative decoding's speed beside plain greedy decoding (two prompts, batch 1).
    `speed=False` leaves generation speed to the caller (`generation_speeds`, several models in turns)."""
    cfg = run.model.config
    lookup = (lambda idx, ids: teacher_top1_NT[idx]) if teacher_top1_NT is not None else None
    row = evaluate_lm(run.model, data.heldout_NT, max_sequences=eval_sequences, teacher_top1=lookup,
                      pad_id=data.pad_id, token_bytes_V=data.token_bytes_V)
    if speed:
        row.update(generation_speed(run.model, generation_prompts(data), new_tokens=48))
    if speculative:
        row.update(speculative_speed(run.model, generation_prompts(data)[:2], new_tokens=48))
    row.update(cfg.figures())
    row.update(device=run.device, peak_memory_mb=run.peak_memory_mb, train_seconds=run.seconds, train_tokens=run.tokens,
               train_steps=len(run.rows) and run.rows[-1]["step"], model_dir=str(run.directory))
    if run.teacher:
        row["teacher"] = run.teacher
    return row


def measure_teacher(model_teacher: ModelTeacher, teacher: Teacher, data: Data, eval_sequences: int,
                    top1_NT: torch.Tensor | None, device: torch.device) -> dict:
    """The report row of a given teacher model (kdarch, Hugging Face or GGUF), measured as `measure` measures a
    student: held-out loss from its logits and bits per byte (a teacher of another tokenizer: bits per byte of
    the same text, and its loss over its own tokens, which does not compare), top-1 agreement with itself, peak
    memory, sizes; generation speed is measured with the other rows' (`teacher_prompts`)."""
    with PeakMemory(device) as mem:
        if isinstance(teacher, CrossTokenizerTeacher):
            row = evaluate_cross_tokenizer_teacher(teacher, data.heldout_NT, max_sequences=eval_sequences)
        else:
            row = evaluate_lm(teacher, data.heldout_NT, max_sequences=eval_sequences, pad_id=data.pad_id,
                              teacher_top1=None if top1_NT is None else lambda idx, ids: top1_NT[idx],
                              token_bytes_V=data.token_bytes_V)
    row.update(model_teacher.figures())
    row.update(device=device_label(device), peak_memory_mb=mem.peak_mb)
    return row


def teacher_prompts(teacher: Teacher, data: Data) -> list[list[int]]:
    """`generation_prompts` as the teacher reads them: its own tokens of the same text when it has another
    tokenizer (cut to the shortest, so the batch has one length)."""
    prompts = generation_prompts(data)
    if not isinstance(teacher, CrossTokenizerTeacher):
        return prompts
    retok = retokenize(torch.tensor(prompts), teacher.student, teacher.teacher_tokenizer)
    return retok.teacher_ids[:, :int(retok.teacher_lengths.min())].tolist()


@torch.no_grad()
def on_policy_figures(cfg, objectives: list) -> dict:
    """The report's record of on-policy distillation: λ and what the rollouts cost (none when λ = 0, or for a
    stage that was already finished and so trained nothing here)."""
    if cfg.on_policy == 0 or not objectives:
        return {}
    r = objectives[-1].rollouts
    return {"on_policy": {"fraction": cfg.on_policy, "rollout_tokens": cfg.rollout_tokens,
                          "rollout_temperature": cfg.rollout_temperature, **r.as_dict(),
                          "mean_sampled_tokens": r.tokens / max(r.sequences, 1)}}


def teacher_top1(teacher: Teacher, heldout_NT: torch.Tensor, eval_sequences: int, batch_size: int = 16) -> torch.Tensor:
    """[N, T] the teacher's most likely next token at every held-out position (for top-1 agreement)."""
    n = heldout_NT.shape[0] if not eval_sequences else min(eval_sequences, heldout_NT.shape[0])
    rows = []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        signal = teacher(heldout_NT[idx], idx).signal
        if isinstance(signal, TopKTeacher):
            rows.append(signal.ids.gather(-1, signal.values.argmax(-1, keepdim=True)).squeeze(-1).long())
        else:
            rows.append(signal.argmax(-1))
    return torch.cat(rows)


STAGE_DONE = "done.json"
"""Written into a stage directory when its final model is saved: the stage is finished."""
RUN_MARKER = "run.json"
"""Written into a run directory when it is created: what made it, so that --resume can tell a run from a typo."""


def prepare_run_dir(out: str | Path | None, resume: bool, prefix: str) -> Path:
    """The run directory: `out`, or a fresh runs/<prefix>-<time>. An existing non-empty one needs --resume, and
    --resume needs a directory made by the same kind of run (its run.json)."""
    if out is None:
        if resume:
            raise ConfigError("--resume: expected --out DIR, the directory of the run to continue")
        out = Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        while out.exists():
            out = out.with_name(out.name + "x")
    out = Path(out)
    marker = out / RUN_MARKER
    if resume:
        made_by = read_json(marker).get("run") if marker.is_file() else None
        if made_by != prefix:
            what = f"a {made_by!r} run" if made_by else ("empty" if not out.exists() or not any(out.iterdir())
                                                          else "not a kdarch run directory (no run.json)")
            raise ConfigError(f"--resume: expected --out to be the directory of an earlier {prefix!r} run, got "
                              f"{str(out)!r}, which is {what}")
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out: expected a new or empty run directory, got {str(out)!r}, which is not empty; "
                              f"pass --resume to continue that run or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"run": prefix, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return out


def _check_model(section: ModelSection, seq_len: int, where: str) -> None:
    """The stage's ModelConfig builds (every field but the tokenizer's vocabulary) and fits the sequences."""
    try:
        section.build(PRESETS[section.preset]().vocab_size, seq_len)
    except ConfigError as e:
        raise ConfigError(re.sub(r"^(ModelConfig|model)\.", f"{where}.", str(e))) from None


def _check_data(cfg: DataSection) -> None:
    if cfg.dataset != "embedded" and not Path(cfg.dataset).exists():
        raise ConfigError(f"data.dataset: expected \"embedded\", a .txt file, a directory of .txt files or a .jsonl "
                          f"file, got {cfg.dataset!r}, which does not exist")
    if cfg.tokenizer not in ("bpe", "bytes") and not Path(cfg.tokenizer).exists():
        raise ConfigError(f"data.tokenizer: expected \"bpe\", \"bytes\" or a tokenizer.json / model directory, got "
                          f"{cfg.tokenizer!r}, which does not exist")


def check_train(run: RunConfig) -> None:
    """Everything `kdarch train` can know to be wrong before it prepares data or builds a model."""
    _check_data(run.data)
    check_device(run.train.device, "train.device")
    _check_model(run.model, run.data.seq_len, "model")


def check_distill(run: RunConfig, *, quick: bool = False) -> tuple[Stage, list[Stage]]:
    """Everything `kdarch distill` can know to be wrong before any work (stage models, paths, a given teacher's
    kind against the distillation settings, MTP depth weights), each naming its field; returns the stages."""
    dcfg = run.distill
    teacher, students = stages_of(run, quick=quick)
    _check_data(run.data)
    for where, stage in [("teacher", teacher), *((f"students.{i}", st) for i, st in enumerate(students))]:
        check_device(stage.train.device, f"{where}.train.device" if stage.train.device != run.train.device
                     else "train.device")
    if dcfg.teacher_device:
        check_device(dcfg.teacher_device, "distill.teacher_device")
    if not dcfg.teacher:
        _check_model(teacher.model, run.data.seq_len, "teacher.model")
    for i, st in enumerate(students):
        _check_model(st.model, run.data.seq_len, f"students.{i}.model" if run.students else "model")
        n_mtp = get_preset(st.model.preset, **st.model.overrides).n_mtp_modules
        if dcfg.mtp and dcfg.mtp_depth_weights and len(dcfg.mtp_depth_weights) != n_mtp:
            raise ConfigError(f"distill.mtp_depth_weights: expected {n_mtp} weights (one per MTP module of "
                              f"{st.name}), got {dcfg.mtp_depth_weights!r}")
    if dcfg.teacher:
        path = Path(dcfg.teacher)
        if not ((path / MANIFEST).is_file() or (path / "config.json").is_file() or is_gguf(path)):
            raise ConfigError(f"distill.teacher: expected a directory holding a logit cache ({MANIFEST}), a kdarch "
                              f"model or a Hugging Face causal LM (config.json), or a .gguf file, got "
                              f"{dcfg.teacher!r}")
        if is_gguf(path):
            if dcfg.relation_weight and dcfg.relation_source == "mla":
                raise ConfigError("distill.relation_source: expected \"hidden\" for a GGUF teacher (\"mla\" needs MLA "
                                  "latents: a kdarch or DeepseekV3 teacher), got \"mla\"")
        elif (path / MANIFEST).is_file():
            for name in ("feature_weight", "relation_weight"):
                if getattr(dcfg, name):
                    raise ConfigError(f"distill.{name}: expected 0 with a logit-cache teacher (it holds no hidden "
                                      f"states; use a model directory), got {getattr(dcfg, name)}")
        elif dcfg.relation_weight and dcfg.relation_source == "mla":
            model_type = read_json(path / "config.json").get("model_type")
            if model_type not in (KDARCH_MODEL_TYPE, HF_MODEL_TYPE):
                raise ConfigError(f"distill.relation_source: expected \"hidden\" for a {model_type!r} teacher (\"mla\" "
                                  f"needs MLA latents: a kdarch or DeepseekV3 teacher), got \"mla\"")
    inheritance(run, teacher, students)
    return teacher, students


def inheritance(run: RunConfig, teacher: Stage, students: list[Stage]) -> list[str | None]:
    """distill.student_init per student, from the configs alone: None where its weights come from its teacher's
    (the given or trained teacher for the first, the previous student for the next), else why it starts at
    random. "teacher" raises where they cannot be; "auto" falls back to random there."""
    mode, given = run.distill.student_init, run.distill.teacher
    if mode == "random":
        return ["distill.student_init = 'random'"] * len(students)
    vocab = PRESETS[students[0].model.preset]().vocab_size
    if given:
        path = Path(given)
        raw = read_json(path / "config.json") if not is_gguf(path) and (path / "config.json").is_file() else {}
        if raw.get("model_type") != KDARCH_MODEL_TYPE or run.distill.cross_tokenizer != "refuse":
            if mode == "teacher":
                raise ConfigError(f"distill.student_init: expected \"random\" or \"auto\" with a teacher that is not "
                                  f"a kdarch model of the student's tokenizer (\"teacher\" copies its weights), got "
                                  f"\"teacher\" with {given!r}")
            return ["the teacher is not a kdarch model of the student's tokenizer"] * len(students)
        t_cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
        vocab = t_cfg.vocab_size
    else:
        t_cfg = teacher.model.build(vocab, run.data.seq_len)
    plan: list[str | None] = []
    for st in students:
        s_cfg = st.model.build(vocab, run.data.seq_len)
        try:
            check_inheritable(s_cfg, t_cfg)
            plan.append(None)
        except ValueError as e:
            if mode == "teacher":
                raise ConfigError(f"{st.name}: {e}") from None
            plan.append(f"its teacher's weights do not fit: {str(e).split(': ', 1)[1]}")
        t_cfg = s_cfg
    return plan


def stages_of(run: RunConfig, *, quick: bool = False) -> tuple[Stage, list[Stage]]:
    """The teacher stage and the chain of students of `kdarch distill`, over the embedded default's stages (or
    the quick run's)."""
    return run.stages(QUICK_TEACHER, QUICK_STUDENT) if quick else run.stages(DEFAULT_TEACHER, DEFAULT_STUDENT)


def run_train(run: RunConfig, out: Path, *, resume: bool = False, log=print) -> dict:
    """`kdarch train`: one model on the data with the LM objective, in `out` itself (out/model, out/metrics.jsonl,
    out/checkpoints, out/config.toml: the layout of each stage of `kdarch distill`); returns its report row."""
    check_train(run)
    data = prepare_data(run, out, log=log)
    if is_main_process():
        write_text(out / "config.toml", run.to_toml())
    res = run_stage(Stage("model", run.model, run.train), data, out, resume=resume, stage_dir=out, log=log)
    return measure(res, data, eval_sequences=run.train.eval_sequences, teacher_top1_NT=None)


def check_cache_matches(cache: LogitCache, train_NT: torch.Tensor) -> None:
    """A logit cache is indexed by packed training sequence: refuse one computed on other data up front."""
    m = cache.manifest
    if (m["num_sequences"], m["seq_len"]) != tuple(train_NT.shape) or \
            m["input_ids_sha256"] != input_ids_sha256(train_NT):
        raise ValueError(f"the logit cache {cache.path} was computed on other data ({m['num_sequences']} sequences x "
                         f"{m['seq_len']} tokens) than this run's training data ({train_NT.shape[0]} x "
                         f"{train_NT.shape[1]}, or the same shape with other tokens); write it with "
                         "kdarch cache-teacher "
                         "and the same [data] settings")


def run_distill(run: RunConfig, out: Path, *, resume: bool = False, quick: bool = False, log=print) -> dict:
    """`kdarch distill`: teacher (given, or trained here), the chain of distilled students, the scratch
    baseline, evaluation of all of them on held-out text; writes report.json / report.md / plots; returns
    the report. `quick` runs it over the quick run's default stages."""
    t_start = time.perf_counter()
    dcfg, (teacher_stage, students) = run.distill, check_distill(run, quick=quick)
    inherit = inheritance(run, teacher_stage, students)
    teacher_device = resolve_device(dcfg.teacher_device or students[0].train.device)
    n_eval = run.train.eval_sequences
    if dcfg.teacher:
        tdir, cross = Path(dcfg.teacher), dcfg.cross_tokenizer != "refuse"
        if is_gguf(tdir):
            tdir = import_gguf(tdir)
            log(f"teacher: {dcfg.teacher} imported as {tdir}")
        data = prepare_data(run, out, tokenizer_dir=None if cross else tdir, log=log)  # cross: the student's own
        teacher = load_teacher(tdir, dtype=resolve_dtype(dcfg.teacher_dtype, teacher_device), device=teacher_device,
                               compile=dcfg.teacher_compile)
        if cross:
            teacher = CrossTokenizerTeacher(teacher, data.tokenizer, load_tokenizer(tdir))
            log(f"teacher tokenizer: its own ({teacher.teacher_tokenizer.vocab_size} ids; "
                f"{teacher.shared_student_ids.numel()} shared with the student's), distilled with "
                f"distill.cross_tokenizer = {dcfg.cross_tokenizer!r}")
        teacher_run = None
    else:
        data = prepare_data(run, out, log=log)
        teacher_run = run_stage(teacher_stage, data, out, resume=resume, log=log)
        teacher = ModelTeacher(teacher_run.model.to(teacher_device), name=teacher_stage.name,
                               fingerprint=data.tokenizer.fingerprint)
    teacher.align_to(data.tokenizer.vocab_size, student_fingerprint=data.tokenizer.fingerprint)
    if isinstance(teacher, CachedTeacher):
        check_cache_matches(teacher.cache, data.train_NT)
    # A logit cache covers the training sequences only, and a teacher of another tokenizer predicts other tokens:
    # no agreement on held-out text then.
    top1_NT = (None if isinstance(teacher, CachedTeacher | CrossTokenizerTeacher) else
               teacher_top1(teacher, data.heldout_NT, n_eval))
    model_teacher = teacher.inner if isinstance(teacher, CrossTokenizerTeacher) else teacher
    source = (f"trained here ({teacher_stage.train.steps} steps)" if teacher_run is not None else
              f"logit cache {dcfg.teacher}" if isinstance(teacher, CachedTeacher) else
              f"GGUF file {dcfg.teacher}" if is_gguf(dcfg.teacher) else
              f"Hugging Face model {dcfg.teacher}" if isinstance(model_teacher, HFTeacher) else
              f"kdarch model {dcfg.teacher}")
    report: dict = {"teacher": {"name": teacher.name, "source": source}}
    speed_jobs: dict = {}  # row -> (model, prompts): generation speeds are measured together, in turns, at the end
    if teacher_run is not None:
        report["teacher"].update(measure(teacher_run, data, eval_sequences=n_eval, teacher_top1_NT=top1_NT,
                                         speculative=False, speed=False))
        speed_jobs["teacher"] = (teacher_run.model, generation_prompts(data))
    elif isinstance(teacher, CachedTeacher):
        report["teacher"].update(teacher.cache.figures())
    else:
        report["teacher"].update(measure_teacher(model_teacher, teacher, data, n_eval, top1_NT, teacher_device))
        speed_jobs["teacher"] = (model_teacher, teacher_prompts(teacher, data))
    chain, curves = [], {teacher_stage.name: teacher_run.rows} if teacher_run else {}
    # the next student's weight source: a given teacher's float32 weights, not those of its forward's dtype
    given = getattr(model_teacher, "model", None)
    teacher_model = (teacher_run.model if teacher_run is not None else given
                     if isinstance(given, CausalLM) and given.embed.weight.dtype == torch.float32 else None)
    for stage, random_why in zip(students, inherit, strict=True):
        objectives: list[DistillObjective] = []

        def distill_objective(m, t=teacher, st=stage, made=objectives, inherited=random_why is None):
            made.append(DistillObjective(t, m, dcfg, st.train.steps, seed=st.train.seed, inherited=inherited))
            return made[-1]

        inherited: dict = {}
        init = None
        if random_why is None:
            source = teacher_model if teacher_model is not None else from_pretrained(dcfg.teacher)
            init = functools.partial(inherit_init, source, data.train_NT, inherited)
        elif dcfg.student_init != "random":
            log(f"[{stage.name}] random initialisation: {random_why}")
        res = run_stage(stage, data, out, resume=resume, teacher=teacher.name, log=log,
                        objective_for=distill_objective, init=init)
        chain.append({"name": stage.name, **measure(res, data, eval_sequences=n_eval, teacher_top1_NT=top1_NT,
                                                    speed=False), **on_policy_figures(dcfg, objectives),
                      **({"init": inherited["init"]} if inherited else {})})
        speed_jobs[f"chain.{len(chain) - 1}"] = (res.model, generation_prompts(data))
        curves[stage.name] = res.rows
        teacher = ModelTeacher(res.model, name=stage.name, fingerprint=data.tokenizer.fingerprint)
        teacher_model = res.model
        teacher.align_to(data.tokenizer.vocab_size, student_fingerprint=data.tokenizer.fingerprint)
    if run.scratch:
        scratch = dataclasses.replace(students[0], name="scratch")
        res = run_stage(scratch, data, out, resume=resume, log=log)
        report["scratch"] = measure(res, data, eval_sequences=n_eval, teacher_top1_NT=top1_NT, speed=False)
        speed_jobs["scratch"] = (res.model, generation_prompts(data))
        curves["scratch"] = res.rows
    rows = {"teacher": report["teacher"], "scratch": report.get("scratch"),
            **{f"chain.{i}": row for i, row in enumerate(chain)}}
    for name, speed in generation_speeds(speed_jobs, new_tokens=48).items():
        rows[name].update(speed)
    report["student"] = dict(chain[0])
    if len(chain) > 1:
        report["chain"] = chain
    report["wall_seconds"] = time.perf_counter() - t_start
    if is_main_process():
        write_report(out, report, curves, run.to_toml(None if dcfg.teacher else teacher_stage, students))
    return report


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
