"""One-command check of the CUDA path: `./run.sh gpu-check` (or `python3 tools/gpu_check.py`).

On a CUDA machine (about 8 minutes on one H100), with embedded-corpus tokens (no download):
  1. attention: which SDPA backends run the model's GQA shapes in bf16, and their speed;
  2. training: the submitted configuration (48 x 2048 tokens per micro-step, as each of 8 GPUs runs it),
     compiled, >= 30 steps in each of the plain and late-QAT variants with EMA; ms per micro-step,
     tokens/s, MFU estimate, peak memory, and how many graphs were compiled after the warm-up (must be 0);
  3. export: Hessian calibration, GPTQ of every real-size matrix and LZMA serialization, timed;
  4. evaluation: the integrated pass (n-gram + TTT) on >= 4M tokens, per-phase throughput, and the
     projected time for the 62M-token validation set on 8 GPUs (assumptions printed with it).
It ends with a table and writes logs/gpu_check_<gpu>.txt. Without CUDA it says so, runs the same steps
on the CPU at a reduced size (clearly labelled), and exits 0.
"""
import argparse
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM; the MFU denominator
VAL_TOKENS_FULL = 62_021_846  # FineWeb validation split with the 1024-piece tokenizer (SPEC §0: ~62.02M)
CPU_CONFIG = dict(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8, bigram_vocab_size=1024,
                  bigram_dim=64, ve_dim=64, xsa_last_n=2, train_seq_len=256, train_batch_tokens=8 * 4 * 256,
                  eval_seq_len=256, eval_stride=64, eval_batch_seqs=8, ttt_chunk_tokens=4096, gptq_n_samples=16)


class Report:
    def __init__(self, path: Path):
        self.path, self.lines, self.rows = path, [], []

    def __call__(self, msg: str, console: bool = True) -> None:
        if console:
            print(msg, flush=True)
        self.lines.append(msg)

    def row(self, what: str, value: str) -> None:
        self.rows.append((what, value))
        self(f"result: {what}: {value}")

    def finish(self) -> None:
        width = max(len(w) for w, _ in self.rows)
        self("\n" + "=" * 30 + " gpu-check summary " + "=" * 30)
        for w, v in self.rows:
            self(f"{w.ljust(width)}  {v}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")
        print(f"written: {self.path}")


def corpus_dir() -> Path:
    out = ROOT / "data" / "embedded"
    subprocess.run([sys.executable, str(ROOT / "tools" / "embedded_corpus.py"), "--out", str(out)], check=True)
    return out


def check_attention(d: tg.Dist, hp: tg.Hyperparameters, rep: Report) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, T = 4, hp.train_seq_len
    dtype = torch.bfloat16 if d.is_cuda else torch.float32
    q = torch.randn(B, T, hp.num_heads, hp.head_dim, device=d.device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, hp.num_kv_heads, hp.head_dim, device=d.device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    results = {}
    backends = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    for name, backend in backends:
        try:
            ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
            with ctx:
                for i in range(4):  # 1 warm-up + 3 timed
                    if i == 1:
                        tg.sync(d)
                        t0 = time.perf_counter()
                    tg.causal_attention(q, k, v).float().sum().backward()
                tg.sync(d)
            results[name] = f"{(time.perf_counter() - t0) / 3 * 1000:.2f}ms fwd+bwd"
        except RuntimeError as e:
            results[name] = f"unavailable ({str(e).splitlines()[0][:60]})"
    shim = "fa3" if tg._fa3_func is not None and d.is_cuda else "sdpa"
    rep.row("attention shim", f"{shim}; GQA {hp.num_heads}/{hp.num_kv_heads} heads, B={B} T={T}: " +
            "; ".join(f"{k}={v}" for k, v in results.items()))


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def check_training(hp: tg.Hyperparameters, d: tg.Dist, rep: Report, steps: int) -> tg.GPT:
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp).to(d.device)
    muon, adam, replicated = tg.build_optimizers(model, hp, d)
    step_fn = torch.compile(model, dynamic=False, fullgraph=tg._fa3_func is None) if d.is_cuda else model
    trainer = tg.Trainer(hp, d, model, step_fn, muon, adam, replicated)
    t0 = time.perf_counter()
    tg.warmup_and_restore(trainer, rep)
    rep.row("compile warm-up", f"{time.perf_counter() - t0:.1f}s for {hp.warmup_steps} steps (plain + QAT variants), "
                                f"{dynamo_graphs()} graphs compiled")
    graphs_before = dynamo_graphs()
    loader = tg.DistributedTokenLoader(hp.data_path, d, hp.vocab_size)
    counter = tg.BigramCounter(hp.vocab_size, hp.complement_alpha, d.device)
    averager = tg.WeightAverager(model, hp)
    if d.is_cuda:
        torch.cuda.reset_peak_memory_stats(d.device)
    micro = hp.train_batch_tokens // trainer.grad_accum
    for qat in (False, True):
        trainer.step(loader, counter, 1.0, 0.95, qat)  # one untimed step per variant
        tg.sync(d)
        t0 = time.perf_counter()
        for i in range(steps):
            loss = trainer.step(loader, counter, 1.0, 0.95, qat)
            averager.update(i + 1, 1.0)
        tg.sync(d)
        dt = time.perf_counter() - t0
        ms_micro = dt / (steps * trainer.grad_accum) * 1000
        tok_s = steps * hp.train_batch_tokens / dt
        rep.row(f"train {'late-QAT' if qat else 'plain'} (+EMA)",
                f"{steps} steps x {trainer.grad_accum} micro-steps of {micro} tokens ({micro // hp.train_seq_len} x "
                f"{hp.train_seq_len}): {ms_micro:.1f} ms/micro-step = ms/step on 8 GPUs, {tok_s / 1e6:.3f}M tokens/s, "
                f"MFU {mfu(hp, model, tok_s) * 100:.1f}% of H100 bf16 peak, loss {loss.item():.3f}")
    rep.row("recompiles after warm-up", str(dynamo_graphs() - graphs_before))
    if d.is_cuda:
        rep.row("peak memory (training)", f"{torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB")
    return model


def mfu(hp: tg.Hyperparameters, model: tg.GPT, tokens_per_s: float) -> float:
    """6 FLOPs per matmul parameter per token (fwd + bwd) for every block matrix, the tied head and the
    projections, plus causal attention 6 * T * D per layer (QK^T and AV, half the square)."""
    dense = sum(getattr(model, n).numel() for n in tg.BANKS) + hp.vocab_size * hp.model_dim \
        + hp.bigram_dim * hp.model_dim + hp.ve_dim * hp.kv_dim
    per_token = 6 * dense + 6 * hp.num_layers * hp.train_seq_len * hp.model_dim
    return per_token * tokens_per_s / H100_BF16_PEAK


def check_export(model: tg.GPT, hp: tg.Hyperparameters, d: tg.Dist, rep: Report, world: int) -> Path:
    """Calibration for one rank's share of GPTQ_N_SAMPLES (1/world), GPTQ of every matrix on this one
    device (the real run spreads them over `world` ranks), and the rank-0 serialization."""
    share = dataclasses.replace(hp, gptq_n_samples=max(1, hp.gptq_n_samples // world))
    tg.sync(d)
    t0 = time.perf_counter()
    hessians = tg.collect_hessians(model, share, d)
    tg.sync(d)
    calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = tg.quantize_model(tg.unbanked_state_dict(model), hessians, hp, d)
    tg.sync(d)
    gptq = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp()) / "final_model.int5.xz"
    t0 = time.perf_counter()
    header = dict(config={k: getattr(hp, k) for k in tg.MODEL_FIELDS}, code_sha256=tg.file_sha256(tg.__file__),
                  tokenizer_sha256=tg.file_sha256(hp.tokenizer_path))
    size = tg.write_artifact(q, header, hp.artifact_size_cap - hp.size_margin_bytes, out, lambda line: None)
    lz = time.perf_counter() - t0
    rep.row("calibration (one rank's share)", f"{share.gptq_n_samples} x {hp.train_seq_len} tokens: {calib:.2f}s")
    rep.row("GPTQ all matrices + LZMA of every width, one device",
            f"{gptq:.1f}s (widths {hp.quant_bits}; spread over {world} ranks)")
    rep.row("width allocation + write", f"{lz:.1f}s, artifact {size} bytes (untrained weights)")
    rep.row("export reserve needed (est.)", f"{calib + gptq / world + lz:.1f}s of EXPORT_RESERVE_SECONDS="
                                            f"{hp.export_reserve_seconds:.0f}")
    return out


def check_eval(artifact: Path, hp: tg.Hyperparameters, d: tg.Dist, rep: Report, n_tokens: int, world: int) -> None:
    stream = tg.TokenStream(hp.data_path)
    val = stream.take(n_tokens)  # training text stands in for validation text: timing only
    sp = tg.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    luts = tg.build_byte_luts(sp, hp.vocab_size).to(d.device)
    model = tg.model_from_artifact(artifact, hp, d)
    if d.is_cuda:
        torch.cuda.reset_peak_memory_stats(d.device)
    r = tg.evaluate(model, val, luts, hp, d, rep, hp.ttt_temperature, use_ngram=True, use_ttt=True, label="gpu_check_eval")
    ph = r.phase_seconds
    n = r.n_targets
    rep.row("eval total", f"{n} targets in {r.seconds:.1f}s ({n / r.seconds / 1e6:.2f}M targets/s, compile included)")
    for k, v in ph.items():
        rep.row(f"eval phase {k}", f"{v:.1f}s = {n / v / 1e6:.2f}M targets/s")
    if d.is_cuda:
        rep.row("peak memory (eval)", f"{torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB")
    rep.row("n-gram audit", f"max|sum p - 1| {r.audit[0]:.2e}, count mismatches {int(r.audit[3])}")
    scale = VAL_TOKENS_FULL / n
    split = sum(v for k, v in ph.items() if k != "ngram_update") / world  # scoring, lookups, audit, TTT split
    projected = scale * (split + ph.get("ngram_update", 0.0))  # every rank ingests every chunk
    rep.row(f"projected eval, {VAL_TOKENS_FULL / 1e6:.2f}M tokens on {world} GPUs",
            f"{projected:.0f}s of EVAL_BUDGET_SECONDS={hp.eval_budget_seconds:.0f} (assumes linear scaling of "
            f"per-target work over {world} ranks, n-gram ingest repeated on every rank, cache growth not "
            f"extrapolated beyond {n / 1e6:.1f}M tokens, excludes artifact load and compile)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per variant")
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--world", type=int, default=8, help="GPUs of the real run, for projections")
    ap.add_argument("--log", type=Path, default=None, help="report file (default logs/gpu_check_<gpu>.txt)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    d = tg.Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    corpus = corpus_dir()
    base = dict(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"),
                tokenizer_path=str(corpus / "tokenizers" / "fineweb_1024_bpe.model"), warmup_steps=4 if cuda else 2)
    hp = tg.Hyperparameters(**base) if cuda else tg.Hyperparameters(**base, **CPU_CONFIG)
    hp.validate()
    name = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "cpu"
    rep = Report(args.log or ROOT / "logs" / f"gpu_check_{name}.txt")
    for line in tg.describe_environment(d):
        rep(line)
    if not cuda:
        rep("gpu-check: no CUDA device here; running the CPU path at a REDUCED size "
            "(4 layers x 128, 4 x 256-token micro-batches): the figures below are not the submitted configuration")
    rep(f"config: layers:{hp.num_layers} dim:{hp.model_dim} heads:{hp.num_heads}/{hp.num_kv_heads} "
        f"seq:{hp.train_seq_len} batch:{hp.train_batch_tokens} eval_seq:{hp.eval_seq_len} stride:{hp.eval_stride}")
    steps = args.steps or (30 if cuda else 3)
    check_attention(d, hp, rep)
    model = check_training(hp, d, rep, steps)
    artifact = check_export(model, hp, d, rep, args.world)
    del model
    check_eval(artifact, hp, d, rep, args.eval_tokens or (4 * 2 ** 20 if cuda else 2 * hp.ttt_chunk_tokens), args.world)
    rep.finish()


if __name__ == "__main__":
    main()
