"""Every ``SYNCBN_*`` environment variable: its name, default, meaning and one parser.

Each variable is read where it takes effect, at every read (tests and benchmarks switch them
per block, and a read is one dictionary lookup plus a cached parse). A value that means
nothing raises ``ValueError`` naming the variable and what it accepts, instead of being taken
as the default.

    from syncbn import settings
    if settings.DEBUG.get(): ...
    with settings.ALWAYS_SYNC.set(True): ...          # this process and the ones it starts

``syncbn info`` lists them with their current values (``describe``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Variable(Generic[T]):
    """One environment variable: unset or empty means ``default``."""

    name: str
    default: T
    doc: str
    choices: tuple[str, ...] = ()
    """Accepted spellings (for flags and choices); empty for a free-form integer."""
    kind: str = "flag"
    """``flag`` (bool), ``choice`` (one of ``choices``), ``int`` or ``str``."""
    aliases: tuple[tuple[str, str], ...] = ()
    """Other spellings of a choice: ``(alias, choice)`` pairs."""
    internal: bool = False
    """For the test suite and benchmarks, not for users (``syncbn info`` lists it apart)."""
    _parsed: dict = field(default_factory=dict, compare=False, repr=False)

    def raw(self) -> str | None:
        return os.environ.get(self.name)

    def get(self) -> T:
        """The current value (the environment is read at every call)."""
        raw = os.environ.get(self.name)
        if raw is None:
            return self.default
        try:
            return self._parsed[raw]
        except KeyError:
            value = self._parsed[raw] = self._parse(raw)
            return value

    def _parse(self, raw: str) -> T:
        if self.kind == "str":
            return raw.strip()  # type: ignore[return-value]
        text = raw.strip().lower()
        if not text:
            return self.default
        if self.kind == "flag":
            if text in _TRUE:
                return True  # type: ignore[return-value]
            if text in _FALSE:
                return False  # type: ignore[return-value]
        elif self.kind == "choice":
            text = dict(self.aliases).get(text, text)
            if text in self.choices:
                return text  # type: ignore[return-value]
        else:
            try:
                return int(text)  # type: ignore[return-value]
            except ValueError:
                pass
        accepted = "an integer" if self.kind == "int" else "one of " + ", ".join(self.accepted())
        raise ValueError(f"syncbn: {self.name}={raw!r} is not understood; expected {accepted}")

    def accepted(self) -> tuple[str, ...]:
        return _TRUE + _FALSE if self.kind == "flag" else self.choices

    @contextlib.contextmanager
    def set(self, value: T | None) -> Iterator[None]:
        """Set the variable inside the block (``None``: unset), restored after.

        The environment is what changes, so processes started inside the block inherit it.
        """
        saved = os.environ.get(self.name)
        if value is None:
            os.environ.pop(self.name, None)
        elif isinstance(value, bool):
            os.environ[self.name] = "1" if value else "0"
        else:
            os.environ[self.name] = str(value)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = saved


def _flag(name: str, doc: str, default: bool = False, internal: bool = False) -> Variable[bool]:
    return Variable(name, default, doc, kind="flag", internal=internal)


DEBUG = _flag(
    "SYNCBN_DEBUG",
    "Before each collective the ranks compare what call they are making (pass, call number, "
    "channels, dtype, group size, layer name) and all raise the same error naming the ranks "
    "that differ, instead of hanging or mixing statistics. One small all-gather per layer and "
    "pass: for finding a bug, not for production.",
)
ALWAYS_SYNC = _flag(
    "SYNCBN_ALWAYS_SYNC",
    "Make the collectives even in a process group of one rank, to time the synchronized path on one device.",
)
BACKEND = Variable(
    "SYNCBN_BACKEND",
    "auto",
    "Which implementation runs the local passes. auto: Triton kernels for CUDA tensors of "
    "float32/float16/bfloat16, torch ops otherwise; torch: torch ops everywhere (a second "
    "opinion on the GPU); triton: the Triton kernels for every tensor of those dtypes, CPU "
    "tensors included (with TRITON_INTERPRET=1, how the tests run the kernels without a GPU).",
    choices=("auto", "torch", "triton"),
    kind="choice",
    aliases=(("reference", "torch"),),
)
COMPILE = Variable(
    "SYNCBN_COMPILE",
    "traced",
    "How the layer runs under torch.compile. traced: as torch ops the compiler sees through "
    "(a functional all-reduce, inductor's own reductions, the normalize step fused with the ops "
    "around it); ops: each pass as one opaque custom op running the eager code (syncbn's "
    "Triton kernels for CUDA tensors). Read when a model is compiled, and the same on every "
    "rank; SYNCBN_DEBUG=1 implies ops.",
    choices=("traced", "ops"),
    kind="choice",
)
TRITON_FAST_LAUNCH = _flag(
    "SYNCBN_TRITON_FAST_LAUNCH",
    "GPU: relaunch compiled Triton kernels directly, skipping Triton's per-call argument "
    "specialization (less host time per layer). Experimental, off by default until confirmed "
    "on a GPU; whenever a Triton launch hook is set (a profiler), launches go through Triton.",
)
TEST_DEVICE = Variable(
    "SYNCBN_TEST_DEVICE",
    "cpu",
    "The device the oracle tests (tests/test_layer.py, tests/test_semantics.py) put their "
    "tensors on; cuda skips them, with the reason, where there is no CUDA device.",
    choices=("cpu", "cuda"),
    kind="choice",
    internal=True,
)
SOAK_STEPS = Variable(
    "SYNCBN_SOAK_STEPS", 200, "Randomized steps of the soak test (pytest -m soak).", kind="int", internal=True
)
SOAK_SEED = Variable("SYNCBN_SOAK_SEED", 0, "Seed of the soak test's random configurations.", kind="int", internal=True)
SOAK_REPORT = Variable(
    "SYNCBN_SOAK_REPORT", "", "Path of a JSON report the soak test writes (empty: none).", kind="str", internal=True
)

VARIABLES: tuple[Variable, ...] = (
    DEBUG, ALWAYS_SYNC, BACKEND, COMPILE, TRITON_FAST_LAUNCH, TEST_DEVICE, SOAK_STEPS, SOAK_SEED, SOAK_REPORT,
)  # fmt: skip


def describe() -> list[tuple[str, str, str]]:
    """``(name, current value, meaning)`` of every user-facing variable, for ``syncbn info``."""
    rows = []
    for var in VARIABLES:
        if var.internal:
            continue
        raw = var.raw()
        try:
            value = var.get()
            shown = f"{raw} ({_shown(value)})" if raw is not None else f"unset ({_shown(value)})"
        except ValueError as err:
            shown = f"{raw!r}: {err}"
        rows.append((var.name, shown, var.doc))
    return rows


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
