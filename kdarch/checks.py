"""Input checks at kdarch's public boundaries: one message style, and one switch for checks that read values.

Every failed check says what was expected and what was given, naming the argument (`topk_ids`), the config
field (`ModelConfig.n_heads`, `train.steps`) or the flag, in one shape:

    <name>: expected <what>, got <value>

so a user can fix the call without reading kdarch's source. Checks are made where input enters kdarch (the
functional ops, the model's forward, configs, files), never again inside.

Checks of types, shapes and dtypes cost nothing and are always on. Checks that read tensor *values* (token
ids in range, offsets in order) need those values on the host: a device -> host sync that stalls a GPU
stream and breaks a `torch.compile` graph. They run only where `value_checks_on(tensor)` says so:

    KDARCH_CHECKS=1    always (the test suite runs this way)
    KDARCH_CHECKS=0    never
    unset              for CPU tensors (a sync costs nothing there), never for accelerator tensors

and never while `torch.compile` traces.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
from typing import Any, NoReturn

import torch

__all__ = ["ConfigError", "bool_arg", "check", "check_field_types", "check_index_range", "check_type", "choice_arg",
           "describe", "fail", "int_arg",
           "is_int", "is_number", "number_arg", "optional_import", "set_value_checks", "tensor_arg",
           "value_checks_on"]

_MISSING = object()


class ConfigError(ValueError):
    """A configuration field (ModelConfig, a run config section, a flag) has a value kdarch cannot use."""


def describe(value: Any) -> str:
    """How a given value is shown in a message: tensors by dtype and shape, the rest by repr (shortened)."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def fail(name: str, expected: str, got: Any = _MISSING, *, error: type[Exception] = ValueError) -> NoReturn:
    """Raise `error("<name>: expected <expected>, got <got>")` (without ", got ..." when `got` is not given)."""
    raise error(f"{name}: expected {expected}" + ("" if got is _MISSING else f", got {describe(got)}"))


def check(ok: bool, name: str, expected: str, got: Any = _MISSING, *, error: type[Exception] = ValueError) -> None:
    """`fail(...)` unless ok."""
    if not ok:
        fail(name, expected, got, error=error)


# --- Python values ------------------------------------------------------------------------------------------
def is_int(v: Any) -> bool:
    """An int, and not a bool (True is an int to Python, never to a config)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi:g}"
    return ""


def _within(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    return ((lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))


def int_arg(name: str, v: Any, *, min: int | None = None, max: int | None = None,
            error: type[Exception] = ValueError) -> int:
    """v if it is an int (not a bool) in [min, max]; else the error, e.g. "k: expected an int >= 1, got 0"."""
    check(is_int(v) and _within(v, min, max, False, False), name, "an int" + _interval(min, max, False, False), v,
          error=error)
    return v


def number_arg(name: str, v: Any, *, min: float | None = None, max: float | None = None, min_open: bool = False,
               max_open: bool = False, error: type[Exception] = ValueError) -> float:
    """float(v) if it is a finite number (not a bool) in the interval; bounds are closed unless *_open."""
    check(is_number(v) and _within(v, min, max, min_open, max_open), name,
          "a finite number" + _interval(min, max, min_open, max_open), v, error=error)
    return float(v)


def bool_arg(name: str, v: Any, *, error: type[Exception] = ValueError) -> bool:
    check(isinstance(v, bool), name, "true or false", v, error=error)
    return v


def choice_arg(name: str, v: Any, choices, *, error: type[Exception] = ValueError):
    """v if it is one of `choices`; the message lists them."""
    check(v in tuple(choices), name, "one of " + ", ".join(repr(c) for c in choices), v, error=error)
    return v


_FIELD_TYPES = {
    "int": (is_int, "an int"), "float": (is_number, "a finite number"), "bool": (lambda v: isinstance(v, bool),
                                                                              "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"), "list": (lambda v: isinstance(v, (list, tuple)), "a list"),
    "dict": (lambda v: isinstance(v, dict), "a table"), "int | None": (lambda v: v is None or is_int(v),
                                                                      "an int or None"),
}


def check_field_types(obj, prefix: str, *, error: type[Exception] = ConfigError) -> None:
    """Each field of the dataclass `obj` holds a value of its annotated type ("int", "float", "bool", "str",
    "list", "dict", "int | None"; other annotations are not checked): run before any comparison, so that a
    string where a number belongs is named ("<prefix>.<field>: expected an int, got 'two'") rather than
    compared."""
    for f in dataclasses.fields(obj):
        check_type(f"{prefix}.{f.name}", getattr(obj, f.name), f.type, error=error)


def check_type(name: str, value: Any, annotation: str, *, error: type[Exception] = ConfigError) -> None:
    """`value` has the type a dataclass field annotation names (see check_field_types); others pass."""
    if annotation in _FIELD_TYPES:
        ok, what = _FIELD_TYPES[annotation]
        check(ok(value), name, what, value, error=error)


# --- tensors --------------------------------------------------------------------------------------------------
def tensor_arg(name: str, t: Any, *, dim: int | tuple[int, ...] | None = None, dtypes=None, floating: bool = False,
               shape: tuple[int | None, ...] | None = None, nonempty: bool = False, what: str | None = None,
               error: type[Exception] = ValueError) -> torch.Tensor:
    """t if it is a tensor with these properties (free checks: no value is read). `shape` may hold None for any
    size; `what` overrides the description in the message (e.g. "an int64/int32 tensor [batch, seq_len]")."""
    dims = (dim,) if isinstance(dim, int) else dim
    ok = (isinstance(t, torch.Tensor) and (dims is None or t.dim() in dims)
          and (dtypes is None or t.dtype in tuple(dtypes)) and (not floating or t.is_floating_point())
          and (shape is None or (t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))))
          and (not nonempty or t.numel() > 0))
    if not ok:
        if what is None:
            kind = ("/".join(str(d).removeprefix("torch.") for d in dtypes) if dtypes is not None
                    else "float" if floating else "")
            size = (f" of shape [{', '.join('*' if s is None else str(s) for s in shape)}]" if shape is not None
                    else f" with {' or '.join(map(str, dims))} dimensions" if dims is not None else "")
            what = f"a{'n' if kind[:1] in 'aeiou' and kind else ''} {kind + ' ' if kind else ''}tensor{size}"
            what += " with at least one element" if nonempty else ""
        fail(name, what, t, error=error)
    return t


_value_checks: bool | None = None  # None: read KDARCH_CHECKS (see the module docstring)


def set_value_checks(mode: bool | None) -> None:
    """Force the value checks on (True) or off (False), or go back to KDARCH_CHECKS / the default (None)."""
    global _value_checks
    _value_checks = mode


def value_checks_on(t: torch.Tensor | None = None) -> bool:
    """Whether to run checks that read tensor values now (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if t is not None and t.device.type == "meta":
        return False
    if _value_checks is not None:
        return _value_checks
    env = os.environ.get("KDARCH_CHECKS", "").strip().lower()
    if env in ("1", "true", "on", "yes"):
        return True
    if env in ("0", "false", "off", "no"):
        return False
    return t is None or t.device.type == "cpu"


def check_index_range(name: str, ids: torch.Tensor, size: int, *, ignore: int | None = None,
                      what: str | None = None) -> None:
    """A value check (only when `value_checks_on(ids)`): every entry of the integer tensor `ids` lies in
    [0, size), apart from entries equal to `ignore`."""
    if not ids.numel() or not value_checks_on(ids):
        return
    valid = ids if ignore is None else ids[ids != ignore]
    if not valid.numel():
        return
    lo, hi = torch.aminmax(valid)
    if lo < 0 or hi >= size:
        bad = int(lo) if lo < 0 else int(hi)
        extra = f" (or {ignore} to ignore)" if ignore is not None else ""
        fail(name, (what or "ids") + f" in [0, {size}){extra}", bad)


# --- optional dependencies --------------------------------------------------------------------------------------
def optional_import(module: str, *, extra: str, purpose: str):
    """Import an optional dependency, or raise ImportError naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the {module} package, which is not installed: "
                          f"pip install 'kdarch[{extra}]' ({e})") from None
