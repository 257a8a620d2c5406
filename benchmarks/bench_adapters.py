"""Adapter benchmark: training-step time and memory per method, SVD init, merged inference.

Run: ``python benchmarks/bench_adapters.py`` (quick: 3 interleaved repeats) or ``--full`` (7).
Every ratio is against a baseline measured in the same run; configurations are interleaved
(round-robin) and the median of the repeats is reported, because the machine is shared.

Memory is measured as the bytes of activations autograd saves for backward during one training
step (``torch.autograd.graph.saved_tensors_hooks``, unique storages, the model's own parameters
and buffers left out): the part of peak training memory that depends on the method. The adapters' own extra
parameter+buffer bytes (e.g. SALT's SVD factors) are listed separately.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

import pathopeft.adapters as pa

TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"
ALL_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def saved_bytes(model: nn.Module, step: Callable[[], None]) -> int:
    """Bytes of the unique activations autograd saves for backward while ``step`` runs.

    Storages of the model's own parameters and buffers are left out (they exist anyway).
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def adapter_extra_bytes(model: nn.Module) -> int:
    return sum(
        t.numel() * t.element_size()
        for _, layer in pa.adapted_layers(model)
        for t in [*layer.adapters.parameters(), *layer.adapters.buffers()]
    )


def build_configs(base: nn.Module) -> dict[str, nn.Module]:
    import peft  # test/bench-only reference

    def adapted(method: str, fold_mode: str = "auto", **options) -> nn.Module:
        model = copy.deepcopy(base)
        pa.attach(model, method, targets=TARGETS, **options)
        for _, layer in pa.adapted_layers(model):
            layer.fold_mode = fold_mode
        return model

    full = copy.deepcopy(base)
    head_only = copy.deepcopy(base)
    for name, p in head_only.named_parameters():
        p.requires_grad_(name.startswith("head."))
    configs = {
        "full fine-tune": full,
        "frozen base, head-only step": head_only,
        "LoRA r=8": adapted("lora", rank=8),
        "LoRA r=1": adapted("lora", rank=1),
        "SALT ratio=0.1 k=12": adapted("salt", ratio=0.1, lora_rank=12),
        "SALT residual form (fold off)": adapted("salt", "never", ratio=0.1, lora_rank=12),
        "SVFit energy=0.99": adapted("svfit", energy=0.99),
        "SVFit residual form (fold off)": adapted("svfit", "never", energy=0.99),
        "WaRA r=4 haar": adapted("wara", rank=4),
        "OWLoRA r=8": adapted("owlora", rank=8, protect_base=False),
        "PEFT LoRA r=8": peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS)
        ),
    }
    return configs


MATCHED = {  # which of our LoRA runs has the closest trainable budget
    "SALT ratio=0.1 k=12": "LoRA r=8",
    "SVFit energy=0.99": "LoRA r=1",
    "SALT residual form (fold off)": "LoRA r=8",
    "SVFit residual form (fold off)": "LoRA r=1",
    "WaRA r=4 haar": "LoRA r=8",
    "OWLoRA r=8": "LoRA r=8",
    "LoRA r=8": "PEFT LoRA r=8",
}


def measure(
    steps: dict[str, Callable[[], None]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Round-robin timing: wall-clock and process CPU seconds per call, ``repeats`` times each.

    With one torch thread, CPU time is what the step itself costs, whatever else the shared
    machine runs; wall time is reported next to it.
    """
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return wall, cpu


def bench_steps(repeats: int, batch: int, size: int) -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=size, num_classes=10)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    configs = build_configs(base)
    steps = {name: make_step(model, x, y) for name, model in configs.items()}
    frozen = copy.deepcopy(base).eval()

    def frozen_forward() -> None:
        with torch.no_grad():
            frozen(x)

    steps["frozen base (forward only)"] = frozen_forward
    for step in steps.values():  # warm-up
        step()
    wall, cpu = measure(steps, repeats)
    med = {name: statistics.median(values) for name, values in cpu.items()}
    med_wall = {name: statistics.median(values) for name, values in wall.items()}
    memory = {name: saved_bytes(configs[name], steps[name]) for name in configs}
    print(
        f"\n## ViT-S/16 training step, batch {batch}, {size}px, CPU ({torch.get_num_threads()} threads), "
        f"median of {repeats} interleaved repeats; ratios on process CPU time"
    )
    print(
        "| configuration | trainable | CPU s | wall s | vs full FT | vs matched | saved for backward MiB "
        "| adapter extra MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in steps:
        model = configs.get(name)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else 0
        matched = MATCHED.get(name)
        vs_matched = f"{med[name] / med[matched]:.2f}× {matched}" if matched else ""
        mem = f"{memory[name] / 2**20:.0f}" if name in memory else ""
        extra = (
            f"{adapter_extra_bytes(model) / 2**20:.1f}" if model is not None and "PEFT" not in name else ""
        )
        print(
            f"| {name} | {trainable:,} | {med[name]:.3f} | {med_wall[name]:.3f} "
            f"| {med[name] / med['full fine-tune']:.2f}× "
            f"| {vs_matched} | {mem} | {extra} |"
        )


def decaying_spectrum(model: nn.Module, targets: str, decay: float = 30.0) -> None:
    """Give every targeted weight a pretrained-like spectrum: s_i = s_0 · exp(−i·decay/R) (random bases)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and re.fullmatch(targets, name):
                m, n = module.weight.shape
                big_r = min(m, n)
                u, _ = torch.linalg.qr(torch.randn(m, big_r, generator=g))
                v, _ = torch.linalg.qr(torch.randn(n, big_r, generator=g))
                s = torch.exp(-torch.arange(big_r) * decay / big_r)
                module.weight.copy_((u * s) @ v.T)


def bench_vit_b_decaying(repeats: int, batch: int, size: int) -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, num_classes=10)
    decaying_spectrum(base, TARGETS)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    models = {}
    for label, method, options in (
        ("LoRA r=1", "lora", {"rank": 1}),
        ("LoRA r=8", "lora", {"rank": 8}),
        ("SVFit energy=0.99", "svfit", {"energy": 0.99}),
        ("SALT ratio=0.1 k=12", "salt", {"ratio": 0.1, "lora_rank": 12}),
    ):
        models[label] = copy.deepcopy(base)
        pa.attach(models[label], method, targets=TARGETS, **options)
    ranks = [a.rank for _, _, a in pa.adapter_modules(models["SVFit energy=0.99"], "default")]
    steps = {name: make_step(model, x, y) for name, model in models.items()}
    for step in steps.values():
        step()
    _, cpu = measure(steps, repeats)
    med = {name: statistics.median(values) for name, values in cpu.items()}
    print(
        f"\n## ViT-B/16, decaying spectrum (s_i = exp(-30 i / R)), batch {batch}, {size}px, CPU, "
        f"median of {repeats} interleaved repeats; SVFit keeps r = {min(ranks)}–{max(ranks)} of 768 "
        f"(fold threshold on qkv: r > {2304 * 768 // (2 * (2304 + 768))})"
    )
    print("| configuration | trainable | CPU s | vs LoRA r=1 | vs LoRA r=8 |")
    print("|---|---:|---:|---:|---:|")
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"| {name} | {trainable:,} | {med[name]:.3f} | {med[name] / med['LoRA r=1']:.2f}× "
            f"| {med[name] / med['LoRA r=8']:.2f}× |"
        )


def bench_merged_inference(repeats: int, batch: int, size: int) -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=size).eval()
    merged = copy.deepcopy(base)
    pa.attach(merged, "salt", targets=ALL_LINEARS, ratio=0.1, lora_rank=8)
    pa.attach(merged, "lora", targets=ALL_LINEARS, name="lora", rank=8)
    pa.merge(merged)
    x = torch.randn(batch, 3, size, size)

    def run(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                model(x)

        return call

    steps = {"base": run(base), "merged": run(merged)}
    for step in steps.values():
        step()
    wall, cpu = measure(steps, repeats)
    b, m = statistics.median(cpu["base"]), statistics.median(cpu["merged"])
    bw, mw = statistics.median(wall["base"]), statistics.median(wall["merged"])
    print(
        f"\n## Merged inference (ViT-S, SALT+LoRA merged into all 48 linears, batch {batch}, {size}px, "
        f"median of {repeats})"
    )
    print(
        f"CPU: base {b:.3f} s, merged {m:.3f} s, ratio {m / b:.3f}×; "
        f"wall: {bw:.3f} vs {mw:.3f} s ({mw / bw:.3f}×)"
    )


def bench_svd_init() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    for method, options in (("salt", {"ratio": 0.1, "lora_rank": 8}), ("svfit", {})):
        copy_ = copy.deepcopy(model)
        start, start_cpu = time.perf_counter(), time.process_time()
        names = pa.attach(copy_, method, targets=ALL_LINEARS, **options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        print(
            f"\n## SVD initialisation, ViT-B/16 ({len(names)} layers: qkv/proj/fc1/fc2 of all blocks), "
            f"{method}, {torch.get_num_threads()} threads: {seconds:.1f} s wall (target < 30 s), "
            f"{cpu_seconds:.1f} s CPU"
        )


def bench_import_memory() -> None:
    code = "import resource, {mod}; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    rss = {}
    for mod in ("torch", "pathopeft.adapters", "peft"):
        out = subprocess.run(
            [sys.executable, "-c", code.format(mod=mod)], capture_output=True, text=True, check=True
        )
        rss[mod] = int(out.stdout.strip()) / 1024
    print("\n## Import cost (peak RSS of a fresh interpreter)")
    for mod, mib in rss.items():
        print(
            f"import {mod}: {mib:.0f} MiB"
            + (f" (+{mib - rss['torch']:.0f} over torch)" if mod != "torch" else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="7 repeats instead of 3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the step/inference timings (1: stable on a shared machine)",
    )
    parser.add_argument("--svd-threads", type=int, default=2, help="torch threads for the SVD init timing")
    parser.add_argument("--skip-svd", action="store_true")
    args = parser.parse_args()
    repeats = 7 if args.full else 3
    bench_import_memory()
    torch.set_num_threads(args.threads)
    bench_steps(repeats, args.batch, args.size)
    bench_vit_b_decaying(repeats, args.batch, args.size)
    bench_merged_inference(3 * repeats, args.batch, args.size)
    if not args.skip_svd:
        torch.set_num_threads(args.svd_threads)
        bench_svd_init()


if __name__ == "__main__":
    main()
