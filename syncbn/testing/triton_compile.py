"""Compile the Triton kernels for a GPU on a machine without one (Triton's NVIDIA backend and its
ptxas are in the wheel): the check that the kernel code is valid for the compiler, not only for
the interpreter that runs it in CI. ``python -m syncbn.testing.triton_compile [arch]``.
"""

from __future__ import annotations

import sys

POINTER_TYPES = {
    "shift_copy_ptr": "*fp64", "part_mean_ptr": "*fp64", "part_count_ptr": "*i64",
    "counter_ptr": "*i32", "buffer_ptr": "*fp64", "num_batches_ptr": "*i64", "error_ptr": "*i64",
    "x_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16",
}  # fmt: skip
SCALAR_TYPES = {
    "eps": "fp32", "momentum": "fp32", "negative_slope": "fp32", "expected_signatures": "i64",
    "sxN": "i64",
}  # fmt: skip
FLAGS = {
    "HAS_SHIFT": True, "ADVANCE_NUM_BATCHES": True, "HAS_WEIGHT": True, "HAS_BIAS": True,
    "HAS_RUNNING": True, "MOMENTUM_FROM_COUNT": True, "WRITE_WEIGHT": True, "WRITE_BIAS": True,
    "ACTIVATION": 3,  # silu: the most code of the three
}  # fmt: skip


def compile_all(arch: int = 90) -> list[str]:
    """Every kernel, both tilings, bfloat16 input, to a cubin for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from syncbn.kernels import triton_kernels as tk

    done = []
    for rows_span_images in (False, True):
        blocks = (
            {"BLOCK_R": 64, "BLOCK_C": 32} if rows_span_images else {"BLOCK_R": 512, "BLOCK_C": 2}
        )
        flags = {**FLAGS, **blocks, "ROWS_SPAN_IMAGES": rows_span_images}
        for kernel in (tk._moments, tk._normalize, tk._backward_reduce, tk._grad_input):
            constexprs = {name: flags[name] for name in kernel.arg_names if name in flags}
            signature = {
                name: "constexpr" if name in constexprs
                else POINTER_TYPES.get(name, "*fp32") if name.endswith("_ptr")
                else SCALAR_TYPES.get(name, "i32")
                for name in kernel.arg_names
            }  # fmt: skip
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
            assert compiled.asm["cubin"], kernel.__name__
            done.append(f"{kernel.__name__} (rows_span_images={rows_span_images})")
    return done


if __name__ == "__main__":
    for line in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print("compiled", line)
