"""Time of one training step of the U-Net alone, by norm layer, width, memory layout and
precision.

    python benchmarks/step_time.py                      # GPU: 256 px, batch 16, bf16
    python benchmarks/step_time.py --compile --widths 32-256   # the compiled model
    python benchmarks/step_time.py --size 64 --steps 3  # CPU: a quick check that it runs
    python benchmarks/step_time.py --size 128 --widths 16-128 --channels 3 --norms instance \
        --precisions fp32,bf16 --warmup 3 --steps 10    # CPU: experiment=cpu's step, both ways

Forward, BCE-with-logits, backward and an Adam step (fused on a GPU) on one batch kept on the
device; the median of --steps timed steps after warm-up. It answers what instance norm (each
slice's own statistics, docs/RESULTS.md) costs against batch norm at the study's settings, and
what bf16 autocast saves on a CPU that has bf16 arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prostate_seg.models import UNet  # noqa: E402

WIDTHS = {"16-128": [16, 32, 64, 128], "32-256": [32, 64, 128, 256],
          "64-512": [64, 128, 256, 512]}


def step_ms(norm: str, features: list[int], channels_last: bool, bf16: bool,
            args: argparse.Namespace) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = UNet(args.channels, 1, features, norm).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    if args.compile:
        model = torch.compile(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    x = x.to(memory_format=layout)
    y = (torch.rand_like(x[:, :1]) > 0.9).float()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--widths", default="32-256,64-512", help="of: " + ", ".join(WIDTHS))
    parser.add_argument("--channels", type=int, default=1, help="input channels (2.5D: 3)")
    parser.add_argument("--norms", default="batch,instance")
    parser.add_argument("--precisions", default="bf16", help="bf16 autocast, fp32, or both")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, {args.size} px, batch {args.batch}, "
          f"{args.channels} input channel(s)" + (", torch.compile" if args.compile else ""))
    print(f"{'width':>7} {'norm':>9} {'layout':>14} {'precision':>9} {'ms/step':>8} "
          f"{'images/s':>9}")
    for width in args.widths.split(","):
        for norm in args.norms.split(","):
            for channels_last in (True, False):
                for precision in args.precisions.split(","):
                    ms = step_ms(norm, WIDTHS[width], channels_last, precision == "bf16", args)
                    layout = "channels_last" if channels_last else "NCHW"
                    print(f"{width:>7} {norm:>9} {layout:>14} {precision:>9} {ms:>8.1f} "
                          f"{args.batch / ms * 1000:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
