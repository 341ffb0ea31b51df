"""Command-line flags for every run-config field, documented from the field docstrings.

Every field of a run configuration is also a flag that overrides the --config file: `--section.field VALUE`
for [model] / [data] / [train] / [distill], `--teacher.model.FIELD`, `--teacher.train.FIELD`, `--teacher.name`
for the teacher stage, `--students.N.model.FIELD` (etc.) for student N of the chain, and `--scratch BOOL`.
Section flags are declared to argparse (so `--help` lists each with its meaning and default); stage flags take
any [model] / [train] field, so they are read from what argparse leaves over, checked against the same fields
and parsed with the same types. A value of the wrong type says what was expected
(`--train.steps: expected an int, got 'ten'`); a misspelt flag gets the closest valid names.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import re
import typing
from typing import Any

from kdarch.config import PRESETS, ModelConfig
from kdarch.train.config import SECTIONS, ModelSection, TrainSection

__all__ = ["STAGE_FLAGS_HELP", "ArgumentParser", "add_config_flags", "field_docs", "overrides_from_args",
           "stage_overrides"]

STAGE_FLAGS_HELP = """\
stage flags (any [model] or [train] field, for one stage of the run):
  --teacher.model.FIELD VALUE     the teacher's architecture (a ModelConfig field or preset)
  --teacher.train.FIELD VALUE     the teacher's training (a [train] field), e.g. --teacher.train.steps 50
  --teacher.name NAME             the teacher stage's name (its directory under the run)
  --students.N.model.FIELD VALUE  student N of the chain (0: the first; more students extend the chain)
  --students.N.train.FIELD VALUE
  --students.N.name NAME
  --scratch BOOL                  also train the first student's architecture from scratch (default: true)
[train] fields apply to every stage, replacing each stage's own defaults (the embedded default trains its
teacher 180 steps and its student 100: --train.steps 50 makes both 50); stage flags then set one stage.
"""


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


class FlagValue:
    """argparse `type=` for a field of type `kind`: the parsed value, or an error saying what was expected."""

    _WHAT = {bool: "true or false", int: "an int", float: "a number", str: "a string"}

    def __init__(self, kind):
        self.kind = kind if isinstance(kind, type) else None
        self.__name__ = getattr(self.kind, "__name__", "value")  # argparse names the type in some messages

    def __call__(self, text: str):
        kind = self.kind
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float, str):
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {self._WHAT[kind]}, got {text!r}") from None
        try:  # lists, dicts, optional ints: JSON, else the text itself
            return json.loads(text)
        except json.JSONDecodeError:
            return text


def _fields(name: str):
    """(class, fields shown as flags) of a section; [model] flags are ModelConfig's fields."""
    if name == "model":
        skip = {"vocab_size", "bos_token_id", "eos_token_id"}  # set from the tokenizer
        return ModelConfig, [f for f in dataclasses.fields(ModelConfig) if f.name not in skip]
    return SECTIONS[name], [f for f in dataclasses.fields(SECTIONS[name])]


def add_config_flags(parser, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """One `--section.field` flag per config field (and per ModelConfig field under --model.), documented.
    An entry "section.field" adds that one field's flag only."""
    for entry in sections:
        name, _, only = entry.partition(".")
        group = parser.add_argument_group(f"[{name}] config fields (override the --config file)")
        if name == "model" and not only:
            group.add_argument("--model.preset", dest="cfg:model.preset", metavar="NAME",
                               help=f"{field_docs(ModelSection)['preset']} One of {sorted(PRESETS)}.")
        cls, fields = _fields(name)
        hints, defaults = typing.get_type_hints(cls), cls()
        for f in fields:
            if only and f.name != only:
                continue
            kind = hints[f.name]
            default = getattr(defaults, f.name) if name != "model" else None
            shown = f" (default: {default!r})" if default is not None else ""
            group.add_argument(f"--{name}.{f.name}", dest=f"cfg:{name}.{f.name}", type=FlagValue(kind),
                               metavar=kind.__name__.upper() if isinstance(kind, type) else "VALUE",
                               help=(field_docs(cls).get(f.name, "") + shown).replace("%", "%%"))


def overrides_from_args(args) -> dict[str, Any]:
    """The `--section.field` values given on the command line, for `load_run_config`."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


_STAGE_FLAG = re.compile(r"--(teacher|students\.\d+)\.(name|model\.\w+|train\.\w+)|--scratch")


def _stage_flag_names() -> list[str]:
    names = ["--teacher.name", "--students.0.name", "--scratch"]
    for stage in ("teacher", "students.0"):
        names += [f"--{stage}.model.preset"] + [f"--{stage}.model.{f.name}" for f in _fields("model")[1]]
        names += [f"--{stage}.train.{f.name}" for f in _fields("train")[1]]
    return names


def stage_overrides(extra: list[str], parser: ArgumentParser) -> dict[str, Any]:
    """The stage flags among the arguments argparse did not know (see the module docstring), as overrides for
    `load_run_config`; anything else is a usage error with the closest valid flags."""
    hints = {"model": typing.get_type_hints(ModelConfig), "train": typing.get_type_hints(TrainSection)}
    out, i = {}, 0
    while i < len(extra):
        flag, _, value = extra[i].partition("=")
        m = _STAGE_FLAG.fullmatch(flag)
        if m is None:
            parser.unknown_flag(flag)
        key = flag[2:]
        part = m.group(2) or "scratch"
        section, _, field_name = part.partition(".")
        if section in hints and field_name != "preset" and field_name not in hints[section]:
            parser.unknown_flag(flag)
        if not value:
            i += 1
            if i >= len(extra) or extra[i].startswith("--"):
                parser.error(f"{flag}: expected a value")
            value = extra[i]
        kind = bool if part == "scratch" else str if field_name in ("", "preset") else hints[section][field_name]
        try:
            out[key] = FlagValue(kind)(value)
        except argparse.ArgumentTypeError as e:
            parser.error(f"{flag}: {e}")
        i += 1
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse with kdarch's messages: `--flag: expected ..., got ...`, and suggestions for misspelt flags.
    Usage errors exit 2, like every other usage or config error of kdarch."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): (?:invalid FlagValue value: )?", r"\1: ", message)
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            self.unknown_flag(m.group(1))
        super().error(message)

    def unknown_flag(self, flag: str):
        known = [o for a in self._actions for o in a.option_strings]
        for sub in self._subparsers._group_actions if self._subparsers else ():
            for p in sub.choices.values():
                known += [o for a in p._actions for o in a.option_strings]
        if self.prog.split()[-1] in ("train", "distill"):
            known += _stage_flag_names()
        close = difflib.get_close_matches(flag.partition("=")[0], known, n=3, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; see {self.prog} --help"
        super().error(f"unrecognized argument {flag}{hint}")
