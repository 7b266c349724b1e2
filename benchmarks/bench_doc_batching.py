"""EVAL_MODE=doc's idle-row factor at the contest's scale, from `doc_schedule` itself (no model, no GPU).

Doc mode scores, per step (the documents whose BOS lies in one TTT_CHUNK_TOKENS range), each rank's documents in
EVAL_BATCH_SEQS rows of a fixed-shape batch; a round forwards every row, finished or not, and every rank waits for
the slowest at the step's collectives. The factor f = rounds x rows x ranks / chunks of real work is what the
score phase costs over a perfectly packed batch (sliding mode is f = 1). FineWeb's document lengths are not in this
repository: the text is synthetic, log-normal lengths with FineWeb val's mean (the official split: 62,021,846
tokens in its first 50,000 documents, README "Data", = 1,240) and a chosen spread sigma, a slice of the 62M tokens
(f is per step).

    python3 benchmarks/bench_doc_batching.py [--sigma 0.8 1.0 1.2] [--tokens 8000000] [--ranks 8]
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FINEWEB_VAL_TOKENS, FINEWEB_VAL_DOCS = 62_021_846, 50_000


def synthetic_spans(n_tokens: int, sigma: float, seed: int = 0) -> torch.Tensor:
    """(D, 2) document spans (BOS position, last target) of log-normal lengths with FineWeb val's mean."""
    mean = FINEWEB_VAL_TOKENS / FINEWEB_VAL_DOCS
    rng = np.random.default_rng(seed)
    lens = np.maximum(2, rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, int(3 * n_tokens / mean))).astype(np.int64)
    lens = lens[:np.searchsorted(np.cumsum(lens), n_tokens)]
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    return torch.from_numpy(np.stack([starts, starts + lens], 1))


def idle_factor(spans: torch.Tensor, hp: tg.Hyperparameters, ranks: int) -> tuple:
    """(f, rounds per rank): each step's rounds are its slowest rank's (the j-th document on rank j % ranks)."""
    step = spans[:, 0] // hp.ttt_chunk_tokens
    rounds = 0
    for s in step.unique().tolist():
        group = spans[step == s]
        rounds += max(tg.doc_schedule(group[r::ranks], hp)[0].size(0) for r in range(ranks) if group[r::ranks].numel())
    c = hp.doc_chunk_tokens
    work = int(((spans[:, 1] - spans[:, 0] + c - 1) // c).sum())
    return rounds * hp.eval_batch_seqs * ranks / work, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    ap.add_argument("--tokens", type=int, default=8_000_000)
    ap.add_argument("--ranks", type=int, default=8)
    args = ap.parse_args()
    for sigma in args.sigma:
        spans = synthetic_spans(args.tokens, sigma)
        lens = (spans[:, 1] - spans[:, 0]).numpy()
        print(f"sigma {sigma}: {len(lens)} documents in {args.tokens} tokens, length mean {lens.mean():.0f} median "
              f"{np.median(lens):.0f} p99 {np.percentile(lens, 99):.0f} max {lens.max()}", flush=True)
        for B in (32, 8):
            for C in (65536, 524288):
                for c in (64, 256):
                    hp = tg.Hyperparameters(eval_mode="doc", eval_batch_seqs=B, ttt_chunk_tokens=C, doc_chunk_tokens=c)
                    f, rounds = idle_factor(spans, hp, args.ranks)
                    print(f"  EVAL_BATCH_SEQS={B:2d} TTT_CHUNK_TOKENS={C:6d} DOC_CHUNK_TOKENS={c:3d}: f={f:5.2f} "
                          f"rounds_per_rank_at_62M={rounds * FINEWEB_VAL_TOKENS / args.tokens:,.0f}", flush=True)


if __name__ == "__main__":
    main()
