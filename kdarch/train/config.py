"""Run configuration for the train script: typed sections, TOML files, command-line overrides.

A run is described by one TOML file whose tables are the sections below ([model], [data], [train],
[distill], and for `kdarch distill` without a given teacher, [teacher] and [[students]]); every field has a
default, so an empty file (or no file) is a valid run. Every field is also a command-line flag named
`--section.field` (e.g. `--train.lr 1e-3`, `--model.hidden_size 384`) whose help is the field's docstring
here, so `kdarch train --help` documents the whole file format. Values are checked once, on construction,
with errors that name `section.field` and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdarch.checks import ConfigError, check, check_field_types, check_type, choice_arg, is_number
from kdarch.config import PRESETS, ModelConfig, get_preset
from kdarch.distill.cross_tokenizer import CROSS_TOKENIZER_MODES
from kdarch.distill.inherit import INITS as STUDENT_INITS
from kdarch.distill.losses import KINDS as KD_KINDS
from kdarch.distill.relations import KINDS as RELATION_KINDS
from kdarch.distill.relations import OVER as RELATION_OVER
from kdarch.distill.relations import SOURCES as RELATION_SOURCES
from kdarch.distill.schedules import KDSchedule
from kdarch.parallel.config import ParallelConfig
from kdarch.train.device import DEVICE_SPEC

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DTYPES = ("float32", "bfloat16")


def require(ok: bool, name: str, expected: str, got: Any) -> None:
    """A run-config field check: ConfigError("<section.field>: expected <expected>, got <got>") unless ok."""
    check(ok, name, expected, got, error=ConfigError)


@dataclass(frozen=True)
class ModelSection:
    """[model]: a preset plus any ModelConfig field as an override (vocab_size comes from the tokenizer)."""
    preset: str = "tiny"
    """Named ModelConfig preset to start from (kdarch info --preset NAME shows its sizes)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields replacing the preset's (in TOML: keys of [model] other than preset)."""

    def __post_init__(self):
        check_field_types(self, "model")
        require(self.preset in PRESETS, "model.preset", f"one of {sorted(PRESETS)}", self.preset)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - known)
        require(not unknown, "model", f"ModelConfig fields ({', '.join(sorted(known))})", unknown)
        types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
        for k, v in self.overrides.items():  # values are checked against ModelConfig when the model is built
            check_type(f"model.{k}", v, types[k], error=ConfigError)

    def check_context(self, seq_len: int) -> None:
        """Training sequences of seq_len tokens must fit the model's context (checked before any work)."""
        ctx = self.overrides.get("max_seq_len", PRESETS[self.preset]().max_seq_len)
        if seq_len > ctx:
            raise ConfigError(f"data.seq_len={seq_len} exceeds the model's context model.max_seq_len={ctx} (preset "
                              f"{self.preset!r}); shorten data.seq_len or raise model.max_seq_len")

    def build(self, vocab_size: int, seq_len: int) -> ModelConfig:
        """The ModelConfig for a tokenizer of `vocab_size` ids and training sequences of `seq_len` tokens."""
        self.check_context(seq_len)
        return get_preset(self.preset, **{**self.overrides, "vocab_size": vocab_size})

    @classmethod
    def from_table(cls, table: dict) -> ModelSection:
        table = dict(table)
        return cls(preset=table.pop("preset", cls.preset), overrides=table)


@dataclass(frozen=True)
class DataSection:
    """[data]: where the text comes from and how it becomes token sequences."""
    dataset: str = "embedded"
    """"embedded" (the Python documentation shipped with Python), a .txt file, a directory of .txt files, or
    a .jsonl file."""
    text_field: str = "text"
    """JSONL field holding each document's text."""
    tokenizer: str = "bpe"
    """"bpe" (train a byte-level BPE on the training split), "bytes", or a tokenizer.json / directory."""
    vocab_size: int = 2048
    """Vocabulary size of a BPE tokenizer trained by the run (tokenizer = "bpe")."""
    seq_len: int = 128
    """Tokens per training sequence (documents are packed and cut to this length)."""
    heldout_fraction: float = 0.1
    """Fraction of documents held out for evaluation (never trained on)."""
    split_seed: int = 0
    """Seed of the train / held-out document split."""

    def __post_init__(self):
        check_field_types(self, "data")
        require(self.vocab_size >= 300, "data.vocab_size", "an int >= 300", self.vocab_size)
        require(self.seq_len >= 8, "data.seq_len", "an int >= 8", self.seq_len)
        require(0 < self.heldout_fraction < 0.5, "data.heldout_fraction", "a number in (0, 0.5)",
                self.heldout_fraction)


@dataclass(frozen=True)
class TrainSection:
    """[train]: optimisation, precision, logging and checkpoints of one training stage."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is normalised over all their tokens)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine decay after warm-up)."""
    warmup_steps: int = 20
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    device: str = "auto"
    """Where the models train: "auto" (the first CUDA device when there is one, else the CPU), "cpu", "cuda" or
    "cuda:N"."""
    dtype: str = "float32"
    """Compute dtype: "float32", or "bfloat16" autocast (weights and optimizer stay fp32). FP8 is a model
    field (model.fp8 = true)."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
    compile: bool = False
    """Compile each transformer block with torch.compile (regional compilation: blocks of one kind share a
    graph, so compile time stays small); inductor generates C++ on the CPU and Triton on CUDA."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (exact reruns; resumption is exact either way on the CPU)."""
    threads: int = 0
    """torch intra-op threads (0: leave torch's default)."""
    log_every: int = 10
    """Write a metrics row every N steps."""
    eval_every: int = 0
    """Evaluate on held-out data every N steps (0: only at the end)."""
    eval_sequences: int = 64
    """Held-out sequences used by evaluation (0: all)."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps, and always at the end (and on Ctrl-C / SIGTERM); 0: every
    max(100, steps // 10) steps, so a short run writes only its final one."""
    keep_last: int = 2
    """Checkpoints kept on disk while the stage trains (older ones are deleted)."""
    keep_checkpoints: bool = False
    """Keep a finished stage's final checkpoint (resumable past its end); by default it is deleted once the final
    model is saved, since it is most of a run's size (the optimizer state is twice the weights)."""
    max_bad_steps: int = 10
    """Stop after this many skipped steps (non-finite loss, gradients or teacher logits)."""
    progress: bool = True
    """Show a progress line with loss and tokens/s on stderr."""

    def __post_init__(self):
        check_field_types(self, "train")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last", "max_bad_steps"):
            require(getattr(self, name) >= 1, f"train.{name}", "an int >= 1", getattr(self, name))
        for name in ("warmup_steps", "eval_every", "eval_sequences", "checkpoint_every", "threads"):
            require(getattr(self, name) >= 0, f"train.{name}", "an int >= 0", getattr(self, name))
        for name in ("weight_decay", "grad_clip"):
            require(getattr(self, name) >= 0, f"train.{name}", "a number >= 0", getattr(self, name))
        require(self.lr > 0, "train.lr", "a number > 0", self.lr)
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"train.{name}", "a number in [0, 1)", getattr(self, name))
        choice_arg("train.dtype", self.dtype, DTYPES, error=ConfigError)
        require(DEVICE_SPEC.fullmatch(self.device) is not None, "train.device", '"auto", "cpu", "cuda" or "cuda:N"',
                self.device)

    @property
    def checkpoint_interval(self) -> int:
        """Steps between periodic checkpoints (checkpoint_every, or its automatic value)."""
        return self.checkpoint_every or max(100, self.steps // 10)


ALPHA_AUTO = {True: "constant:0.5", False: "constant:0.9"}
"""distill.alpha = "auto": the schedule for an inherited student (True) and for a randomly initialised one."""


@dataclass(frozen=True)
class DistillSection:
    """[distill]: how a student learns from its teacher."""
    teacher: str = ""
    """Teacher: a kdarch checkpoint directory, a Hugging Face causal-LM directory, a GGUF file or a logit-cache
    directory (kdarch cache-teacher). Empty with `kdarch distill`: train a teacher first ([teacher] table)."""
    teacher_dtype: str = "auto"
    """dtype of a given teacher's forward pass: "float32", "bfloat16", or "auto": bfloat16 where matmuls run
    natively in it (CUDA; a CPU with AMX or AVX512-BF16: 4.5x float32's tokens/s for Gemma-3-270M there,
    benchmarks/teacher_speed.py), float32 elsewhere."""
    teacher_compile: bool = False
    """Run a given teacher's forward under torch.compile (a first call of tens of seconds, and one per new batch
    shape, for a few percent in bfloat16 on the CPU: see benchmarks/teacher_speed.py)."""
    teacher_device: str = ""
    """Where the teacher runs ("cpu", "cuda", "cuda:N", "auto"); empty: the student's train.device."""
    teacher_shard: bool = False
    """Under torchrun, shard a model teacher's weights with FSDP2 over the data-parallel ranks (each holds 1 / dp
    of them, a block gathered for its forward): a teacher bigger than one device. False: a whole teacher on every
    rank. No effect in one process."""
    kind: str = "forward_kl"
    """Soft-label divergence: forward_kl, reverse_kl, jsd or tvd."""
    alpha: str = "auto"
    """Weight of the soft term (1 - alpha goes to hard labels): a schedule, e.g. "constant:0.5",
    "linear:0.9->0.3", "cosine:0.9->0.3" or "adaptive:0.9->0.1"; "auto": ALPHA_AUTO's, constant 0.5 for a
    student that starts from its teacher's weights (distill.student_init) and 0.9 for one that starts at random,
    the best of each in the embedded default's ablation (benchmarks/distill_ablation.py): an inherited student
    already holds what the teacher's soft labels would teach at first, and gains from the hard labels too."""
    temperature: str = "constant:1.0"
    """Soft-label temperature schedule, same syntax as alpha."""
    beta: float = 0.5
    """JSD interpolation (kind = "jsd"): 0 is forward KL, 1 reverse KL."""
    top_k: int = 0
    """Distil from the teacher's top-k log-probs + tail mass instead of full logits (0: full logits)."""
    mtp: bool = True
    """Train the student's MTP heads against the teacher's distribution at t + d as well."""
    mtp_depth_weights: list = field(default_factory=list)
    """Weights of MTP depths 1..D (empty: the model's mtp_loss_weight, spread equally)."""
    feature_weight: float = 0.0
    """Weight of feature KD (projected student hidden states vs the teacher's; 0: off)."""
    feature_loss: str = "mse"
    """Feature KD distance: "mse" or "cosine"."""
    relation_weight: float = 0.0
    """Weight of relation KD (0: off)."""
    relation_kind: str = "similarity_preserving"
    """Relation KD loss: "rkd_distance", "rkd_angle" or "similarity_preserving" (kdarch.distill.relations)."""
    relation_over: str = "tokens"
    """Relations among the tokens of each sequence ("tokens") or among the sequences of a batch ("samples")."""
    relation_source: str = "hidden"
    """What relation KD compares: the last hidden states ("hidden") or the MLA latents the KV cache stores
    ("mla"; kdarch and Hugging Face DeepseekV3 teachers)."""
    cross_tokenizer: str = "refuse"
    """A teacher whose tokenizer is not the student's: "refuse" (an error naming both tokenizers), "align" (the
    divergence over the tokens both vocabularies share, at positions where both tokenizations predict the same
    next bytes) or "uld" (universal logit distillation: sorted probability vectors, no vocabulary mapping). With
    "align" / "uld" the student keeps its own tokenizer ([data] tokenizer) instead of taking the teacher's."""
    on_policy: float = 0.0
    """λ: the fraction of steps on which the student samples continuations of the batch's prompts and learns the
    teacher's distribution on its own tokens (GKD-style on-policy KD; soft term only). 0: off-policy, as before;
    `kind = "reverse_kl"` is its usual divergence. Needs a model teacher (a logit cache cannot score new text)."""
    on_policy_start: float = 0.0
    """When on-policy steps begin, as a fraction of the stage's steps (before it every step is off-policy): a
    student sampling from its initialisation writes noise that the teacher's grades say little about."""
    rollout_tokens: int = 32
    """Tokens sampled per row on an on-policy step; the prompt is the rest of the row."""
    rollout_temperature: float = 1.0
    """Sampling temperature of the rollouts (0: greedy)."""
    student_init: str = "auto"
    """How each student starts: "teacher": from its kdarch teacher's weights, blocks evenly spaced and routed
    experts pruned by routing weight (kdarch.distill.inherit; an error where they do not fit); "random": its
    seeded initialisation; "auto": "teacher" where the teacher is a kdarch model whose weights fit the student,
    else "random" (the log and the report say which). The scratch student always starts at random."""

    def alpha_schedule(self, inherited: bool = False) -> str:
        """The alpha schedule of a student that starts from its teacher's weights (`inherited`) or not."""
        return ALPHA_AUTO[inherited] if self.alpha == "auto" else self.alpha

    def __post_init__(self):
        check_field_types(self, "distill")
        choice_arg("distill.teacher_dtype", self.teacher_dtype, ("auto", *DTYPES), error=ConfigError)
        require(self.teacher_device == "" or DEVICE_SPEC.fullmatch(self.teacher_device) is not None,
                "distill.teacher_device", '"" (the student\'s device), "auto", "cpu", "cuda" or "cuda:N"',
                self.teacher_device)
        choice_arg("distill.kind", self.kind, KD_KINDS, error=ConfigError)
        for name in ("alpha", "temperature"):  # parsed here, so a typo fails before any work
            try:
                KDSchedule(**{name: self.alpha_schedule() if name == "alpha" else self.temperature})
            except ValueError as e:
                raise ConfigError(f"distill.{name}: {e}" + (' (or "auto")' if name == "alpha" else "")) from None
        require(self.top_k >= 0, "distill.top_k", "an int >= 0", self.top_k)
        for name in ("feature_weight", "relation_weight"):
            require(getattr(self, name) >= 0, f"distill.{name}", "a number >= 0", getattr(self, name))
        choice_arg("distill.feature_loss", self.feature_loss, ("mse", "cosine"), error=ConfigError)
        choice_arg("distill.relation_kind", self.relation_kind, RELATION_KINDS, error=ConfigError)
        choice_arg("distill.relation_over", self.relation_over, RELATION_OVER, error=ConfigError)
        choice_arg("distill.relation_source", self.relation_source, RELATION_SOURCES, error=ConfigError)
        require(all(is_number(w) and w >= 0 for w in self.mtp_depth_weights), "distill.mtp_depth_weights",
                "a list of numbers >= 0", self.mtp_depth_weights)
        choice_arg("distill.cross_tokenizer", self.cross_tokenizer, CROSS_TOKENIZER_MODES, error=ConfigError)
        choice_arg("distill.student_init", self.student_init, STUDENT_INITS, error=ConfigError)
        require(0 <= self.on_policy <= 1, "distill.on_policy", "a number in [0, 1]", self.on_policy)
        require(0 <= self.on_policy_start < 1, "distill.on_policy_start", "a number in [0, 1)", self.on_policy_start)
        require(self.rollout_tokens >= 1, "distill.rollout_tokens", "an int >= 1", self.rollout_tokens)
        require(self.rollout_temperature >= 0, "distill.rollout_temperature", "a number >= 0",
                self.rollout_temperature)


@dataclass(frozen=True)
class Stage:
    """A model trained by a run, resolved: the teacher or one student of the chain."""
    name: str
    model: ModelSection
    train: TrainSection


@dataclass(frozen=True)
class StageSpec:
    """A [teacher] or [[students]] table as written (or its --teacher.* / --students.N.* flags): fields laid over
    the task's default stage by `resolve_stage`, so `train = {steps = 50}` changes the default teacher's step
    count and nothing else."""
    name: str | None = None
    """The stage's name (its directory under the run); default "teacher", "student", "student2", ..."""
    model: dict = field(default_factory=dict)
    """[model] fields: a preset other than the default stage's starts over from it; other fields replace the
    default stage's."""
    train: dict = field(default_factory=dict)
    """[train] fields replacing the stage's settings (after [train]'s own)."""


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "distill": DistillSection,
            "parallel": ParallelConfig}
STAGE_KEYS = ("name", "model", "train")


def overlay_model(default: ModelSection, table: dict) -> ModelSection:
    """`table` (a [model] table) over a default stage's model: its preset, when another, starts over; its
    fields replace the default's."""
    table = dict(table)
    preset = table.pop("preset", default.preset)
    return ModelSection(preset, {**(default.overrides if preset == default.preset else {}), **table})


def overlay_train(default: TrainSection, base: TrainSection, table: dict, where: str = "train") -> TrainSection:
    """A stage's training settings: the stage's defaults, then the [train] fields set in `base` (those that
    differ from TrainSection's defaults), then the stage's own `table`."""
    changed = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
               if getattr(base, f.name) != getattr(TrainSection(), f.name)}
    return _make(TrainSection, {**dataclasses.asdict(default), **changed, **table}, where)


def resolve_stage(spec: StageSpec | None, default: Stage, base: TrainSection, where: str) -> Stage:
    """The stage a spec describes over the task's `default` stage (None: the default under [train])."""
    spec = spec or StageSpec()
    try:
        model = overlay_model(default.model, spec.model)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None
    return Stage(spec.name or default.name, model, overlay_train(default.train, base, spec.train, f"{where}.train"))


@dataclass(frozen=True)
class RunConfig:
    """A whole run. `kdarch train` uses model/data/train; `kdarch distill` adds distill, and without a
    distill.teacher it trains the teacher first, then each student from the previous model (a chain:
    teacher -> student 1 -> student 2 ...), and `scratch` trains the first student's architecture without a
    teacher on the same token budget as the baseline. [model] is the default student's architecture (or, for
    `kdarch train`, the model's); `teacher` / `students` are laid over the task's default stages."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """[parallel]: the layout under torchrun (kdarch.parallel.config); train.batch_size stays the global batch."""
    teacher: StageSpec | None = None
    students: tuple[StageSpec, ...] = ()
    scratch: bool = True

    def stages(self, default_teacher: Stage, default_student: Stage) -> tuple[Stage, list[Stage]]:
        """The teacher and the chain of students resolved over a task's default stages. [model] applies to the
        default student only: beside [[students]], which name their own models, it is refused."""
        if self.students and self.model != ModelSection():
            raise ConfigError("model: expected no [model] section beside [[students]] (give each student's model "
                              "in its table, model = {...}, or with --students.N.model.FIELD)")
        teacher = resolve_stage(self.teacher, default_teacher, self.train, "teacher")
        # [model] left at its defaults names no architecture: the task's default student stands (the quick run's
        # debug-sized one included)
        specs = self.students or (StageSpec(model=_section_table(self.model) if self.model != ModelSection() else {}),)
        students = [resolve_stage(s, dataclasses.replace(default_student, name=f"student{i + 1}" if i else "student"),
                                  self.train, f"students.{i}") for i, s in enumerate(specs)]
        return teacher, students

    def to_toml(self, teacher: Stage | None = None, students: list[Stage] = ()) -> str:
        """The configuration as a TOML file; given the resolved stages, the one that ran, stage by stage (so a
        rerun with it reproduces the run whatever the defaults become)."""
        lines = [f"scratch = {_toml_value(self.scratch)}", ""]  # top-level keys come before the tables
        for name in SECTIONS:
            if name == "model" and students:
                continue  # the students carry their models
            lines += [f"[{name}]", *_toml_items(_section_table(getattr(self, name))), ""]
        for key, stage in ([("teacher", teacher)] if teacher else []) + [("students", s) for s in students]:
            head = f"[{key}]" if key == "teacher" else f"[[{key}]]"
            lines += [head, f"name = {_toml_value(stage.name)}", f"model = {_inline(_section_table(stage.model))}",
                      f"train = {_inline(_section_table(stage.train))}", ""]
        return "\n".join(lines)


def _section_table(section) -> dict:
    if isinstance(section, ModelSection):
        return {"preset": section.preset, **section.overrides}
    return dataclasses.asdict(section)


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _toml_items(table: dict) -> list[str]:
    return [f"{k} = {_toml_value(v)}" for k, v in table.items()]


def _inline(table: dict) -> str:
    return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in table.items()) + "}"


def _make(cls, table: dict, where: str):
    """cls(**table) from a TOML table; errors name `where` (e.g. "students.0.train") instead of the section."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    prefix = next(name for name, c in SECTIONS.items() if c is cls)
    try:
        if cls is ModelSection:
            return ModelSection.from_table(table)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{prefix}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**table)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(where + msg[len(prefix):] if msg.startswith(prefix) else msg) from None


def _stage_spec(table, where: str) -> StageSpec:
    """A stage table checked on its own (field names and types) before any default is known."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - set(STAGE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; a stage has {', '.join(STAGE_KEYS)}")
    name = table.get("name")
    require(name is None or (isinstance(name, str) and name.isidentifier()), f"{where}.name",
            "a name made of letters, digits and _", name)
    spec = StageSpec(name, dict(table.get("model", {})), dict(table.get("train", {})))
    _make(ModelSection, spec.model, f"{where}.model")
    _make(TrainSection, spec.train, f"{where}.train")
    return spec


def load_run_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from a TOML file (or defaults) with overrides applied on top: keys "section.field",
    "teacher.model.field" / "teacher.train.field" / "teacher.name", "students.N.model.field" (etc.), "scratch"."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: expected a TOML file, got {str(p)!r}, which does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {str(p)!r} is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - set(SECTIONS) - {"teacher", "students", "scratch"})
    if unknown:
        raise ConfigError(f"config file: unknown table(s) {unknown}; known are {sorted(SECTIONS)} + teacher, "
                          "students, scratch")
    students = raw.setdefault("students", [])
    if not isinstance(students, list):
        raise ConfigError("students: expected an array of tables ([[students]])")
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if parts == ["scratch"]:
            raw["scratch"] = value
        elif parts[0] in SECTIONS and len(parts) == 2:
            raw.setdefault(parts[0], {})[parts[1]] = value
        elif parts[0] == "teacher" and len(parts) in (2, 3):
            _set_stage_field(raw.setdefault("teacher", {}), parts[1:], value)
        elif parts[0] == "students" and len(parts) in (3, 4) and parts[1].isdigit():
            while len(students) <= int(parts[1]):
                students.append({})
            _set_stage_field(students[int(parts[1])], parts[2:], value)
        else:
            raise ConfigError(f"override {key!r}: expected section.field (section one of {sorted(SECTIONS)}), "
                              f"teacher.model|train.field, teacher.name, students.N.model|train.field, "
                              f"students.N.name or scratch")
    sections = {name: _make(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    teacher = _stage_spec(raw["teacher"], "teacher") if "teacher" in raw else None
    chain = tuple(_stage_spec(s, f"students.{i}") for i, s in enumerate(students))
    scratch = raw.get("scratch", True)
    require(isinstance(scratch, bool), "scratch", "true or false", scratch)
    return RunConfig(**sections, teacher=teacher, students=chain, scratch=scratch)


def _set_stage_field(table: dict, parts: list[str], value) -> None:
    if parts == ["name"]:
        table["name"] = value
    elif len(parts) == 2 and parts[0] in ("model", "train"):
        table.setdefault(parts[0], {})[parts[1]] = value
    else:
        raise ConfigError(f"override {'.'.join(parts)!r}: a stage has name, model.FIELD and train.FIELD")
