"""GPU benchmark: syncbn vs torch.nn.SyncBatchNorm's autograd function vs cuDNN BatchNorm2d.

Side by side in one run, on one GPU, in a one-rank NCCL group with the synchronized path forced
(at world size 1 a SyncBN layer otherwise skips its collectives):

1. **Per layer**, on ResNet-50's BN shapes, in float32 NCHW and in bfloat16 channels_last (float32
   parameters): forward+backward time of ``syncbn.SyncBatchNorm``, of
   ``torch.nn.modules._functions.SyncBatchNorm`` (torch's SyncBN autograd function) on the same
   group, and of cuDNN ``nn.BatchNorm2d``; plus our two collectives alone, so that the layer's
   own cost (``syncbn - collectives``) can be set against cuDNN's. CUDA events, median of
   ``--iters`` after ``--warmup``.
2. **Launches per layer**: CUDA kernels (``torch.profiler``, CUDA activity) and top-level ATen
   ops of one forward+backward, for each variant.
3. **A ResNet-50 training step** (torchvision, batch ``--batch`` on one GPU, SGD) with each
   norm, eager and captured in a CUDA graph.

Writes ``results/gpu/bench_gpu.json`` and prints a table. Needs torch with CUDA (torchvision for
part 3; without it part 3 is skipped and says so). ``--smoke`` runs a few iterations of small
shapes on CPU through the stand-in CUDA kernels (gloo), to check the script itself::

    python scripts/bench/bench_gpu.py                 # on a GPU machine (scripts/gpu_check.sh)
    python scripts/bench/bench_gpu.py --smoke --out /tmp/bench_gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn import kernels as sbkernels
from syncbn.testing import cuda_standin
from syncbn.testing.bench import machine, top_level_ops, torch_syncbn_class, use_standin_kernels

RESNET50_SHAPES = [
    (32, 64, 112, 112),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
]
SMOKE_SHAPES = [(4, 8, 6, 6), (2, 16, 3, 3)]
CONFIGS = {  # name: (input dtype, memory format)
    "float32 NCHW": (torch.float32, torch.contiguous_format),
    "bfloat16 channels_last": (torch.bfloat16, torch.channels_last),
}


def ours(channels: int, device) -> nn.Module:
    layer = syncbn.SyncBatchNorm(channels, device=device)
    layer._always_sync = True
    return layer


class KernelSet(nn.Module):
    """``module`` run with one of syncbn's kernel sets (``SYNCBN_KERNELS``): ``triton`` (the
    default on CUDA), ``aten`` (PyTorch's fused CUDA kernels, per-channel steps op by op) or
    ``aten_compiled_steps`` (those steps compiled, ``SYNCBN_FUSE_STEPS=1``)."""

    def __init__(self, module: nn.Module, kernel_set: str):
        super().__init__()
        self.module, self.kernel_set = module, kernel_set

    def forward(self, *args):
        # the backward reuses the kernel set its forward picked
        name = "triton" if self.kernel_set == "triton" else "aten"
        with cuda_standin.path(name), sbkernels.fused_steps(self.kernel_set.endswith("steps")):
            return self.module(*args)


VARIANTS = {
    "syncbn": lambda c, device: KernelSet(ours(c, device), "triton"),
    "syncbn_aten": lambda c, device: KernelSet(ours(c, device), "aten"),
    "syncbn_compiled_steps": lambda c, device: KernelSet(ours(c, device), "aten_compiled_steps"),
    "torch_syncbn": lambda c, device: torch_syncbn_class()(c, device=device),
    "cudnn_bn": lambda c, device: nn.BatchNorm2d(c, device=device),
}


# --------------------------------------------------------------------------- timing


class Timer:
    """Median milliseconds of ``fn`` over ``iters`` calls after ``warmup``: CUDA events on a
    GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device, iters: int, warmup: int):
        self.cuda = device.type == "cuda"
        self.iters, self.warmup = iters, warmup

    def __call__(self, fn) -> float:
        times = []
        for i in range(self.warmup + self.iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                started = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - started) * 1e3
            if i >= self.warmup:
                times.append(elapsed)
        return statistics.median(times)


def kernel_launches(fn, device: torch.device) -> int | None:
    """CUDA kernels launched by ``fn`` (memcpy/memset excluded); None on CPU."""
    if device.type != "cuda":
        return None
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        torch.cuda.synchronize()
    kernels = [
        e
        for e in profile.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.lower().startswith(("memcpy", "memset"))
    ]
    return len(kernels)


# --------------------------------------------------------------------------- per layer


def per_layer(args, device, timer) -> list[dict]:
    rows = []
    shapes = SMOKE_SHAPES if args.smoke else RESNET50_SHAPES
    for config, (dtype, memory_format) in CONFIGS.items():
        for shape in shapes:
            channels = shape[1]
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(
                memory_format=memory_format
            )
            x.requires_grad_()
            dy = torch.randn_like(x)
            row = {"config": config, "shape": list(shape)}
            for name, build in VARIANTS.items():
                layer = build(channels, device)

                def step(layer=layer, x=x, dy=dy):
                    x.grad = None
                    layer.zero_grad(set_to_none=True)
                    layer(x).backward(dy)

                row[f"{name}_ms"] = timer(step)
                row[f"{name}_kernels"] = kernel_launches(step, device)
                row[f"{name}_ops"] = len(top_level_ops(step))
            forward_buffer = torch.zeros(2 * channels + 2, dtype=torch.float64, device=device)
            backward_buffer = torch.zeros(2 * channels, dtype=torch.float32, device=device)
            row["collectives_ms"] = timer(
                lambda f=forward_buffer, b=backward_buffer: (dist.all_reduce(f), dist.all_reduce(b))
            )
            own = row["syncbn_ms"] - row["collectives_ms"]
            row["syncbn_own_ms"] = own
            row["syncbn_own_over_cudnn"] = own / row["cudnn_bn_ms"]
            row["syncbn_over_torch_syncbn"] = row["syncbn_ms"] / row["torch_syncbn_ms"]
            row["compiled_steps_over_syncbn"] = row["syncbn_compiled_steps_ms"] / row["syncbn_ms"]
            row["syncbn_over_cudnn"] = row["syncbn_ms"] / row["cudnn_bn_ms"]
            row["syncbn_over_aten"] = row["syncbn_ms"] / row["syncbn_aten_ms"]
            row["syncbn_gpu_us"] = gpu_kernel_time_us(
                step_of(VARIANTS["syncbn"](channels, device), x, dy), device
            )
            row["eight_passes_us"] = 8 * x.numel() * x.element_size() / bandwidth(device) * 1e6
            rows.append(row)
            print(format_layer_row(row), flush=True)
    return rows


def format_layer_row(row: dict) -> str:
    return (
        f"| {row['config']} | {tuple(row['shape'])} | {row['syncbn_ms']:.3f} "
        f"| {row['collectives_ms']:.3f} | {row['syncbn_own_ms']:.3f} "
        f"| {row['torch_syncbn_ms']:.3f} "
        f"| {row['cudnn_bn_ms']:.3f} | {row['syncbn_own_over_cudnn']:.2f} "
        f"| {row['syncbn_over_torch_syncbn']:.2f} | {row['syncbn_compiled_steps_ms']:.3f} "
        f"| {row['syncbn_aten_ms']:.3f} | {row['syncbn_over_cudnn']:.2f} "
        f"| {row['syncbn_gpu_us']} | {row['eight_passes_us']:.1f} "
        f"| {row['syncbn_kernels']} / {row['syncbn_aten_kernels']} / "
        f"{row['syncbn_compiled_steps_kernels']} / "
        f"{row['torch_syncbn_kernels']} / {row['cudnn_bn_kernels']} "
        f"| {row['syncbn_ops']} / {row['syncbn_compiled_steps_ops']} / {row['torch_syncbn_ops']} / "
        f"{row['cudnn_bn_ops']} |"
    )


LAYER_HEADER = (
    "| config | shape | syncbn, Triton (ms) | its 2 collectives | syncbn without them "
    "| torch SyncBN fn | cuDNN BN | own/cuDNN | syncbn/torch | syncbn, ATen steps compiled (ms) "
    "| syncbn, ATen (ms) | syncbn/cuDNN | Triton GPU time (us) | 8 passes at bandwidth (us) "
    "| CUDA kernels Triton/ATen/compiled steps/torch/cuDNN "
    "| ops syncbn/compiled steps/torch/cuDNN |"
    "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


# --------------------------------------------------------------------------- training step


def build_model(args, norm: str, device) -> nn.Module | None:
    if args.smoke:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
    else:
        try:
            import torchvision
        except ImportError:
            return None
        model = torchvision.models.resnet50(num_classes=1000)
    if norm.startswith("syncbn"):
        model = syncbn.convert_sync_batchnorm(model)
        for layer in model.modules():
            if isinstance(layer, syncbn.SyncBatchNorm):
                layer._always_sync = True
        kernel_set = {"syncbn": "triton", "syncbn_aten": "aten"}.get(norm, "aten_compiled_steps")
        model = KernelSet(model, kernel_set)
    elif norm == "torch_syncbn":
        model = _swap_batchnorms(model, torch_syncbn_class())
    return model.to(device=device, memory_format=torch.channels_last)


def _swap_batchnorms(module: nn.Module, cls) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = cls(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            _swap_batchnorms(child, cls)
    return module


def training_steps(args, device, timer) -> list[dict] | str:
    """A ResNet-50 training step (SGD, channels_last) per norm, in bf16 autocast and in fp32:
    eager, replayed as a CUDA graph and (``--compile-model``) under ``torch.compile``."""
    size = 32 if args.smoke else 224
    batch = 4 if args.smoke else args.batch
    rows = []
    precisions = ("bf16", "fp32") if device.type == "cuda" else ("fp32",)
    for precision in precisions:
        for norm in ("cudnn_bn", "syncbn", "syncbn_aten", "syncbn_compiled_steps", "torch_syncbn"):
            model = build_model(args, norm, device)
            if model is None:
                return "skipped: torchvision is not installed"
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(batch, 3, size, size, device=device).contiguous(
                memory_format=torch.channels_last
            )
            target = torch.randint(0, 10, (batch,), device=device)
            amp = precision == "bf16"

            def step(model=model, optimizer=optimizer, x=x, target=target, amp=amp):
                optimizer.zero_grad(set_to_none=False)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = nn.functional.cross_entropy(model(x), target)
                loss.backward()
                optimizer.step()

            row = {"norm": norm, "precision": precision, "batch": batch, "image_size": size}
            row["eager_ms"] = timer(step)
            row["graphed_ms"] = graphed(step, timer) if device.type == "cuda" else None
            if args.compile_model and norm in ("cudnn_bn", "syncbn", "torch_syncbn"):
                row["compiled_ms"] = compiled_model_step(model, optimizer, x, target, amp, timer)
            if args.compile_model and norm == "syncbn":  # the Triton kernels as custom ops
                os.environ["SYNCBN_COMPILE_KERNELS"] = "triton"
                torch._dynamo.reset()
                try:
                    row["compiled_triton_ms"] = compiled_model_step(
                        model, optimizer, x, target, amp, timer
                    )
                finally:
                    os.environ.pop("SYNCBN_COMPILE_KERNELS", None)
                    torch._dynamo.reset()
            rows.append(row)
            graph = row["graphed_ms"]  # None on CPU, a message when capture failed
            print(
                f"| {precision} | {norm} | {row['eager_ms']:.2f} | "
                f"{f'{graph:.2f}' if isinstance(graph, float) else graph} "
                f"| {row.get('compiled_ms')} | {row.get('compiled_triton_ms')} |",
                flush=True,
            )
    return rows


def compiled_model_step(model, optimizer, x, target, amp, timer) -> float | str:
    """The step with ``torch.compile(model)``: syncbn's portable ops, fused by inductor, or with
    ``SYNCBN_COMPILE_KERNELS=triton`` its Triton kernels as custom ops."""
    try:
        compiled = torch.compile(model)

        def step():
            optimizer.zero_grad(set_to_none=False)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = nn.functional.cross_entropy(compiled(x), target)
            loss.backward()
            optimizer.step()

        for _ in range(3):  # compile
            step()
        return timer(step)
    except Exception as error:  # report, keep the rest of the benchmark
        return f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def step_of(layer, x, dy):
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    return step


def gpu_kernel_time_us(fn, device) -> float | None:
    """Microseconds the GPU spends in kernels for one call of ``fn`` (profiler), after a warm-up."""
    if device.type != "cuda":
        return None
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        torch.cuda.synchronize()
    total = sum(
        e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        for e in profile.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    return round(total, 1)


def bandwidth(device) -> float:
    """Bytes per second of the GPU's memory, from its properties (a CPU smoke run: 1e11)."""
    if device.type != "cuda":
        return 1e11
    props = torch.cuda.get_device_properties(device)
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    width = getattr(props, "memory_bus_width", 0)  # bits
    if clock and width:
        return 2 * clock * 1e3 * width / 8
    return {"H100": 3.35e12, "H200": 4.8e12}.get(
        next((k for k in ("H200", "H100") if k in props.name), ""), 3e12
    )


def graphed(step, timer) -> float | str:
    """Time ``step`` captured whole (forward, backward, optimizer) in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as error:
        return f"capture failed: {str(error).splitlines()[0]}"
    return timer(graph.replay)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="ResNet-50 step batch")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (stand-in kernels)")
    parser.add_argument(
        "--compile-model", action="store_true", help="also time the step under torch.compile"
    )
    parser.add_argument("--skip-model", action="store_true", help="per-layer results only")
    parser.add_argument("--out", default="results/gpu/bench_gpu.json")
    args = parser.parse_args()

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels on CPU tensors
        device, backend = torch.device("cpu"), "gloo"
        args.iters, args.warmup = 3, 1
        use_standin_kernels()
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py expected a CUDA GPU (got none); use --smoke to check the script")
    else:
        device, backend = torch.device("cuda", 0), "nccl"
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            backend,
            init_method=f"file://{tmp}/rdzv",
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=120),
            **({"device_id": device} if backend == "nccl" else {}),
        )
        try:
            timer = Timer(device, args.iters, args.warmup)
            started = time.perf_counter()
            print(LAYER_HEADER)
            layers = per_layer(args, device, timer)
            print("\n| ResNet-50 step, norm | eager (ms) | CUDA graph (ms) |\n|---|---|---|")
            steps = (
                "skipped (--skip-model)" if args.skip_model else training_steps(args, device, timer)
            )
            if isinstance(steps, str):
                print(steps)
            report = {
                **machine(device.type, 1),
                "backend": backend,
                "iters": args.iters,
                "unit": "milliseconds per forward+backward (median, CUDA events)",
                "layers": layers,
                "resnet50_step": steps,
                # syncbn_compiled_steps: did each step run compiled (else: why it fell back)?
                "steps_compiled": {
                    fn.__name__: step.failure or True
                    for fn, step in sbkernels.aten._COMPILED.items()
                },
                "wall_time_s": time.perf_counter() - started,
            }
            print("per-channel steps compiled:", report["steps_compiled"])
        finally:
            dist.destroy_process_group()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({report['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
