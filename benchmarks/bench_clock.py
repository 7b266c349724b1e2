"""The training loop's stop clock on CUDA: SharedClock posts/reads must not stall the GPU queue.

    python3 benchmarks/bench_clock.py

Queues N steps of matmul work, posting the host clock after each (as train_model does), and reports the
host syncs that torch's sync-debug mode saw in post/read, and the time of the loop with and without the
clock (the GPU stays busy if the clock adds nothing)."""
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def work(x):
    for _ in range(20):
        x = torch.tanh(x @ x) * 0.5
    return x


def loop(n: int, clock) -> float:
    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(n):
        x = work(x)
        if clock is not None:
            clock.post([time.perf_counter() - t0, 0.0, float(step + 1)])
            clock.read()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_clock: no CUDA; nothing to measure")
        return
    d = tg.Dist(device=torch.device("cuda", 0))
    loop(5, tg.SharedClock(d))  # warm-up
    plain = loop(50, None)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clocked = loop(50, tg.SharedClock(d))
    torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    print(f"bench_clock: device:{torch.cuda.get_device_name(0)} 50 steps plain:{plain:.3f}s "
          f"with_shared_clock:{clocked:.3f}s ratio:{clocked / plain:.3f} sync_debug_warnings:{syncs}")


if __name__ == "__main__":
    main()
