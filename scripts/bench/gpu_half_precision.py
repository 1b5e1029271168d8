"""How exact are the CUDA BN kernels on half-precision input? Kernel by kernel, against float64.

For the half-precision scenarios of ``syncbn.testing.scenarios.SCENARIOS`` (the same inputs the GPU
tests use), prints the largest error relative to the largest value, against the exact float64
result, of: ``batch_norm_update_stats`` (mean, biased variance); ``batch_norm_backward_reduce``
given the exact mean and inverse std (its sums and the weight/bias gradients, with a float32 and
with the scenario's weight dtype); ``nn.BatchNorm`` on CUDA and on CPU; then a one-rank
``SyncBatchNorm`` training step. Needs one CUDA GPU and torch only::

    python scripts/bench/gpu_half_precision.py  # results/gpu/half_precision.txt: an H200's output
"""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist

import syncbn
from syncbn.testing.scenarios import SCENARIOS, closed_form, global_batch

HALF_SCENARIOS = (
    "float16_input_float32_params",
    "bfloat16_input_float32_params_3d",
    "float16_params",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> str:
    """max |a - b| / max |b|, both in float64 on the CPU."""
    a, b = a.double().cpu(), b.double().cpu()
    return f"{((a - b).abs().max() / b.abs().max()).item():.2e}"


def kernels(dev: torch.device) -> None:
    for name in HALF_SCENARIOS:
        case = SCENARIOS[name]
        for step in range(2):
            x, dy = global_batch(case, step, 0, sum(case.batch_sizes))
            ref = closed_form(x, dy)
            mu, var, inv = ref["mean"], ref["var"], (ref["var"] + 1e-5).rsqrt()
            dw_exact, db_exact = ref["grad_weight"], ref["grad_bias"]
            xc, dyc = x.to(dev), dy.to(dev)
            m32, v32 = torch.batch_norm_update_stats(xc, None, None, 0.0)
            print(name, step, "update_stats mean", rel(m32, mu), "var", rel(v32, var))
            for wdt in (torch.float32, case.param_dtype):
                w = torch.ones(x.shape[1], device=dev, dtype=wdt)
                mean32, inv32 = mu.float().to(dev), inv.float().to(dev)
                out = torch.batch_norm_backward_reduce(dyc, xc, mean32, inv32, w, True, True, True)
                print(
                    f"  backward_reduce w={wdt}: sum_dy {rel(out[0], db_exact)} "
                    f"sum_dy_xmu {rel(out[1], dw_exact / inv)} gw {rel(out[2], dw_exact)} "
                    f"gb {rel(out[3], db_exact)} dtypes {[t.dtype for t in out]}"
                )
            bn = torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm3d
            ref = bn(x.shape[1]).to(dev)
            xg = xc.clone().requires_grad_()
            ref(xg).backward(dyc)
            print(
                f"  nn.BN cuda fp32 params: dw {rel(ref.weight.grad, dw_exact)} "
                f"db {rel(ref.bias.grad, db_exact)}"
            )
            cpu = bn(x.shape[1])
            xg = x.clone().requires_grad_()
            cpu(xg).backward(dy)
            print(
                f"  nn.BN cpu  fp32 params: dw {rel(cpu.weight.grad, dw_exact)} "
                f"db {rel(cpu.bias.grad, db_exact)}"
            )


def layer(dev: torch.device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/r", rank=0, world_size=1)
        try:
            for name in ("float16_input_float32_params", "float16_params"):
                case = SCENARIOS[name]
                x, dy = global_batch(case, 0, 0, sum(case.batch_sizes))
                ref = closed_form(x, dy)
                bn = syncbn.SyncBatchNorm(x.shape[1], device=dev, dtype=case.param_dtype)
                bn._always_sync = True
                xg = x.to(dev).requires_grad_()
                y = bn(xg)
                y.backward(dy.to(dev))
                print(
                    name,
                    "syncbn 1-rank gloo: dw",
                    rel(bn.weight.grad, ref["grad_weight"]),
                    "db",
                    rel(bn.bias.grad, ref["grad_bias"]),
                    "running_mean",
                    rel(bn.running_mean, 0.1 * ref["mean"]),
                    "y",
                    rel(y, ref["x_hat"]),
                )
        finally:
            dist.destroy_process_group()


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_half_precision.py expected a CUDA GPU (got none)")
    dev = torch.device("cuda", 0)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    kernels(dev)
    layer(dev)


if __name__ == "__main__":
    main()
