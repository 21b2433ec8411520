"""Numerical comparison of models and their outputs: how every surgery and every export is judged.

Three pieces, front-end agnostic (they only call ``nn.Module``\\ s):

* :func:`compare_outputs` compares two whole output pytrees: structure, non-tensor leaves (ints, shapes,
  strings, ``None``), tensor shapes, dtypes and non-finite patterns, then the max relative error.
* :func:`verification_inputs` builds the inputs a transformation must survive: the example, fresh
  ``randn``, a large-magnitude input (30·randn) and non-negative inputs with exact zeros (relu(randn)).
  Magnitude-dependent cuts fail on the third, wrong "zero-preserving" claims (0 ↦ 0.5) on the fourth.
* :func:`check_equivalent` runs a candidate and a reference on those inputs in float32 *and* float64.
  float32 rounding can hide a wrong cut (a 1e-5-scaled branch changes the output by ~1e-5 relative,
  under a 1e-4 float32 tolerance); in float64 an exact transformation agrees to ~1e-15, so 1e-9 leaves
  no room for one.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_map

from strfx.errors import VerificationError, first_line

TOLERANCE = 1e-4  # float32: max relative error (strfx.api.TOLERANCE is the same number)
TOLERANCE64 = 1e-9  # float64: an exact transformation agrees to ~1e-15; a wrong cut cannot hide below this

INPUT_KINDS = ("example input", "random input", "large-magnitude input", "non-negative input with zeros")


# ------------------------------------------------------------------------------------ comparing outputs


class Comparison(BaseModel):
    """How one output pytree compares with an expected one."""

    error: float = Field(description="Max relative error over tensor leaves (inf when not comparable).")
    leaf: str | None = Field(None, description="Pytree path of the first mismatching leaf, else of the worst one.")
    reason: str | None = Field(None, description="One line when the outputs are not comparable, else None.")
    reference_nonfinite: bool = Field(
        False, description="The expected output is NaN/inf where the actual one is finite (0·inf in the reference).")

    def ok(self, tol: float) -> bool:
        return self.reason is None and self.error <= tol


def _path(path: tuple[Any, ...]) -> str:
    return "output" + keystr(path)


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).removeprefix('torch.')} tensor of shape {list(v.shape)}"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _spec_shape(spec: Any) -> Any:
    """A TreeSpec as nested tuples; tuple/list/Size and the dict kinds count as one container each (tracers swap them)."""
    kind = spec.type
    if kind in (list, torch.Size):
        kind = tuple
    elif isinstance(kind, type) and issubclass(kind, dict):  # OrderedDict, defaultdict: a dict
        kind = dict
    ctx = spec.context
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    with contextlib.suppress(TypeError):
        hash(ctx)
        return (kind, ctx, tuple(_spec_shape(c) for c in children))
    return (kind, repr(ctx), tuple(_spec_shape(c) for c in children))


def _leaf_equal(a: Any, e: Any) -> tuple[bool, float]:
    """Non-tensor leaves: exact, except Python floats (relative error, like tensors)."""
    if isinstance(e, float) and isinstance(a, (float, int)) and not isinstance(a, bool):
        if math.isnan(e) or math.isinf(e) or math.isnan(a) or math.isinf(a):
            return (a == e) or (math.isnan(a) and math.isnan(e)), 0.0
        return True, abs(a - e) / abs(e) if e else abs(a - e)
    if type(a) is not type(e) and not (isinstance(a, int) and isinstance(e, int) and not isinstance(a, bool)
                                       and not isinstance(e, bool)):
        return False, math.inf
    try:
        return bool(a == e), 0.0
    except Exception:  # noqa: BLE001 - an object whose == is not a bool: its type matched, take that
        return True, 0.0


def _tensor_compare(a: torch.Tensor, e: torch.Tensor, where: str) -> Comparison:
    if a.shape != e.shape:
        return Comparison(error=math.inf, leaf=where,
                          reason=f"{where} has shape {list(a.shape)}, expected {list(e.shape)}")
    if a.dtype != e.dtype:
        return Comparison(error=math.inf, leaf=where, reason=f"{where} has dtype {a.dtype}, expected {e.dtype}")
    a, e = a.detach(), e.detach()
    if a.is_complex():
        a, e = torch.view_as_real(a), torch.view_as_real(e)
    a, e = a.to("cpu", torch.float64), e.to("cpu", torch.float64)
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    if not (fa.all() and fe.all()):
        na, ne = torch.isnan(a), torch.isnan(e)
        same = torch.equal(na, ne) and torch.equal(a.masked_fill(fa | na, 0), e.masked_fill(fe | ne, 0))
        if not same:
            ref_only = int((~fe & fa).sum())
            if ref_only:
                return Comparison(error=math.inf, leaf=where, reference_nonfinite=True, reason=(
                    f"{where}: the reference is non-finite at {ref_only} positions where the candidate is finite"))
            return Comparison(error=math.inf, leaf=where, reason=(
                f"{where}: non-finite at {int((~fa & fe).sum())} positions where the reference is finite"
                if bool((~fa & fe).any()) else f"{where}: NaN/inf at different positions than the reference"))
        a, e = a[fe], e[fe]
    if e.numel() == 0:
        return Comparison(error=0.0, leaf=where)
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return Comparison(error=diff / scale if scale > 0 else diff, leaf=where)


def compare_outputs(actual: Any, expected: Any) -> Comparison:
    """Compare two model outputs leaf by leaf (see :class:`Comparison`).

    The error of a tensor is max |a − e| / max |e| (over its finite positions), so values near zero do
    not blow it up; a mismatch of structure, non-tensor leaf, shape, dtype or non-finite pattern makes it
    inf with a one-line ``reason`` naming the leaf (``output[1]``, ``output['logits']``).
    """
    a_leaves, a_spec = tree_flatten_with_path(actual)
    e_leaves, e_spec = tree_flatten_with_path(expected)
    a_paths, e_paths = [_path(p) for p, _ in a_leaves], [_path(p) for p, _ in e_leaves]
    if a_paths != e_paths or _spec_shape(a_spec) != _spec_shape(e_spec):
        for k, (ap, ep) in enumerate(zip(a_paths, e_paths)):
            if ap != ep:
                return Comparison(error=math.inf, leaf=ep, reason=(
                    f"output structure differs: {ep} expected, got {ap} ({len(a_paths)} vs {len(e_paths)} leaves)"))
        if len(a_paths) != len(e_paths):
            where = e_paths[len(a_paths)] if len(e_paths) > len(a_paths) else a_paths[len(e_paths)]
            return Comparison(error=math.inf, leaf=where, reason=(
                f"output structure differs at {where}: {len(a_paths)} leaves, expected {len(e_paths)}"))
        return Comparison(error=math.inf, leaf="output", reason=(
            f"output structure differs: {a_spec.type.__name__ if a_spec.type else 'leaf'} containers, "
            f"expected {e_spec.type.__name__ if e_spec.type else 'leaf'}"))
    worst = Comparison(error=0.0)
    for (_, a), (_, e), where in zip(a_leaves, e_leaves, e_paths):
        if isinstance(e, torch.Tensor) or isinstance(a, torch.Tensor):
            if not (isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor)):
                return Comparison(error=math.inf, leaf=where,
                                  reason=f"{where} is {_describe(a)}, expected {_describe(e)}")
            c = _tensor_compare(a, e, where)
        else:
            equal, err = _leaf_equal(a, e)
            c = Comparison(error=err, leaf=where) if equal else Comparison(
                error=math.inf, leaf=where, reason=f"{where} is {_describe(a)}, expected {_describe(e)}")
        if c.reason is not None:
            return c
        if c.error > worst.error or worst.leaf is None:
            worst = c
    return worst


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output (any pytree: tensor, tuple/list, dict, namedtuple), in pytree order."""
    return [leaf for _, leaf in tree_flatten_with_path(out)[0] if isinstance(leaf, torch.Tensor)]


def max_rel_error(actual: Any, expected: Any) -> float:
    """Max relative error of ``actual`` vs ``expected`` (:func:`compare_outputs`; inf on any mismatch)."""
    return compare_outputs(actual, expected).error


# ------------------------------------------------------------------------------------- the input set


class InputSet(NamedTuple):
    """One set of positional inputs and what kind it is (named in error messages)."""

    kind: str
    inputs: tuple[Any, ...]


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise VerificationError(f"example inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")
    return example_inputs


def _draw(x: Any, kind: int, gen: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor) or kind == 0 or x.numel() == 0:
        return x.clone() if isinstance(x, torch.Tensor) else x
    if x.dtype == torch.bool or x.is_complex():
        return x.clone()
    if x.is_floating_point():
        r = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        r = 30 * r if kind == 2 else torch.relu(r) if kind == 3 else r
        return r.to(x.device)
    # integers (token ids, indices): stay within the example's own range, so every value is valid
    lo, hi = int(x.min()), int(x.max())
    return torch.randint(lo, hi + 1, x.shape, generator=gen, dtype=x.dtype).to(x.device)


def verification_inputs(example_inputs: Any, seed: int = 0) -> list[InputSet]:
    """The example, fresh randn, 30·randn and relu(randn) inputs of the example's shapes and dtypes.

    Integer inputs (token ids) are drawn within the example's [min, max]; bool and non-tensor inputs
    are kept; inputs may be nested (dicts/lists of tensors). Deterministic for a given ``seed``.
    """
    inputs = _as_tuple(example_inputs)
    gen = torch.Generator().manual_seed(seed)
    return [InputSet(name, tuple(tree_map(lambda x, k=k: _draw(x, k, gen), inputs)))
            for k, name in enumerate(INPUT_KINDS)]


# ---------------------------------------------------------------------------------- model equivalence


class Equivalence(BaseModel):
    """What :func:`check_equivalent` found: the worst errors over all inputs, and what it skipped."""

    float32_error: float = Field(description="Max relative error with the models as given (float32 models).")
    float64_error: float | None = Field(None, description="Max relative error in float64; None when skipped.")
    float32_leaf: str | None = Field(None, description="Output leaf of the worst float32 error.")
    tol32: float = TOLERANCE
    tol64: float = TOLERANCE64
    inputs: list[str] = Field(description="The input kinds both models were compared on.")
    notes: list[str] = Field(default_factory=list, description="One line per check that was skipped, and why.")


class NotEquivalentError(VerificationError):
    """A candidate differs from its reference; the message is one line, the attributes are for diagnosis."""

    def __init__(self, message: str, *, kind: str, inputs: tuple[Any, ...], leaf: str | None,
                 float32_error: float | None, float64_error: float | None) -> None:
        super().__init__(message)
        self.kind, self.inputs, self.leaf = kind, inputs, leaf
        self.float32_error, self.float64_error = float32_error, float64_error


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode; each gets its own training flag back afterwards."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            with contextlib.suppress(NotImplementedError):  # an ExportedProgram's module cannot switch
                model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def clone_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A fresh copy per run: a model that mutates its input (``x.mul_(2)``) must not poison the next run."""
    return tuple(tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, inputs))


def _to64(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(tree_map(lambda x: x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point()
                          else x, inputs))


def to_float64(model: nn.Module) -> nn.Module:
    """``model.double()``, and floating tensors a forward cached in the modules' dicts/lists too (timm's
    attention-bias caches), which ``.double()`` does not reach: a float32 cache would stop a float64 run."""
    model.double()

    def cast(value: Any, depth: int = 0) -> Any:
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_floating_point():
            return value.to(torch.float64)
        if depth < 3 and isinstance(value, dict):
            return type(value)((k, cast(v, depth + 1)) for k, v in value.items()) if type(value) is dict else value
        return value

    for mod in model.modules():
        for key, value in list(vars(mod).items()):
            if isinstance(value, dict) and not key.startswith("_"):
                setattr(mod, key, cast(value))
    return model


def available_memory() -> int | None:
    """Bytes of memory available to this process now (psutil if installed, else /proc/meminfo)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _float64_copies(candidate: nn.Module, reference: nn.Module) -> tuple[nn.Module, nn.Module] | str:
    """float64 deep copies of both models, or a one-line note saying why there are none."""
    f64 = sum(8 * sum(t.numel() for t in [*m.parameters(), *m.buffers()]) for m in (candidate, reference))
    on_cuda = any(t.is_cuda for m in (candidate, reference) for t in [*m.parameters(), *m.buffers()])
    free = torch.cuda.mem_get_info()[0] if on_cuda else available_memory()
    if free is not None and 1.5 * f64 > free:
        return (f"float64 check skipped: the two models need {f64 / 2**30:.1f} GiB in float64, "
                f"{free / 2**30:.1f} GiB is available")
    try:
        return to_float64(copy.deepcopy(candidate)), to_float64(copy.deepcopy(reference))
    except Exception as err:  # noqa: BLE001 - a model that cannot be deep-copied or cast
        return f"float64 check skipped: the models cannot be copied to float64 ({first_line(err)})"



@dataclass
class _Run:
    comparison: Comparison | None = None  # None: the reference itself failed
    failure: str | None = None  # the candidate raised


_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class Float64Everywhere(TorchDispatchMode):
    """Keep a float64 run in float64: a cast or a factory asking for float32/16 gets float64 instead.

    Model code often computes a norm in float32 whatever the model's dtype (HF's RMSNorm casts to
    float32 and back); cast to float64, such a model still rounds there to float32, and a float64
    comparison would see float32 noise. Under this mode every op that names a lower float dtype
    works in float64, so a float64 check compares what the cut changed and nothing else.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("dtype") in _LOW_FLOATS:
            kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)


@torch.no_grad()
def _run_pair(candidate: nn.Module, reference: nn.Module, inputs: tuple[Any, ...], float64: bool = False) -> _Run:
    if float64:
        with Float64Everywhere():
            return _run_pair(candidate, reference, inputs)
    try:
        expected = reference(*clone_inputs(inputs))
    except Exception:  # noqa: BLE001 - the caller decides (an example input the reference rejects is an error)
        return _Run()
    try:
        actual = candidate(*clone_inputs(inputs))
    except Exception as err:  # noqa: BLE001
        return _Run(failure=first_line(err))
    return _Run(comparison=compare_outputs(actual, expected))


def check_equivalent(
    candidate: nn.Module,
    reference: nn.Module,
    inputs_list: Sequence[InputSet] | Sequence[tuple[Any, ...]],
    *,
    tol32: float = TOLERANCE,
    tol64: float = TOLERANCE64,
    what: str = "the candidate",
    against: str = "the reference",
    float64: bool = True,
    candidate64: nn.Module | None = None,
    reference64: nn.Module | None = None,
) -> Equivalence:
    """Prove ``candidate`` computes what ``reference`` does, on every input set, in float32 and float64.

    Both run in eval mode (each submodule's own mode is restored afterwards) on a fresh clone of the
    inputs per run. float64 runs on deep copies cast with ``.double()`` (floating inputs cast, integer
    inputs unchanged) and is skipped, with a note, only when both copies would not fit in memory.
    ``inputs_list`` is usually :func:`verification_inputs`; plain input tuples are named "input set k".

    A transformation that folds parameters (BatchNorm into conv, a gate into a weight) rounds the folded
    values to float32; cast to float64 they differ from the reference's by ~1e-8, which the float64
    tolerance rightly flags. Pass ``candidate64`` (the same transformation applied to a float64 copy of
    the reference, so the folds are computed in float64) and optionally ``reference64`` to compare
    those instead of ``.double()`` copies.
    Raises :class:`NotEquivalentError` (a :class:`VerificationError`) with one line naming the input
    kind, the output leaf and both errors.
    """
    sets = [s if isinstance(s, InputSet) else InputSet(f"input set {k}", _as_tuple(s)) for k, s in enumerate(inputs_list)]
    if not sets:
        raise VerificationError("check_equivalent needs at least one set of inputs")
    notes: list[str] = []
    models64: tuple[nn.Module, nn.Module] | None = None
    if float64 and candidate64 is not None:
        models64 = (candidate64, reference64 if reference64 is not None else copy.deepcopy(reference).double())
    elif float64:
        copies = _float64_copies(candidate, reference)
        if isinstance(copies, str):
            notes.append(copies)
        else:
            models64 = copies
    result = Equivalence(float32_error=0.0, float64_error=0.0 if models64 is not None else None,
                         tol32=tol32, tol64=tol64, inputs=[], notes=notes)
    notes = result.notes  # pydantic copied the list: later notes go to the result's own
    with eval_mode(candidate, reference):
        for k, s in enumerate(sets):
            run32 = _run_pair(candidate, reference, s.inputs)
            if run32.comparison is None and run32.failure is None:
                if k == 0:
                    raise VerificationError(f"{against} fails to run on the {s.kind}; check the example inputs")
                notes.append(f"{s.kind} skipped: {against} itself fails on it")
                continue
            run64 = None
            if models64 is not None and run32.failure is None:
                with eval_mode(*models64):
                    run64 = _run_pair(*models64, _to64(s.inputs), float64=True)
                if run64.comparison is None:  # the reference does not run in float64 (dtype baked in)
                    notes.append(f"float64 check skipped on the {s.kind}: {against} does not run in float64")
                    run64 = None
            own = _float32_rounding(reference, models64, s, run32, run64, tol32, tol64)
            if own is not None:
                notes.append(f"float32 differs by {run32.comparison.error:.2g} on the {s.kind}, within 4× of "
                             f"{against}'s own float32 rounding there ({own:.2g} from its float64 result): an "
                             f"ill-conditioned op, not the cut, which float64 shows exact")
                result.float32_error = max(result.float32_error, run32.comparison.error)
                result.float64_error = max(result.float64_error or 0.0, run64.comparison.error)
                result.inputs.append(s.kind)
                continue
            _judge(run32, run64, s, result, what, against)
            result.inputs.append(s.kind)
    return result


def _float32_rounding(reference: nn.Module, models64: tuple[nn.Module, nn.Module] | None, s: InputSet,
                      run32: _Run, run64: _Run | None, tol32: float, tol64: float) -> float | None:
    """Where float32 disagrees but float64 proves the transformation exact: how far the reference's own
    float32 output is from its float64 one, if the disagreement is within 4× of it (else None).

    Two float32 evaluations of the same exact function each carry the model's rounding error; where an
    op amplifies it (softmax of large logits on a 30× input), they differ by up to about twice that, and
    the float32 check cannot tell the cut from the model's conditioning, so float64 decides.
    """
    c32 = run32.comparison
    c64 = None if run64 is None else run64.comparison
    if c32 is None or c64 is None or models64 is None or c32.reason is not None or c64.reason is not None:
        return None
    if c32.error <= tol32 or not c64.ok(tol64):
        return None
    own = float32_rounding(reference, models64[1], s.inputs)
    return own if own is not None and c32.error <= 4 * own else None


def float32_rounding(model: nn.Module, model64: nn.Module, inputs: tuple[Any, ...]) -> float | None:
    """Relative distance between ``model``'s float32 output and its float64 copy's (``model64``) on ``inputs``:
    the model's own float32 rounding there; None if either fails or the outputs cannot be compared."""
    try:
        with torch.no_grad(), eval_mode(model, model64):
            out32 = model(*clone_inputs(inputs))
            with Float64Everywhere():
                out64 = model64(*clone_inputs(_to64(inputs)))
    except Exception:  # noqa: BLE001 - no evidence either way
        return None
    got = compare_outputs(_to64((out32,)), (out64,))
    return got.error if got.reason is None else None


def _judge(run32: _Run, run64: _Run | None, s: InputSet, result: Equivalence, what: str, against: str) -> None:
    """Fold one input set's comparisons into ``result``; raise on the first disagreement."""
    c32 = run32.comparison
    c64 = None if run64 is None else run64.comparison

    def fail(detail: str, leaf: str | None) -> None:
        e32 = "-" if c32 is None else f"{c32.error:.3g}"
        e64 = "skipped" if run64 is None else ("fails to run" if c64 is None else f"{c64.error:.3g}")
        raise NotEquivalentError(
            f"{what} differs from {against} on the {s.kind}: {detail}; max relative error float32 {e32} "
            f"(≤ {result.tol32:g}), float64 {e64} (≤ {result.tol64:g})",
            kind=s.kind, inputs=s.inputs, leaf=leaf, float32_error=None if c32 is None else c32.error,
            float64_error=None if c64 is None else c64.error)

    if run32.failure is not None:
        fail(f"{what} fails to run ({run32.failure})", None)
    assert c32 is not None
    if c32.reference_nonfinite:
        fail(f"{against} itself is non-finite on that input ({c32.reason})", c32.leaf)
    if c32.reason is not None:
        fail(c32.reason, c32.leaf)
    if run64 is not None and run64.failure is not None:
        fail(f"{what} fails to run in float64 ({run64.failure})", None)
    if c64 is not None and c64.reason is not None and not c64.reference_nonfinite:
        fail(f"in float64: {c64.reason}", c64.leaf)
    if c32.error > result.tol32:
        exact = c64 is not None and c64.ok(result.tol64)
        fail(f"worst at {c32.leaf}" + (" (float64 agrees: the transformation is exact and float32 rounding is "
                                        "amplified by an ill-conditioned op; refused all the same)" if exact else ""),
             c32.leaf)
    if c64 is not None and c64.reason is None and c64.error > result.tol64:
        fail(f"worst at {c64.leaf} (float64 exposes a difference float32 rounding hides)", c64.leaf)
    if c32.error >= result.float32_error:
        result.float32_error, result.float32_leaf = c32.error, c32.leaf
    if c64 is not None and c64.reason is None and result.float64_error is not None:
        result.float64_error = max(result.float64_error, c64.error)


__all__ = ["Comparison", "Equivalence", "INPUT_KINDS", "InputSet", "NotEquivalentError", "TOLERANCE", "TOLERANCE64",
           "check_equivalent", "clone_inputs", "compare_outputs", "eval_mode", "flatten_outputs", "float32_rounding",
           "max_rel_error", "to_float64", "verification_inputs"]
