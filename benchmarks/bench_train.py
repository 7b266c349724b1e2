"""Training throughput of the submitted configuration: ms per micro-step, tokens/s, peak memory.

    python3 benchmarks/bench_train.py [--steps 20] [--sdpa default|no-math] [--qat]

On CUDA: the real configuration (11 x 512, 48 x 2048 tokens per micro-step = what each of 8 GPUs runs
per optimizer step; one optimizer step here = 8 micro-steps), compiled, bf16, with the full optimizer
step (Parallel Muon + AdamW) and EMA. On CPU: a REDUCED configuration (labelled in the output), eager.
Tokens are random ids: throughput does not depend on the text.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CPU_CONFIG = dict(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8, bigram_vocab_size=1024,
                  bigram_dim=64, ve_dim=64, xsa_last_n=2, train_seq_len=256, train_batch_tokens=8 * 4 * 256)


def synthetic_shards(n_tokens: int, vocab: int) -> str:
    out = Path(tempfile.mkdtemp())
    header = np.zeros(256, dtype="<i4")
    header[:3] = [tg.SHARD_MAGIC, tg.SHARD_VERSION, n_tokens]
    tokens = np.random.default_rng(0).integers(0, vocab, n_tokens).astype("<u2")
    for split in ("train", "val"):
        with open(out / f"fineweb_{split}_000000.bin", "wb") as f:
            f.write(header.tobytes() + tokens.tobytes())
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sdpa", choices=["default", "no-math"], default="default")
    ap.add_argument("--qat", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one optimizer step")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    d = tg.Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if args.sdpa == "no-math" and cuda:
        torch.backends.cuda.enable_math_sdp(False)
    cfg = {} if cuda else CPU_CONFIG
    probe = tg.Hyperparameters(**cfg)
    hp = tg.Hyperparameters(**cfg, data_path=synthetic_shards(probe.train_batch_tokens * 4 + 1, probe.vocab_size),
                            warmup_steps=2)
    label = torch.cuda.get_device_name(0) if cuda else "CPU (REDUCED configuration, not the submitted one)"
    print(f"bench_train: device:{label} sdpa:{args.sdpa} qat:{args.qat} layers:{hp.num_layers} dim:{hp.model_dim} "
          f"micro_batch:{hp.train_batch_tokens // 8} tokens ({hp.train_batch_tokens // 8 // hp.train_seq_len} x "
          f"{hp.train_seq_len}) torch:{torch.__version__}")
    torch.manual_seed(0)
    model = tg.GPT(hp).to(d.device)
    muon, adam, replicated = tg.build_optimizers(model, hp, d)
    step_fn = torch.compile(model, dynamic=False, fullgraph=tg._fa3_func is None) if cuda else model
    trainer = tg.Trainer(hp, d, model, step_fn, muon, adam, replicated)
    loader = tg.DistributedTokenLoader(hp.data_path, d, hp.vocab_size)
    counter = tg.BigramCounter(hp.vocab_size, hp.complement_alpha, d.device)
    averager = tg.WeightAverager(model, hp)
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.step(loader, counter, 1.0, 0.95, args.qat)
    tg.sync(d)
    print(f"compile_and_first_steps: {time.perf_counter() - t0:.1f}s")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = args.steps or (20 if cuda else 3)
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.step(loader, counter, 1.0, 0.95, args.qat)
        averager.update(i + 1, 1.0)
    tg.sync(d)
    dt = time.perf_counter() - t0
    micro = steps * 8
    print(f"result: {dt / micro * 1000:.1f} ms/micro-step (= ms/step-equivalent on 8 GPUs) "
          f"tokens/s:{steps * hp.train_batch_tokens / dt / 1e6:.3f}M "
          f"peak_mem:{torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.2f}GiB")
    if args.profile and cuda:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.step(loader, counter, 1.0, 0.95, args.qat)
            tg.sync(d)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
