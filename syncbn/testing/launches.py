"""What one step issues besides the Triton kernels: the kernel launches by name, and every ATen
op outside them (``TorchDispatchMode``), so tests and benchmarks can count a layer's launches on
CPU, where the kernels run under Triton's interpreter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

KERNELS = ("_moments", "_normalize", "_backward_reduce", "_grad_input")
# Ops that launch nothing on a GPU: allocations (from the caching allocator) and views.
ALLOCATIONS_AND_VIEWS = frozenset(
    {
        "empty", "empty_like", "empty_strided", "view", "select", "slice", "unbind", "alias",
        "detach", "as_strided", "t", "expand", "unsqueeze", "squeeze",
    }
)  # fmt: skip


class _Ops(TorchDispatchMode):
    """The ATen ops dispatched while not paused, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class _Counted:
    """A Triton kernel whose launches are recorded (and ATen ops inside them not)."""

    def __init__(self, kernel, name: str, launches: list[str], mode: _Ops):
        self.kernel, self.name, self.launches, self.mode = kernel, name, launches, mode

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append(self.name)
            self.mode.paused = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.mode.paused = False

        return run


def launches_and_ops(step: Callable[[], object]) -> tuple[list[str], list[str]]:
    """Run ``step`` once; return the Triton kernels it launched and the other ATen ops it issued
    (allocations and views excluded: they launch nothing)."""
    from syncbn.kernels import triton_kernels

    mode = _Ops()
    launches: list[str] = []
    originals = {name: getattr(triton_kernels, name) for name in KERNELS}
    with contextlib.ExitStack() as stack:
        for name, kernel in originals.items():
            setattr(triton_kernels, name, _Counted(kernel, name, launches, mode))
            stack.callback(setattr, triton_kernels, name, kernel)
        with mode:
            step()
    return launches, [op for op in mode.ops if op not in ALLOCATIONS_AND_VIEWS]
