"""Run configuration for the train script: typed sections, TOML files, command-line overrides.

A run is described by one TOML file whose tables are the sections below ([model], [data], [train],
[distill], and for `kdarch distill` without a given teacher, [teacher] and [[students]]); every field has a
default, so an empty file (or no file) is a valid run. Every field is also a command-line flag named
`--section.field` (e.g. `--train.lr 1e-3`, `--model.hidden_size 384`) whose help is the field's docstring
here, so `kdarch train --help` documents the whole file format. Values are checked once, on construction,
with errors that name `section.field` and what is allowed.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdarch.checks import ConfigError, check, check_field_types, choice_arg, is_number
from kdarch.config import PRESETS, ModelConfig, get_preset
from kdarch.distill.losses import KINDS as KD_KINDS
from kdarch.distill.relations import KINDS as RELATION_KINDS
from kdarch.distill.relations import OVER as RELATION_OVER
from kdarch.distill.relations import SOURCES as RELATION_SOURCES

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
    dtype: str = "float32"
    """Compute dtype: "float32", or "bfloat16" autocast (weights and optimizer stay fp32). FP8 is a model
    field (model.fp8 = true)."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
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
    checkpoint_every: int = 100
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""
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


@dataclass(frozen=True)
class DistillSection:
    """[distill]: how a student learns from its teacher."""
    teacher: str = ""
    """Teacher: a kdarch checkpoint directory, a Hugging Face causal-LM directory or a logit-cache directory
    (kdarch cache-teacher). Empty with `kdarch distill`: train a teacher first ([teacher] table)."""
    teacher_dtype: str = "float32"
    """dtype of a Hugging Face teacher's forward pass ("float32" or "bfloat16")."""
    kind: str = "forward_kl"
    """Soft-label divergence: forward_kl, reverse_kl, jsd or tvd."""
    alpha: str = "constant:0.5"
    """Weight of the soft term (1 - alpha goes to hard labels): a schedule, e.g. "constant:0.5",
    "linear:0.9->0.3", "cosine:0.9->0.3" or "adaptive:0.9->0.1"."""
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

    def __post_init__(self):
        check_field_types(self, "distill")
        choice_arg("distill.teacher_dtype", self.teacher_dtype, DTYPES, error=ConfigError)
        choice_arg("distill.kind", self.kind, KD_KINDS, error=ConfigError)
        require(self.top_k >= 0, "distill.top_k", "an int >= 0", self.top_k)
        for name in ("feature_weight", "relation_weight"):
            require(getattr(self, name) >= 0, f"distill.{name}", "a number >= 0", getattr(self, name))
        choice_arg("distill.feature_loss", self.feature_loss, ("mse", "cosine"), error=ConfigError)
        choice_arg("distill.relation_kind", self.relation_kind, RELATION_KINDS, error=ConfigError)
        choice_arg("distill.relation_over", self.relation_over, RELATION_OVER, error=ConfigError)
        choice_arg("distill.relation_source", self.relation_source, RELATION_SOURCES, error=ConfigError)
        require(all(is_number(w) and w >= 0 for w in self.mtp_depth_weights), "distill.mtp_depth_weights",
                "a list of numbers >= 0", self.mtp_depth_weights)


@dataclass(frozen=True)
class Stage:
    """A model trained by a run: the teacher or one student of the chain ([teacher], [[students]])."""
    name: str
    model: ModelSection
    train: TrainSection


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "distill": DistillSection}


@dataclass(frozen=True)
class RunConfig:
    """A whole run. `kdarch train` uses model/data/train; `kdarch distill` adds distill, and without a
    distill.teacher it trains `teacher` first, then each of `students` from the previous model (a chain:
    teacher -> student 1 -> student 2 ...), and `scratch` trains the first student's architecture without a
    teacher on the same token budget as the baseline."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    teacher: Stage | None = None
    students: tuple[Stage, ...] = ()
    scratch: bool = True

    def to_toml(self) -> str:
        """The resolved configuration, as a TOML file that reproduces the run."""
        lines = []
        for name in SECTIONS:
            lines += [f"[{name}]", *_toml_items(_section_table(getattr(self, name))), ""]
        lines += [f"scratch = {_toml_value(self.scratch)}", ""] if not self.scratch else []
        for key, stage in ([("teacher", self.teacher)] if self.teacher else []) + [("students", s) for s in self.students]:
            head = f"[{key}]" if key == "teacher" else f"[[{key}]]"
            lines += [head, f"name = {_toml_value(stage.name)}",
                      f"model = {_inline(_section_table(stage.model))}",
                      f"train = {_inline(_changed(stage.train, self.train))}", ""]
        return "\n".join(lines)


def _section_table(section) -> dict:
    if isinstance(section, ModelSection):
        return {"preset": section.preset, **section.overrides}
    return dataclasses.asdict(section)


def _changed(section, base) -> dict:
    return {k: v for k, v in dataclasses.asdict(section).items() if getattr(base, k) != v}


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _toml_items(table: dict) -> list[str]:
    return [f"{k} = {_toml_value(v)}" for k, v in table.items()]


def _inline(table: dict) -> str:
    return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in table.items()) + "}"


def _make(cls, table: dict, where: str):
    """cls(**table) from a TOML table; errors name `where` (e.g. "students[0].train") instead of the section."""
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


def _stage(table: dict, where: str, base_train: TrainSection, default_name: str) -> Stage:
    table = dict(table)
    unknown = sorted(set(table) - {"name", "model", "train"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; a stage has name, model and train")
    train = _make(TrainSection, {**dataclasses.asdict(base_train), **table.get("train", {})}, f"{where}.train")
    return Stage(str(table.get("name", default_name)), _make(ModelSection, table.get("model", {}), f"{where}.model"),
                 train)


def load_run_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from a TOML file (or defaults) with `section.field` overrides applied on top."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - set(SECTIONS) - {"teacher", "students", "scratch"})
    if unknown:
        raise ConfigError(f"config file: unknown table(s) {unknown}; known are {sorted(SECTIONS)} + teacher, "
                          "students, scratch")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"override {key!r}: expected section.field with section in {sorted(SECTIONS)}")
        raw.setdefault(section, {})[name] = value
    sections = {name: _make(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    teacher = _stage(raw["teacher"], "teacher", sections["train"], "teacher") if "teacher" in raw else None
    students = raw.get("students", [])
    if not isinstance(students, list):
        raise ConfigError("students: expected an array of tables ([[students]])")
    chain = tuple(_stage(s, f"students[{i}]", sections["train"], f"student{i + 1}" if i else "student")
                  for i, s in enumerate(students))
    scratch = raw.get("scratch", True)
    require(isinstance(scratch, bool), "scratch", "true or false", scratch)
    return RunConfig(**sections, teacher=teacher, students=chain, scratch=scratch)


# --- command-line flags from the field docstrings ---------------------------------------------------------------

@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field: docstring} read from the class source (the string literal after each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_flag_value(text: str, kind):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"expected {kind.__name__}, got {text!r}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_config_flags(parser, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """One `--section.field` flag per config field (and per ModelConfig field under --model.), documented.
    An entry "section.field" adds that one field's flag only."""
    for entry in sections:
        name, _, only = entry.partition(".")
        group = parser.add_argument_group(f"[{name}] config fields (override the --config file)")
        if name == "model":
            group.add_argument("--model.preset", dest="cfg:model.preset", metavar="NAME",
                               help=f"{field_docs(ModelSection)['preset']} One of {sorted(PRESETS)}.")
            cls, skip = ModelConfig, {"vocab_size", "bos_token_id", "eos_token_id"}  # set from the tokenizer
        else:
            cls, skip = SECTIONS[name], set()
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name == "overrides" or (only and f.name != only):
                continue
            kind = hints[f.name]
            default = getattr(defaults, f.name) if name != "model" else None
            shown = f" (default: {default!r})" if default is not None else ""
            group.add_argument(f"--{name}.{f.name}", dest=f"cfg:{name}.{f.name}", metavar=kind.__name__.upper()
                               if isinstance(kind, type) else "VALUE",
                               type=functools.partial(_flag_type, kind=kind),
                               help=(field_docs(cls).get(f.name, "") + shown).replace("%", "%%"))


def _flag_type(text: str, kind):
    return _parse_flag_value(text, kind if isinstance(kind, type) else None)


def overrides_from_args(args) -> dict[str, Any]:
    """The `--section.field` values given on the command line, for `load_run_config`."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
