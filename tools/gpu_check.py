"""One-command check of the CUDA path: `./run.sh gpu-check` (or `python3 tools/gpu_check.py`).

On a CUDA machine (its length is set by --budget, 390 s by default: every part starts only if its usual
time is left), with synthetic or embedded-corpus tokens (no download):
  1. attention: the kernel configure_attention picks, and every SDPA backend's forward + backward time on
     one layer of the real micro-batch (48 x 2048, GQA 8/4 x 64, bf16), native GQA and with K/V copied;
  2. training (benchmarks/bench_train.py, one process per variant): the submitted configuration as
     committed, then SDPA backends forced (FA2, cuDNN) and the late-QAT forward
     while the budget lasts: ms/step, tokens/s, MFU, peak memory, host syncs per step, attention kernels;
  3. export: Hessian calibration, GPTQ of every real-size matrix and LZMA serialization, timed;
  4. evaluation (only with --eval on CUDA: ~90 s): the integrated pass on >= 4M tokens, projected to 8 GPUs.
A part that fails prints its error and the rest still runs. It ends with a table and writes
logs/gpu_check_<gpu>.txt. Without CUDA it says so, runs every part on the CPU at a reduced size (clearly
labelled), and exits 0.
"""
import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_train  # noqa: E402
import train_gpt as tg  # noqa: E402

VAL_TOKENS_FULL = 62_021_846  # FineWeb validation split with the 1024-piece tokenizer (README "Data": ~62.02M)
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
    out = ROOT / "data" / "embedded" / "sp1024"
    subprocess.run([sys.executable, str(ROOT / "tools" / "embedded_corpus.py"), "--out", str(out)], check=True)
    return out


def check_attention(d: tg.Dist, hp: tg.Hyperparameters, rep: Report) -> None:
    """One layer's attention on the real micro-batch, forward + backward, per SDPA backend, native GQA and
    with K/V heads copied; x NUM_LAYERS is the attention share of one micro-step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, T = (hp.train_batch_tokens // 8 // hp.train_seq_len if d.is_cuda else 4), hp.train_seq_len
    dtype = torch.bfloat16 if d.is_cuda else torch.float32
    q = torch.randn(B, T, hp.num_heads, hp.head_dim, device=d.device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, hp.num_kv_heads, hp.head_dim, device=d.device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    chosen = tg.configure_attention(hp, d)
    results = {f"shim({chosen})": time_attention(d, q, k, v, True, None)}
    flash, tg._use_fa3 = tg._use_fa3, False  # time SDPA's backends even when FA3 was chosen
    try:
        for name in ("cudnn", "flash", "efficient") + (() if d.is_cuda else ("math",)):
            for native in (True, False):
                backend = getattr(SDPBackend, tg._SDPA_ENUM[name])
                results[f"{name}{'' if native else '+copied_kv'}"] = time_attention(d, q, k, v, native, backend)
    finally:
        tg._use_fa3 = flash
        del q, k, v
        if d.is_cuda:
            torch.cuda.empty_cache()  # the training variants run in other processes on the same GPU
    rep.row("attention kernel chosen", chosen)
    rep.row("attention fwd+bwd, one layer", f"B={B} T={T} heads {hp.num_heads}/{hp.num_kv_heads}: " +
            "; ".join(f"{k}={v}" for k, v in results.items()))


def time_attention(d: tg.Dist, q, k, v, native: bool, backend) -> str:
    from torch.nn.attention import sdpa_kernel
    try:
        with sdpa_kernel([backend]) if backend is not None else torch.enable_grad():
            for i in range(6):  # 1 warm-up + 5 timed
                if i == 1:
                    tg.sync(d)
                    t0 = time.perf_counter()
                kk, vv = (k, v) if native else (t.repeat_interleave(q.size(2) // k.size(2), dim=2) for t in (k, v))
                tg.causal_attention(q, kk, vv).float().sum().backward()
            tg.sync(d)
        return f"{(time.perf_counter() - t0) / 5 * 1000:.2f}ms"
    except RuntimeError as e:
        return f"unavailable({str(e).splitlines()[0][:50]})"


def check_training(rep: Report, variants: list, steps: int, budget_s: float) -> None:
    """benchmarks/bench_train.py's variants, each in its own process, while the budget lasts."""
    for line in bench_train.run_variants(variants, steps, budget_s, 100.0 if torch.cuda.is_available() else 0.0, rep):
        fields = dict(kv.split(":", 1) for kv in line[len("result: "):].split(" ") if ":" in kv)
        rep.row(f"train {fields['variant']}", f"{fields['ms_per_step']} ms/micro-step (= ms/step on 8 GPUs), "
                f"{fields['tok_s']} tok/s, MFU {fields['mfu']}, peak {fields['peak_mem_gib']} GiB, syncs/step "
                f"{fields['syncs_per_step']}, attention {fields['attention']}, compile {fields['compile_s']}s, "
                f"recompiles {fields['recompiles']}, kernels {fields['attention_kernels']}")


def check_export(hp: tg.Hyperparameters, d: tg.Dist, rep: Report, world: int) -> Path:
    """Calibration for one rank's share of GPTQ_N_SAMPLES (1/world), GPTQ of every matrix on this one
    device (the real run spreads them over `world` ranks), and the rank-0 serialization; untrained weights."""
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp).to(d.device)
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
    out = Path(tempfile.mkdtemp()) / "final_model.gptq.xz"
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
    r = tg.evaluate(model, val, luts, hp, d, rep, use_ngram=hp.ngram_enabled, use_ttt=hp.ttt_enabled, label="gpu_check_eval")
    ph = r.phase_seconds
    n = r.n_targets
    rep.row("eval total", f"{n} targets in {r.seconds:.1f}s ({n / r.seconds / 1e6:.2f}M targets/s, compile included)")
    for k, v in ph.items():
        rep.row(f"eval phase {k}", f"{v:.1f}s = {n / v / 1e6:.2f}M targets/s")
    if d.is_cuda:
        rep.row("peak memory (eval)", f"{torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB")
    rep.row("n-gram audit", f"max|sum p - 1| {r.audit[0]:.2e}, count mismatches {int(r.audit[3])}")
    scale = VAL_TOKENS_FULL / n
    fixed = ("ngram_update", "learn_mix", "audit")  # per step on every rank whatever the rank count (README)
    split = sum(v for k, v in ph.items() if k not in fixed) / world  # scoring, look-ups, TTT, phases split
    projected = scale * (split + sum(ph.get(k, 0.0) for k in fixed))
    rep.row(f"projected eval, {VAL_TOKENS_FULL / 1e6:.2f}M tokens on {world} GPUs ({hp.eval_mode} mode)",
            f"{projected:.0f}s of EVAL_BUDGET_SECONDS={hp.eval_budget_seconds:.0f} (per-target work split over "
            f"{world} ranks, per-step work ({', '.join(fixed)}) not, steps scaled with the tokens, cache growth not "
            f"extrapolated beyond {n / 1e6:.1f}M tokens, excludes artifact load and compile)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per variant")
    ap.add_argument("--variants", default=",".join(bench_train.VARIANTS), help="bench_train variants, in order")
    ap.add_argument("--budget", type=float, default=390.0, help="seconds for the whole check (parts are skipped)")
    ap.add_argument("--eval", action="store_true", help="also time the integrated evaluation (CUDA; on CPU always)")
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--world", type=int, default=8, help="GPUs of the real run, for projections")
    ap.add_argument("--log", type=Path, default=None, help="report file (default logs/gpu_check_<gpu>.txt)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
    cuda = torch.cuda.is_available()
    d = tg.Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    name = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "cpu"
    rep = Report(args.log or ROOT / "logs" / f"gpu_check_{name}.txt")
    for line in tg.describe_environment(d):
        rep(line)
    if not cuda:
        rep("gpu-check: no CUDA device here; running the CPU path at a REDUCED size "
            "(4 layers x 128, 4 x 256-token micro-batches): the figures below are not the submitted configuration")
    corpus = corpus_dir()
    base = dict(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"),
                tokenizer_path=str(corpus / "tokenizers" / "fineweb_1024_bpe.model"))
    hp = tg.Hyperparameters(**base) if cuda else tg.Hyperparameters(**base, **CPU_CONFIG)
    hp.validate()
    rep(f"config: layers:{hp.num_layers} dim:{hp.model_dim} heads:{hp.num_heads}/{hp.num_kv_heads} "
        f"seq:{hp.train_seq_len} batch:{hp.train_batch_tokens} eval_seq:{hp.eval_seq_len} stride:{hp.eval_stride} "
        f"budget:{args.budget:.0f}s")
    artifact = []
    parts = [("attention", 20, lambda: check_attention(d, hp, rep)),
             ("training", 0, lambda: check_training(rep, args.variants.split(","), args.steps or (10 if cuda else 1),
                                                    left() - (45 if cuda else 0))),
             ("export", 40, lambda: artifact.append(check_export(hp, d, rep, args.world)))]
    if args.eval or not cuda:
        parts.append(("eval", 120, lambda: check_eval(artifact[0], hp, d, rep, args.eval_tokens or (
            4 * 2 ** 20 if cuda else 2 * hp.ttt_chunk_tokens), args.world)))
    for part, needs, run in parts:
        if cuda and left() < needs:
            rep.row(f"{part} (skipped)", f"{left():.0f}s of the {args.budget:.0f}s budget left, needs ~{needs}s")
            continue
        try:
            run()
        except Exception as e:  # noqa: BLE001  one failing part must not hide the others' figures
            traceback.print_exc()
            rep.row(f"{part} FAILED", f"{type(e).__name__}: {str(e)[:300]}")
    rep.row("gpu-check wall time", f"{time.perf_counter() - t_start:.0f}s")
    rep.finish()


if __name__ == "__main__":
    main()
