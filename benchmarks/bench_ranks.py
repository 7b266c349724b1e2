"""Eight ranks on the CPU: the whole job under torchrun with gloo at NUM_LAYERS=11 (tiny width), so that ranks
own zero Muon rows (11 MLP rows over 8 ranks: 2 each for ranks 0-4, 1 for rank 5, none for ranks 6 and 7).

    python3 benchmarks/bench_ranks.py [--nproc 8] [--steps 6] [--budget 60] [--out DIR]

Three runs of train_gpt.py on the embedded corpus (data/embedded/sp1024, built by tools/embedded_corpus.py):
  one     1 process, step-based, --steps steps
  many    --nproc processes, the same steps: the global batch is the same, only summation order differs, so the
          logged train losses must agree to 1e-3 relative (tests/test_end_to_end.py's 2-process tolerance) and
          the final integrated BPB to 2e-3
  budget  --nproc processes under MAX_WALLCLOCK_SECONDS=--budget: the shared clock must stop every rank at the
          same step (the run's `stop:` line), and export and evaluation must complete
Prints each run's wall time, the per-step losses, the stop line and a PASS/FAIL line per check; exits 1 on a FAIL.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "embedded" / "sp1024"
TINY = dict(NUM_LAYERS=11, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, MLP_MULT=2.0,
            BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16, VE_DIM=16, XSA_LAST_N=4, VE_LAST_N=2, TRAIN_SEQ_LEN=64,
            TRAIN_BATCH_TOKENS=8 * 64 * 2, WARMUP_STEPS=0, TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=0,
            VAL_BATCH_TOKENS=1024, GPTQ_N_SAMPLES=8, GPTQ_BLOCK_SIZE=32, EVAL_SEQ_LEN=64, EVAL_STRIDE=16,
            EVAL_BATCH_SEQS=8, TTT_CHUNK_TOKENS=1024, NGRAM_AUDIT_POSITIONS=8, MUON_MOMENTUM_WARMUP_STEPS=10,
            SWA_EVERY=2, OMP_NUM_THREADS=1,
            DATA_PATH=str(CORPUS / "datasets" / "fineweb10B_sp1024"),
            TOKENIZER_PATH=str(CORPUS / "tokenizers" / "fineweb_1024_bpe.model"))
LOSS = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) ", re.M)
EXACT = re.compile(r"^final_integrated_exact val_loss:\S+ val_bpb:(\S+)$", re.M)


def run(name: str, nproc: int, extra: dict, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({k: str(v) for k, v in {**TINY, **extra, "OUTPUT_DIR": out, "RUN_ID": name}.items()})
    cmd = [sys.executable, str(ROOT / "train_gpt.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / "train_gpt.py")]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(out))
    wall = time.time() - t0
    log = (out / "logs" / f"{name}.txt").read_text() if (out / "logs" / f"{name}.txt").exists() else ""
    print(f"{name}: nproc {nproc}, exit {r.returncode}, {wall:.0f} s wall")
    if r.returncode != 0:
        print(r.stderr[-3000:])
    stop = re.search(r"^stop: .*$", log, re.M)
    bpb = EXACT.search(log)
    return {"rc": r.returncode, "losses": {int(s): float(v) for s, v in LOSS.findall(log)},
            "stop": stop[0] if stop else "", "bpb": float(bpb[1]) if bpb else float("nan"),
            "submission": json.loads((out / "submission.json").read_text()) if (out / "submission.json").exists()
            else {}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    base = Path(args.out or tempfile.mkdtemp(prefix="bench_ranks_"))
    print(f"bench_ranks: {args.nproc} ranks, NUM_LAYERS=11 dim 64, {args.steps} steps; budget run "
          f"{args.budget:g} s; {os.cpu_count()} CPUs; outputs in {base}")
    steps = {"ITERATIONS": args.steps, "MAX_WALLCLOCK_SECONDS": 0}
    res = {}
    for name, nproc, extra in (("one", 1, steps), ("many", args.nproc, steps),
                               ("budget", args.nproc, {"ITERATIONS": 100000, "MAX_WALLCLOCK_SECONDS": args.budget,
                                                       "EXPORT_RESERVE_SECONDS": 5, "TRAIN_LOG_EVERY": 10})):
        (base / name).mkdir(parents=True, exist_ok=True)
        res[name] = run(name, nproc, extra, base / name)
    one, many, bud = res["one"], res["many"], res["budget"]
    for s in sorted(one["losses"]):
        print(f"  step {s}: 1 process {one['losses'][s]:.6f}  {args.nproc} processes {many['losses'].get(s, float('nan')):.6f}")
    print(f"  final_integrated_exact val_bpb: 1 process {one['bpb']:.6f}  {args.nproc} processes {many['bpb']:.6f}")
    print(f"  budget run: {bud['stop']}; submission steps {bud['submission'].get('steps')} "
          f"world_size {bud['submission'].get('world_size')} val_bpb {bud['submission'].get('val_bpb')}")
    checks = [
        ("all runs exit 0", all(r["rc"] == 0 for r in res.values())),
        ("same steps logged", sorted(one["losses"]) == sorted(many["losses"]) and len(one["losses"]) == args.steps),
        ("train losses within 1e-3 relative", all(abs(many["losses"].get(s, 1e9) - v) <= 1e-3 * abs(v)
                                                 for s, v in one["losses"].items())),
        ("final BPB within 2e-3", abs(one["bpb"] - many["bpb"]) <= 2e-3),
        ("budget: every rank stopped at the same step",
         bool(re.fullmatch(rf"stop: predicted_budget at step \d+ on every rank \(world_size {args.nproc}\)", bud["stop"]))),
        ("budget: export and evaluation completed", bud["submission"].get("world_size") == args.nproc),
    ]
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
