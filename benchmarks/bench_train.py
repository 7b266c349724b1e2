"""Training step time of the submitted configuration, and of variants: SDPA backends forced, the late-QAT forward.

    python3 benchmarks/bench_train.py                     # every variant below, one subprocess each
    python3 benchmarks/bench_train.py --variants tree,sdpa_flash --steps 10 --budget 300
    python3 benchmarks/bench_train.py --only tree         # one variant in this process (what the above runs)

On CUDA: the real configuration (11 x 512; 48 x 2048 tokens per micro-step = what each of 8 GPUs runs
per optimizer step; one optimizer step here = 8 micro-steps), compiled, bf16 autocast, with the full
optimizer step (Parallel Muon + AdamW), bigram counts and EMA. On CPU: a REDUCED configuration (labelled
in the output), eager. Tokens are random ids: throughput does not depend on the text.

Per variant it prints one `result:` line: ms per micro-step (= ms per step on 8 GPUs), tokens/s per GPU,
MFU (22.5 TFLOP per micro-step of the submitted config, README "GPU measurements", over 989 TFLOP/s of H100 bf16),
peak memory, host syncs per optimizer step (CUDA: torch.cuda.set_sync_debug_mode("warn") warnings in one
Trainer.step + EMA update), the attention kernel configure_attention chose, and compile time. Variants
are the settings train_gpt.py reads (so the same switches work on a real run):
    tree            as committed
    sdpa_flash      ATTN_BACKEND=flash   SDPA's FA2 backend forced (torch 2.9's own default on H100)
    sdpa_cudnn      ATTN_BACKEND=cudnn   SDPA's cuDNN backend forced
    late_qat        the late-QAT forward (fake-quantized banks), as in the last 15% of training
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CPU_CONFIG = dict(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8, bigram_vocab_size=1024,
                  bigram_dim=64, ve_dim=64, xsa_last_n=2, train_seq_len=256, train_batch_tokens=8 * 4 * 256)
VARIANTS = {"tree": {}, "sdpa_flash": {"ATTN_BACKEND": "flash"}, "sdpa_cudnn": {"ATTN_BACKEND": "cudnn"}, "late_qat": {}}
SWITCHES = ("ATTN_BACKEND",)
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM: the MFU denominator
ATTENTION_KERNEL_WORDS = ("sdpa", "flash", "fmha", "attention", "attn")


def synthetic_shards(n_tokens: int, vocab: int) -> str:
    out = Path(tempfile.mkdtemp())
    header = np.zeros(256, dtype="<i4")
    header[:3] = [tg.SHARD_MAGIC, tg.SHARD_VERSION, n_tokens]
    tokens = np.random.default_rng(0).integers(0, vocab, n_tokens).astype("<u2")
    for split in ("train", "val"):
        with open(out / f"fineweb_{split}_000000.bin", "wb") as f:
            f.write(header.tobytes() + tokens.tobytes())
    return str(out)


def flop_per_micro_step(hp: tg.Hyperparameters) -> float:
    """Model FLOPs of one micro-step (README "GPU measurements"): 6 per matmul parameter per token (block matrices,
    tied head, bigram and value-embedding projections) plus causal attention 6 * L * D * T per token."""
    dense = hp.num_layers * (2 * hp.model_dim ** 2 + 2 * hp.kv_dim * hp.model_dim + 2 * hp.mlp_hidden * hp.model_dim)
    dense += hp.vocab_size * hp.model_dim + hp.bigram_dim * hp.model_dim + hp.ve_dim * hp.kv_dim
    tokens = hp.train_batch_tokens // 8
    return tokens * (6 * dense + 6 * hp.num_layers * hp.model_dim * hp.train_seq_len)


def count_syncs(fn) -> int:
    """Host syncs CUDA reports while fn runs (set_sync_debug_mode warns on each synchronizing call)."""
    if not torch.cuda.is_available():
        fn()
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def attention_kernels(trainer, step) -> str:
    """Names of the attention kernels the GPU ran in one step (torch.profiler), the proof of the backend."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ATTENTION_KERNEL_WORDS)}
    return ",".join(sorted(n.replace(" ", "")[:60] for n in names)) or "none_found"


def run_one(variant: str, steps: int, profile: bool) -> None:
    cuda = torch.cuda.is_available()
    d = tg.Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    env = {k: os.environ[k] for k in SWITCHES if k in os.environ}
    probe = tg.Hyperparameters(**({} if cuda else CPU_CONFIG))
    hp = tg.Hyperparameters.from_env({**{k.upper(): str(v) for k, v in ({} if cuda else CPU_CONFIG).items()}, **env,
                                      "DATA_PATH": synthetic_shards(probe.train_batch_tokens * 4 + 1, probe.vocab_size)})
    qat = variant == "late_qat"
    attention = tg.configure_attention(hp, d)
    torch.manual_seed(0)
    model = tg.GPT(hp).to(d.device)
    muon, adam, replicated = tg.build_optimizers(model, hp, d)
    step_fn = torch.compile(model, dynamic=False, fullgraph=attention != "fa3") if cuda else model
    trainer = tg.Trainer(hp, d, model, step_fn, muon, adam, replicated)
    loader = tg.DistributedTokenLoader(hp.data_path, d)
    counter = tg.BigramCounter(hp.vocab_size, hp.complement_alpha, d.device)
    averager = tg.WeightAverager(model, hp)
    state = {"i": 0}

    def step():
        state["i"] += 1
        loss = trainer.step(loader, counter, 1.0, 0.95, qat)
        averager.update(state["i"], 1.0)
        return loss

    t0 = time.perf_counter()
    step()
    tg.sync(d)
    compile_s = time.perf_counter() - t0
    graphs = dynamo_graphs()
    syncs = count_syncs(step)
    kernels = attention_kernels(trainer, step) if cuda and profile else "not_profiled"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tg.sync(d)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    tg.sync(d)
    dt = time.perf_counter() - t0
    recompiles = dynamo_graphs() - graphs
    ms = dt / (steps * trainer.grad_accum) * 1000
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    mfu = flop_per_micro_step(hp) / (ms / 1000) / H100_BF16_PEAK if cuda else float("nan")
    print(f"result: variant:{variant} ms_per_step:{ms:.2f} tok_s:{hp.train_batch_tokens // 8 / (ms / 1000):.0f} "
          f"mfu:{mfu:.3f} peak_mem_gib:{peak:.2f} syncs_per_step:{syncs} attention:{attention} "
          f"compile_s:{compile_s:.1f} recompiles:{recompiles} steps:{steps} loss:{float(loss):.3f} attention_kernels:{kernels}", flush=True)


def run_variants(names: list, steps: int, budget_s: float, per_variant_s: float, log=print) -> list:
    """Each variant in its own process (fresh compile, memory and dynamo state; a failure stays local).
    A variant starts only while at least per_variant_s of the budget is left. Returns the result lines."""
    deadline, lines = time.perf_counter() + budget_s, []
    for name in names:
        left = deadline - time.perf_counter()
        if left < per_variant_s:
            log(f"bench_train: variant:{name} SKIPPED ({left:.0f}s of the budget left, needs ~{per_variant_s:.0f}s)")
            continue
        env = {**os.environ, **VARIANTS[name]}
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(steps)] + (["--profile"] if name == "tree" else [])
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(30.0, left))
            found = [ln for ln in r.stdout.splitlines() if ln.startswith("result: variant:")]
            if r.returncode != 0 or not found:
                log(f"bench_train: variant:{name} FAILED rc={r.returncode}: {(r.stderr or r.stdout)[-1500:]}")
            lines += found
            for ln in found:
                log(ln)
        except subprocess.TimeoutExpired:
            log(f"bench_train: variant:{name} TIMED OUT after {left:.0f}s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(VARIANTS), help="run one variant in this process")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list, in order")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant")
    ap.add_argument("--budget", type=float, default=3600.0, help="seconds for all variants together")
    ap.add_argument("--profile", action="store_true", help="list the attention kernels that ran (CUDA)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    steps = args.steps or (10 if cuda else 2)
    if args.only:
        run_one(args.only, steps, args.profile)
        return
    label = torch.cuda.get_device_name(0) if cuda else "CPU (REDUCED configuration, not the submitted one)"
    print(f"bench_train: device:{label} torch:{torch.__version__} steps_per_variant:{steps}", flush=True)
    run_variants(args.variants.split(","), steps, args.budget, 100.0 if cuda else 0.0)


if __name__ == "__main__":
    main()
