"""Run the main job once per seed and summarize as records are judged.

    ./run.sh seeds 1337 42 2024 [--ref-mean M --ref-std S --ref-n N]

Each seed runs train_gpt.py (the command given by --launch; run.sh passes torchrun on GPUs) with
SEED=<seed>, RUN_ID=seed_<seed> and OUTPUT_DIR=<out>/seed_<seed>, keeping its log and submission.json.
The combined submission.json lists the per-seed results, their mean and sample standard deviation, and,
given the reference record's val_loss mean/std/n (nats), the one-sided Welch t-test p-value for the
hypothesis that ours improves on it by at least --min-gain nats (0.005, the contest's threshold).
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mean_std(xs: list) -> tuple:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0 or x >= 1:
        return max(0.0, min(1.0, x))
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def welch_improvement_p(ours: list, ref_mean: float, ref_std: float, ref_n: int, min_gain: float) -> dict:
    """One-sided Welch test of H0: ref_mean - mean(ours) <= min_gain (lower loss is better)."""
    m, s = mean_std(ours)
    n = len(ours)
    va, vb = s * s / n, ref_std * ref_std / ref_n
    se = math.sqrt(va + vb)
    t = (ref_mean - m - min_gain) / se
    df = (va + vb) ** 2 / ((va * va / (n - 1) if n > 1 else 0) + (vb * vb / (ref_n - 1) if ref_n > 1 else 0))
    return dict(t=t, df=df, p_value=t_sf(t, df), min_gain_nats=min_gain)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("seeds", nargs="+", type=int)
    ap.add_argument("--ref-mean", type=float, help="reference record's mean val_loss (nats)")
    ap.add_argument("--ref-std", type=float)
    ap.add_argument("--ref-n", type=int)
    ap.add_argument("--min-gain", type=float, default=0.005)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUTPUT_DIR", ".")))
    ap.add_argument("--launch", default=f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'train_gpt.py'))}")
    args = ap.parse_args()
    if len(set(args.seeds)) < 2:
        sys.exit("seeds: give at least two different seeds")
    runs = []
    for seed in args.seeds:
        out = args.out / f"seed_{seed}"
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SEED=str(seed), RUN_ID=f"seed_{seed}", OUTPUT_DIR=str(out))
        print(f"seeds: running seed {seed} -> {out}", flush=True)
        rc = subprocess.run(shlex.split(args.launch), env=env).returncode
        if rc != 0:
            sys.exit(f"seeds: seed {seed} failed (exit {rc}); see {out / 'logs'}; no combined submission written")
        runs.append(json.loads((out / "submission.json").read_text()))
        (args.out / "logs").mkdir(exist_ok=True)
        shutil.copy(out / "logs" / f"seed_{seed}.txt", args.out / "logs" / f"seed_{seed}.txt")
    bpb_m, bpb_s = mean_std([r["val_bpb"] for r in runs])
    loss_m, loss_s = mean_std([r["val_loss"] for r in runs])
    combined = dict({k: runs[0][k] for k in ("name", "author", "github_id", "date", "blurb", "hardware", "world_size",
                                            "data", "bytes_code")},
                    val_bpb=round(bpb_m, 8), val_loss=round(loss_m, 8), val_bpb_std=round(bpb_s, 8),
                    val_loss_std=round(loss_s, 8), n_seeds=len(runs), bytes_total=max(r["bytes_total"] for r in runs),
                    seeds=[dict(seed=r["seed"], val_bpb=r["val_bpb"], val_loss=r["val_loss"], bytes_total=r["bytes_total"],
                                log=f"logs/seed_{r['seed']}.txt") for r in runs])
    if args.ref_mean is not None:
        if args.ref_std is None or args.ref_n is None:
            sys.exit("seeds: --ref-mean needs --ref-std and --ref-n")
        combined["significance"] = dict(reference=dict(mean=args.ref_mean, std=args.ref_std, n=args.ref_n),
                                        **welch_improvement_p([r["val_loss"] for r in runs], args.ref_mean,
                                                              args.ref_std, args.ref_n, args.min_gain))
    path = args.out / "submission.json"
    path.write_text(json.dumps(combined, indent=2) + "\n")
    print(f"seeds: val_bpb mean {bpb_m:.6f} std {bpb_s:.6f} over {len(runs)} seeds -> {path}")
    if "significance" in combined:
        sig = combined["significance"]
        print(f"seeds: Welch one-sided p-value for an improvement >= {args.min_gain} nats: {sig['p_value']:.4g} "
              f"(t={sig['t']:.3f}, df={sig['df']:.1f})")


if __name__ == "__main__":
    main()
