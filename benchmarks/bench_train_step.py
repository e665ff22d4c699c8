"""Seconds per training step (forward + backward + AdamW) of a reconstructor's preset, and its parameter count.

    python benchmarks/bench_train_step.py --model ddim --size 256 --batch 16 --steps 3
    python benchmarks/bench_train_step.py --model vae --size 64 --batch 16 --steps 5

Random input in [0, 1]; the first step (allocation, kernel selection) is a warm-up and not counted; the median of
the rest is reported, with the peak resident memory of the process. CPU unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from factory.models import build_model, make_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--size", type=int, default=256, help="square input side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    overrides = {"image_size": arguments.size} if arguments.model == "vae" else {}
    torch.manual_seed(0)
    model = build_model(arguments.model, config=make_config(arguments.model, arguments.preset, overrides))
    model.to(arguments.device).train()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(arguments.batch, 3, arguments.size, arguments.size, device=arguments.device)
    times = []
    for _ in range(arguments.steps + 1):
        started = time.perf_counter()
        loss, _ = model.loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if arguments.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    step = statistics.median(times[1:])
    print(
        f"{arguments.model} {arguments.preset}: {parameters:,} parameters; {arguments.size}x{arguments.size}, "
        f"batch {arguments.batch}, {torch.get_num_threads()} threads: {step:.2f} s/step "
        f"({arguments.batch / step:.2f} images/s; steps {', '.join(f'{t:.2f}' for t in times)}), "
        f"peak RSS {peak_gib:.1f} GiB"
    )


if __name__ == "__main__":
    main()
