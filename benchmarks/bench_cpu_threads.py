"""CPU seconds per training step of run.sh's embedded shape, for one or more copies of train_gpt.py.

    git show 5633f8d:train_gpt.py > /tmp/old_train_gpt.py
    OMP_NUM_THREADS=1 python3 benchmarks/bench_cpu_threads.py /tmp/old_train_gpt.py train_gpt.py

Each script is imported as a library and runs Trainer.step (6 x 128 model, 16,384 tokens per step, eager)
once to warm up, then 3 timed steps on the embedded corpus (build it first with ./run.sh or
tools/embedded_corpus.py). The thread count is OMP_NUM_THREADS (default 1), set before anything runs, so
the numbers of one invocation are comparable with each other; compare across invocations only as ratios.
"""
import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(num_layers=6, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8, xsa_last_n=2,
              bigram_vocab_size=2048, bigram_dim=64, ve_dim=64, train_seq_len=256, train_batch_tokens=16384,
              warmup_steps=0)


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds_per_step(tg, data_path: str, steps: int = 3) -> float:
    hp = tg.Hyperparameters(**CONFIG, data_path=data_path)
    torch.manual_seed(0)
    d = tg.Dist()
    model = tg.GPT(hp)
    muon, adam, replicated = tg.build_optimizers(model, hp, d)
    trainer = tg.Trainer(hp, d, model, model, muon, adam, replicated)
    loader = tg.DistributedTokenLoader(data_path, d)
    counter = tg.BigramCounter(hp.vocab_size, hp.complement_alpha, d.device)
    trainer.step(loader, counter, 1.0, 0.95, False)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(loader, counter, 1.0, 0.95, False)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scripts", nargs="+", type=Path, help="copies of train_gpt.py to time")
    ap.add_argument("--data", default=str(ROOT / "data" / "embedded" / "sp1024" / "datasets" / "fineweb10B_sp1024"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for i, path in enumerate(args.scripts):
        s = seconds_per_step(load(path, f"script{i}"), args.data)
        print(f"{path}: {s:.2f} s/step (threads:{torch.get_num_threads()}, 6x128, 16384 tokens)", flush=True)


if __name__ == "__main__":
    main()
