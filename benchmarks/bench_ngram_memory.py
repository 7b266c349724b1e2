"""Memory of the exact n-gram cache at the full validation size (62,021,846 tokens), per rank.

    python3 benchmarks/bench_ngram_memory.py [--tokens 62021846] [--chunk 65536]

Every rank ingests every scored token (look-ups are split over ranks, the cache is not), so one process
building the whole cache measures one rank. The text: the embedded corpus's streams (train, val, heldout2 of
data/embedded/sp1024) concatenated, repeated up to --tokens with every repetition's tokens relabelled by a fresh
random permutation of the vocabulary: each copy has the corpus's own repetition structure but shares no n-gram
with the other copies, which is pessimistic (more distinct keys than a text whose later documents repeat
earlier ones' phrases). Reports after each tenth of the text and at the end: the cache's own bytes
(NGramCache.memory_bytes: sorted keys and prefix sums, both tables) and the process's peak resident memory
(ru_maxrss: everything, including the merge transients of add_run, which concatenate and sort two runs).
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

CORPUS = ROOT / "data" / "embedded" / "sp1024" / "datasets" / "fineweb10B_sp1024"
VAL_TOKENS_FULL = 62_021_846


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def text(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    base = torch.cat([tg.load_data_shard(p) for p in sorted(CORPUS.glob("fineweb_*.bin"))]).long()
    gen, parts, have = torch.Generator().manual_seed(seed), [], 0
    while have < n:
        perm = torch.randperm(vocab, generator=gen) if parts else torch.arange(vocab)
        parts.append(perm[base[: n - have]])
        have += parts[-1].numel()
    return torch.cat(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=VAL_TOKENS_FULL)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hp = tg.Hyperparameters()
    tokens = text(args.tokens, hp.vocab_size)
    base_rss = peak_rss_gib()
    print(f"bench_ngram_memory: {args.tokens:,} tokens, orders {hp.ngram_eval_min_order}-{hp.ngram_eval_order}, "
          f"vocab {hp.vocab_size}, chunk {args.chunk}, CPU {args.threads} threads; peak RSS before the cache "
          f"{base_rss:.2f} GiB (Python, torch, the text)")
    cache = tg.NGramCache(hp.ngram_eval_min_order, hp.ngram_eval_order, hp.vocab_size)
    t0, marks = time.time(), {round(args.tokens * k / 10) for k in range(1, 11)}
    for lo in range(0, args.tokens, args.chunk):
        hi = min(lo + args.chunk, args.tokens)
        cache.update(tokens, torch.arange(lo, hi))
        if any(lo < m <= hi for m in marks):
            entries = sum(k.numel() for k, _ in cache.runs + cache.distinct_runs)
            print(f"  {hi:>11,} tokens: cache {cache.memory_bytes() / 2**30:.2f} GiB ({entries:,} entries in "
                  f"{len(cache.runs)}+{len(cache.distinct_runs)} runs), peak RSS {peak_rss_gib():.2f} GiB, "
                  f"{time.time() - t0:.0f} s")
    peak = peak_rss_gib()
    print(f"result: cache {cache.memory_bytes() / 2**30:.2f} GiB per rank after {args.tokens:,} tokens; peak RSS "
          f"{peak:.2f} GiB of which {peak - base_rss:.2f} GiB above the start (the cache and its merge transients); "
          f"ingest {args.tokens / (time.time() - t0) / 1e6:.2f}M tok/s on this CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
