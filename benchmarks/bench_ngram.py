"""Throughput of the exact n-gram cache: look-up (scoring) and ingest (update), orders 2-9,
65,536-token chunks, over >= 1M tokens of embedded-corpus text, on the CPU and on CUDA when present.

    python3 benchmarks/bench_ngram.py [--tokens 1048576]

The model side is replaced by random log-probabilities and entropies (the cache's cost does not depend
on them). Look-up = all orders' counts, pair counts and distinct-continuation counts + the Witten-Bell
mix; ingest = adding the chunk to both count tables. Also prints the projected n-gram share of the 600 s evaluation for the 62M-token validation
set on 8 GPUs (look-ups split over ranks, ingest repeated on every rank).
"""
import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

VAL_TOKENS_FULL = 62_021_846


def run(tokens: torch.Tensor, device: torch.device, hp: tg.Hyperparameters) -> dict:
    d = tg.Dist(device=device)
    tokens = tokens.to(device, dtype=torch.int64)
    cache = tg.NGramCache(hp.ngram_eval_min_order, hp.ngram_eval_order, hp.vocab_size)
    mixer = tg.LearnedMix(len(cache.orders), dataclasses.replace(hp, eval_learned_mix=False), d)
    gen = torch.Generator(device=device).manual_seed(0)
    C, N = hp.ttt_chunk_tokens, tokens.numel()
    t_lookup = t_update = 0.0
    for lo in range(1, N, C):
        pos = torch.arange(lo, min(lo + C, N), device=device)
        logp = -torch.rand(pos.numel(), generator=gen, device=device, dtype=torch.float64) * 5
        ent = torch.rand(pos.numel(), generator=gen, device=device, dtype=torch.float64) * 6
        tg.sync(d)
        t0 = time.perf_counter()
        stats = cache.stats(tokens, pos)
        mixed, alpha = mixer.mix(logp, ent, *stats)
        tg.sync(d)
        t1 = time.perf_counter()
        cache.update(tokens, pos)
        tg.sync(d)
        t_lookup += t1 - t0
        t_update += time.perf_counter() - t1
    used = (stats[0] > 0).any(0).float().mean().item()
    return dict(n=N - 1, lookup=t_lookup, update=t_update, entries=cache.entries(), mem=cache.memory_bytes(),
                runs=len(cache.runs) + len(cache.distinct_runs), hit=used)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1 << 20)
    args = ap.parse_args()
    corpus = ROOT / "data" / "embedded" / "sp1024"
    subprocess.run([sys.executable, str(ROOT / "tools" / "embedded_corpus.py"), "--out", str(corpus)], check=True)
    hp = tg.Hyperparameters(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"))
    tokens = tg.TokenStream(hp.data_path).take(args.tokens)
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        if device.type == "cuda":
            run(tokens[:200_000], device, hp)  # warm-up: CUDA context and kernels
        r = run(tokens, device, hp)
        both = r["lookup"] + r["update"]
        print(f"bench_ngram: device:{name} tokens:{r['n']} orders:{hp.ngram_eval_min_order}-{hp.ngram_eval_order} "
              f"chunk:{hp.ttt_chunk_tokens}")
        print(f"result: lookup {r['n'] / r['lookup'] / 1e6:.2f}M tok/s, ingest {r['n'] / r['update'] / 1e6:.2f}M tok/s, "
              f"ingest+score {r['n'] / both / 1e6:.2f}M tok/s; entries {r['entries']} in {r['runs']} runs, "
              f"{r['mem'] / 2**20:.1f} MiB; last chunk n-gram hit rate {r['hit']:.2f}")
        projected = VAL_TOKENS_FULL / r["n"] * (r["lookup"] / 8 + r["update"])
        print(f"projected n-gram time for {VAL_TOKENS_FULL / 1e6:.2f}M tokens on 8 ranks of this device: "
              f"{projected:.0f}s = {projected / 600 * 100:.1f}% of the 600 s eval (linear extrapolation; the cache "
              f"keeps growing, so later chunks cost somewhat more)")


if __name__ == "__main__":
    main()
