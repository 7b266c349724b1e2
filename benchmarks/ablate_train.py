"""Does each part of the model earn its place? All-on vs all-off vs each part off, at equal steps.

    python3 benchmarks/ablate_train.py [--steps 60] [--seeds 1337 42] [--jobs 2] [--configs all_on,all_off,...]

Each run is train_gpt.py as a subprocess on the embedded corpus (built by tools/embedded_corpus.py into
data/embedded) at the CPU shape of run.sh's embedded_settings (read from run.sh, so it is the same shape),
step-based (MAX_WALLCLOCK_SECONDS=0, ITERATIONS=--steps: every schedule follows the step count, so runs
are comparable whatever else the machine is doing), OMP_NUM_THREADS=1, at most --jobs runs at once, each
in its own temporary OUTPUT_DIR. Per run it reads from the logs:
  model-only BPB   `final_quant_roundtrip_contiguous_exact` (the artifact's model alone, the same contiguous evaluator
                   for every configuration)
  integrated BPB   `final_integrated_exact` (n-gram cache + LoRA TTT, the reported number)
  s/step           `step_avg:` of the last training log line (wall seconds per step, 1 thread)
and then scores the same artifact on the second held-out text (datasets/heldout2: matplotlib's docstrings,
never trained on, not even by the tokenizer) with EVAL_ONLY, reading `final_integrated_exact` and
`integrated_parts: model_only_bpb` (the model with TTT but without the n-gram cache).
Config vocab_8192 trains on the 8192-piece corpus (data/embedded/sp8192, built if missing) with its tokenizer
and run.sh's size cap for that vocabulary; every done line also has bytes per token, tok/s, the widths and the
total size (artifact composition).

Equal time: a part that changes the cost of a step would get more (or fewer) steps in the same time.
Wall-clock step_avg on a shared machine measures the machine as much as the config, so --cost-steps K
measures each configuration's CPU seconds per step by process time (one thread, K steps after a first
one; late-QAT's fake quantization is not in it) and prints the steps each would get in all_on's time;
--equal-wall CONFIG,... reruns those configurations at that step count (same seeds) as a second table.
--table-from LOG tabulates (and with --cost-steps, costs) the `done` lines of an earlier or cut-short run.
"""
import argparse
import json
import math
import concurrent.futures as cf
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One switch set per part; "all_off" is a plain GPT with Muon.
PARTS = {
    "xsa": {"XSA_LAST_N": "0"},
    "value_embed": {"VE_LAST_N": "0"},
    "bigram_hash": {"BIGRAM_VOCAB_SIZE": "0"},
    "smear_gate": {"SMEAR_GATE": "0"},
    "gated_attn": {"GATED_ATTN": "0"},
    "value_residual": {"VALUE_RESIDUAL": "0"},
    "unet_skips": {"UNET_SKIPS": "0"},
    "complement_loss": {"COMPLEMENT_ALPHA": "0"},
    "ema_swa": {"EMA_DECAY": "0", "SWA_WEIGHT": "0"},
    "late_qat": {"LATE_QAT_FRAC": "1"},
}
CONFIGS = {"all_on": {}, "all_off": {k: v for part in PARTS.values() for k, v in part.items()},
           **{f"no_{name}": switches for name, switches in PARTS.items()},
           "vocab_8192": {"VOCAB_SIZE": "8192"}}  # its own corpus (data/embedded/sp8192), tokenizer and cap
# Issue 21's levers at run.sh's 6-layer shape (the records' 11-layer choices: loop 3-5 from 35%, lanes from 7)
LOOPS = {"NUM_LOOPS": "2", "LOOP_START": "1", "LOOP_END": "2", "ENABLE_LOOPING_AT": "0.35"}
CONFIGS.update(loops=LOOPS, parallel={"PARALLEL_START_LAYER": "4"}, levers_all={
    **LOOPS, "PARALLEL_START_LAYER": "4", "QK_GAIN_INIT": "5", "SMEAR_GATE_BOS_FIX": "1", "ATTN_GATE_INPUTS": "12"})
FLOAT = r"([0-9.]+(?:e[-+]?\d+)?)"


def embedded_env(vocab: int = 1024) -> dict:
    """The environment run.sh's embedded_settings() exports (the CPU shape) for this vocabulary: its corpus
    (data/embedded/sp{vocab}), tokenizer and size cap, without running the job."""
    corpus = ROOT / "data" / "embedded" / f"sp{vocab}"
    script = (f'vocab={vocab}; corpus="{corpus}"; '
              f'source <(sed -n "/^embedded_settings() {{/,/^}}/p" "{ROOT / "run.sh"}"); embedded_settings; env -0')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, check=True, cwd=ROOT).stdout
    env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    if not (corpus / "MANIFEST.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "tools" / "embedded_corpus.py"), "--out", str(corpus),
                        "--vocab-size", str(vocab)], check=True)
    return {**env, "VOCAB_SIZE": str(vocab)}


def config_env(base: dict, name: str) -> dict:
    """base + the config's switches; a config that changes VOCAB_SIZE gets that vocabulary's corpus and cap."""
    env = {**base, **CONFIGS[name]}
    vocab = int(env.get("VOCAB_SIZE", "1024"))
    if vocab != int(base.get("VOCAB_SIZE", "1024")):
        env.update({k: v for k, v in embedded_env(vocab).items()
                    if k in ("DATA_PATH", "TOKENIZER_PATH", "ARTIFACT_SIZE_CAP")})
    return env


def last(pattern: str, text: str, what: str) -> float:
    found = re.findall(pattern, text)
    if not found:
        raise RuntimeError(f"ablate_train: no `{what}` line in the log")
    return float(found[-1])


def run_one(base: dict, name: str, seed: int, steps: int) -> dict:
    """Train + evaluate one configuration, then score its artifact on heldout2."""
    with tempfile.TemporaryDirectory(prefix=f"ablate_{name}_{seed}_") as out:
        env = {**config_env(base, name), "SEED": str(seed), "ITERATIONS": str(steps), "MAX_WALLCLOCK_SECONDS": "0",
               "OUTPUT_DIR": out, "RUN_ID": "train", "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                           cwd=out)
        if p.returncode:
            raise RuntimeError(f"ablate_train: {name} seed {seed} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        log = p.stdout
        r = dict(config=name, seed=seed, steps=steps,
                 model_bpb=last(rf"final_quant_roundtrip_contiguous_exact val_loss:\S+ val_bpb:{FLOAT}", log, "final_quant_roundtrip_contiguous"),
                 integrated_bpb=last(rf"final_integrated_exact val_loss:\S+ val_bpb:{FLOAT}", log, "final_integrated"),
                 s_per_step=last(rf"step_avg:{FLOAT}ms", log, "step_avg") / 1000,
                 tok_s=last(rf"tok_s:{FLOAT}", log, "tok_s"),
                 bytes_per_token=last(rf"final_quant_roundtrip_contiguous_exact val_loss:{FLOAT}", log, "loss")
                 / math.log(2) / last(rf"final_quant_roundtrip_contiguous_exact val_loss:\S+ val_bpb:{FLOAT}", log, "bpb"),
                 widths=re.findall(r"^quant_alloc: widths:(\S+) .*$", log, re.M)[-1:],
                 artifact_bytes=last(r"Total submission size: (\d+) bytes", log, "Total submission size"))
        env.update(EVAL_ONLY=str(Path(out) / "final_model.gptq.xz"), RUN_ID="heldout2",
                   DATA_PATH=str(Path(env["DATA_PATH"]).parent / "heldout2"))
        p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                           cwd=out)
        if p.returncode:
            raise RuntimeError(f"ablate_train: heldout2 eval of {name} seed {seed} failed:\n{p.stderr[-2000:]}")
        r["h2_model_bpb"] = last(rf"integrated_parts: model_only_bpb:{FLOAT}", p.stdout, "integrated_parts")
        r["h2_integrated_bpb"] = last(rf"final_integrated_exact val_loss:\S+ val_bpb:{FLOAT}", p.stdout,
                                      "final_integrated (heldout2)")
        r["wall_s"] = time.time() - t0
        print(f"ablate_train: done {json.dumps(r)}", flush=True)  # a partial run's results survive in the log
        return r


def step_cost_here(steps: int) -> float:
    """CPU seconds per optimizer step of the configuration in this process's environment, by process time
    (one thread): unlike the logs' wall-clock step_avg it does not depend on what else the machine runs."""
    sys.path.insert(0, str(ROOT))
    import torch
    import train_gpt as tg
    torch.set_num_threads(1)
    hp = tg.Hyperparameters.from_env(os.environ)
    d = tg.Dist()
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    trainer = tg.Trainer(hp, d, model, model, *tg.build_optimizers(model, hp, d))
    loader = tg.DistributedTokenLoader(hp.data_path, d)
    counter = tg.BigramCounter(hp.vocab_size, hp.complement_alpha, d.device) if hp.complement_alpha > 0 else None
    averager = tg.WeightAverager(model, hp)
    trainer.step(loader, counter, 1.0, 0.95, False)  # first step: allocations, lazy initialization
    t0 = time.process_time()
    for i in range(steps):
        trainer.step(loader, counter, 1.0, 0.95, False)
        averager.update(i + 1, 1.0)
    return (time.process_time() - t0) / steps


def step_costs(base: dict, names: list, steps: int) -> dict:
    """{config: CPU s/step}, each measured in a fresh single-threaded process, one at a time."""
    costs = {}
    for name in names:
        env = {**config_env(base, name), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, __file__, "--cost-here", str(steps)], env=env, capture_output=True,
                             text=True, cwd=ROOT)
        if out.returncode:
            raise RuntimeError(f"ablate_train: step cost of {name} failed:\n{out.stderr[-2000:]}")
        costs[name] = float(out.stdout.split()[-1])
        print(f"ablate_train: cpu_s_per_step {name} {costs[name]:.3f}", flush=True)
    return costs


def run_all(base: dict, jobs: list, workers: int) -> list:
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_one(base, *job), jobs))


def table(results: list, seeds: list, title: str) -> str:
    """One row per configuration: per-seed values, mean, spread (max - min over seeds), delta vs all_on."""
    by = {}
    for r in results:
        by.setdefault(r["config"], {})[r["seed"]] = r
    metrics = (("model_bpb", "model-only BPB (val)"), ("integrated_bpb", "integrated BPB (val)"),
               ("h2_model_bpb", "heldout2 model-only BPB (integrated pass, n-gram off; TTT if on)"), ("h2_integrated_bpb", "heldout2 integrated BPB"))
    ref = by.get("all_on")
    lines = [title]
    for key, label in metrics:
        lines.append(f"\n{label}  (delta = mean over seeds of (config - all_on at the same seed); "
                     f"negative = better than all_on; wall s/step = the logs' step_avg, machine-dependent)")
        head = f"{'config':<20}{'steps':>6}" + "".join(f"{'seed ' + str(s):>10}" for s in seeds)
        lines.append(head + f"{'mean':>9}{'spread':>8}{'delta':>9}{'wall s/step':>12}")
        for name, rs in by.items():
            vals = [rs[s][key] for s in seeds if s in rs]
            mean, step = statistics.mean(vals), statistics.mean(r["s_per_step"] for r in rs.values())
            steps = next(iter(rs.values()))["steps"]
            paired = [rs[s][key] - ref[s][key] for s in seeds if s in rs and ref and s in ref]
            delta = f"{statistics.mean(paired):+9.4f}" if paired else f"{'':>9}"
            spread = f"{max(vals) - min(vals):>8.4f}" if len(vals) > 1 else f"{'-':>8}"  # one seed: no spread
            lines.append(f"{name:<20}{steps:>6}" + "".join(f"{rs[s][key]:>10.4f}" if s in rs else f"{'-':>10}"
                                                           for s in seeds)
                         + f"{mean:>9.4f}{spread}{delta}{step:>12.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each OMP_NUM_THREADS=1)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--equal-wall", default="", help="configs to rerun at the all-on configuration's wall time")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="settings applied to every run (e.g. TRAIN_BATCH_TOKENS=8192 EVAL_STRIDE=128)")
    ap.add_argument("--table-from", default="", help="print the tables from the `done` lines of an earlier log")
    ap.add_argument("--cost-steps", type=int, default=0, help="also measure each config's CPU s/step over this many steps")
    ap.add_argument("--cost-here", type=int, default=0, help=argparse.SUPPRESS)  # internal: one cost measurement
    args = ap.parse_args()
    if args.cost_here:
        print(step_cost_here(args.cost_here))
        return
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names + [c for c in args.equal_wall.split(",") if c] if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs/--equal-wall: unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    base = embedded_env()
    base.update(VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="10")
    base.update(item.split("=", 1) for item in args.set)
    shape = " ".join(f"{k}={base[k]}" for k in ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS",
                                                "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "EVAL_SEQ_LEN", "EVAL_STRIDE"))
    print(f"ablate_train: steps:{args.steps} seeds:{args.seeds} jobs:{args.jobs} OMP_NUM_THREADS=1 shape: {shape} "
          f"set: {' '.join(args.set) or '-'}")
    print(f"ablate_train: configs: " + "; ".join(f"{n}: {' '.join(f'{k}={v}' for k, v in CONFIGS[n].items()) or '-'}"
                                                 for n in names), flush=True)
    t0 = time.time()
    if args.table_from:  # e.g. the finished runs of a log: tabulated (and costed) without rerunning them
        results = [json.loads(line.split("done ", 1)[1]) for line in open(args.table_from)
                   if line.startswith("ablate_train: done ")]
    else:
        results = run_all(base, [(n, s, args.steps) for n in names for s in args.seeds], args.jobs)
    print("\n" + table(results, args.seeds, f"== equal steps ({args.steps}) =="), flush=True)
    costs = step_costs(base, names, args.cost_steps) if args.cost_steps else {}
    if costs and "all_on" in costs:
        print(f"\n== CPU seconds per step (process time, 1 thread, {args.cost_steps} steps each) and the steps "
              f"each config gets in all_on's time ({args.steps} steps) ==")
        for n, c in costs.items():
            print(f"{n:<20}{c:8.3f} s/step  ratio:{c / costs['all_on']:6.3f}  "
                  f"equal-time steps:{args.steps * costs['all_on'] / c:6.1f}")
    if args.equal_wall and not args.table_from:
        by = costs or {n: statistics.mean(r["s_per_step"] for r in results if r["config"] == n) for n in names}
        if "all_on" not in by:
            ap.error("--equal-wall needs all_on in --configs (its s/step sets the time)")
        extra = [(n, s, round(args.steps * by["all_on"] / by[n])) for n in args.equal_wall.split(",") if n
                 for s in args.seeds]
        more = run_all(base, extra, args.jobs)
        ref = [r for r in results if r["config"] == "all_on"]
        print("\n" + table(ref + more, args.seeds, "== equal time (steps = all_on steps x all_on s/step / "
                                                  "the config's s/step) =="))
    print(f"\nablate_train: total wall {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
