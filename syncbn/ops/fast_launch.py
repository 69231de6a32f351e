"""Kernel launches, and the opt-in direct path that skips Triton's per-call launcher work.

Every launch of ``syncbn.ops.triton`` goes through ``launch``: all runtime arguments
positional, constexprs and launch options (``num_warps``) as keywords.

Why a direct path. Triton's launcher spends tens of microseconds of host time per call working
out the specialization of every argument and looking up the compiled kernel, which is most of
the layer's host time on small layers. With ``SYNCBN_TRITON_FAST_LAUNCH=1``, the compiled kernel
of a first, ordinary launch is kept on the launch plan, keyed by everything its specialization
can depend on besides the plan (the current device, the constexprs and options, each tensor's
dtype and 16-byte alignment; the plan fixes every integer argument), and later launches call its
launcher directly with the arguments in signature order, as Triton (3.3 and later) does itself.

This is the one module that reaches into Triton's internals (``CompiledKernel.run``,
``packed_metadata``, ``knobs.runtime`` launch hooks; checked against the Triton 3.6 and 3.9
sources). It stays out of the way whenever it cannot be sure: not while a launch hook is set
(a profiler attached: launches go through Triton and its hooks), not for the interpreter, not
before Triton 3.3, and not for a compiled kernel without the expected attributes.
"""

from __future__ import annotations

import torch
import triton

from .. import settings
from .launch_plan import Plan


def enabled() -> bool:
    """Whether ``SYNCBN_TRITON_FAST_LAUNCH=1`` asks for the direct path."""
    return settings.TRITON_FAST_LAUNCH.get()


def launch(plan: Plan | None, kernel, grid: int, args: tuple, consts: dict) -> None:
    """``kernel[(grid,)](*args, **consts)``, directly when the fast path allows (see above)."""
    if plan is None or not plan.cuda or not enabled():
        kernel[(grid,)](*args, **consts)
        return
    device = torch.cuda.current_device()
    alignment = [(a.dtype, a.data_ptr() % 16 == 0) for a in args if isinstance(a, torch.Tensor)]
    key = (kernel, device, *consts.values(), *alignment)
    hit = plan.launches.get(key)
    if hit is not None and no_launch_hooks():
        compiled, constexprs = hit
        stream = torch._C._cuda_getCurrentRawStream(device)
        # The launcher's own order: grid, stream, function, metadata, launch metadata and the two
        # launch hooks (none here), then every parameter.
        launcher_args = (grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None)
        compiled.run(*launcher_args, *args, *constexprs)
        return
    compiled = kernel[(grid,)](*args, **consts)
    constexprs = constexpr_tail(kernel, args, consts)
    if constexprs is not None and _directly_launchable(compiled):
        plan.launches[key] = (compiled, constexprs)


def constexpr_tail(kernel, args: tuple, consts: dict) -> tuple | None:
    """The values of ``kernel``'s parameters after ``args``, in signature order, or None."""
    names = getattr(kernel, "arg_names", None)
    if names is None or len(names) < len(args) or any(n not in consts for n in names[len(args) :]):
        return None
    return tuple(consts[n] for n in names[len(args) :])


def _no_hook(hook) -> bool:
    # None, or an empty HookChain (Triton 3.6 and 3.9, at least, keep a chain that is never None).
    return hook is None or getattr(hook, "calls", None) == []


def no_launch_hooks() -> bool:
    """True when no Triton launch hook is set (a fraction of a microsecond)."""
    try:
        knobs = triton.knobs.runtime
        return _no_hook(knobs.launch_enter_hook) and _no_hook(knobs.launch_exit_hook)
    except AttributeError:  # a Triton without knobs
        return False


def _triton_at_least(major: int, minor: int) -> bool:
    try:
        return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


# Since Triton 3.3 a compiled kernel's launcher takes every parameter, constexprs included, in
# signature order; before, only the runtime ones.
LAUNCHER_TAKES_ALL_PARAMS = _triton_at_least(3, 3)


def _directly_launchable(compiled) -> bool:
    """A compiled kernel whose launcher can be called as Triton's own launch path does."""
    if not LAUNCHER_TAKES_ALL_PARAMS:
        return False
    if not no_launch_hooks():
        return False
    try:
        if hasattr(compiled, "_init_handles"):
            compiled._init_handles()
        return all(getattr(compiled, a, None) is not None for a in ("run", "function", "packed_metadata"))
    except Exception:  # noqa: BLE001 - an unexpected Triton: keep the ordinary path
        return False
