"""Does a CPU run share the cores without thrashing? The same short training run on idle cores
and beside one busy process (a pure-Python loop on one core); the bar: the loaded run takes at
most 2.5 x the idle one (fair sharing of 2 cores with one busy process gives 2 x).

    python benchmarks/cpu_sharing.py [--steps 30]

Run it with nothing else on the machine. Each measurement is a fresh process that trains
unet_small on 64-px batches of 8 for --steps steps through the project's own CPU settings
(prostate_seg.config: configure_cpu_threads and openmp_yields), after 3 warm-up
steps; the time is the median of 3 such processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time
from prostate_seg.config import configure_cpu_threads, openmp_yields
openmp_yields()
import torch
threads = configure_cpu_threads(workers=0)
from prostate_seg.models import UNet
torch.manual_seed(0)
net = UNet(1, 1, [16, 32, 64, 128])
opt = torch.optim.Adam(net.parameters(), 1e-3)
x = torch.randn(8, 1, 64, 64)
y = (torch.rand(8, 1, 64, 64) > 0.5).float()
loss = torch.nn.BCEWithLogitsLoss()
def step():
    opt.zero_grad()
    loss(net(x), y).backward()
    opt.step()
for _ in range(3):
    step()
started = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(time.perf_counter() - started, torch.get_num_threads())
"""


def busy() -> None:
    while True:
        pass


def measure(steps: int) -> tuple[float, int]:
    times, threads = [], 0
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], capture_output=True,
                             text=True, check=True, env={**os.environ}).stdout.split()
        times.append(float(out[0]))
        threads = int(out[1])
    return statistics.median(times), threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    idle, threads = measure(args.steps)
    hog = multiprocessing.Process(target=busy, daemon=True)
    hog.start()
    time.sleep(1.0)
    try:
        loaded, _ = measure(args.steps)
    finally:
        hog.terminate()
    ratio = loaded / idle
    print(f"{len(os.sched_getaffinity(0))} cores, {threads} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(set by the project)')}")
    print(f"idle: {idle / args.steps * 1000:.0f} ms/step; beside one busy process: "
          f"{loaded / args.steps * 1000:.0f} ms/step; ratio {ratio:.2f} (bar: <= 2.5)")
    return 0 if ratio <= 2.5 else 1


if __name__ == "__main__":
    sys.exit(main())
