"""The evaluation's ablation table: one artifact scored with each part of the integrated pass off in turn,
all on, the plain round trip (T = 1, no cache, no TTT), and the old eval code (git revision OLD_REV), on
the embedded validation split and on the second held-out text (<corpus>/datasets/heldout2, a package the
model and tokenizer never saw). Every row is a fresh `EVAL_ONLY` run of train_gpt.py with run.sh's
embedded settings; a part's delta = BPB with it off - BPB with everything on (positive: the part helps).

    python3 benchmarks/ablate_eval.py ARTIFACT [--corpus data/embedded/sp1024] [--old-rev 5633f8d] [--out FILE]
    python3 benchmarks/ablate_eval.py ARTIFACT --sweep TTT_STEPS=3,TTT_LR=0.01 ...   (one row per setting set)
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "5633f8d"  # the eval code before issue 11 (unsmoothed cache, T = 0.98, one Polyak LoRA step)
ROWS = [  # (name, settings) ; "old" rows run the old code
    ("all on (defaults)", {}),
    ("- n-gram cache", {"NGRAM_ENABLED": "0"}),
    ("- TTT", {"TTT_ENABLED": "0"}),
    ("- learned mixing/temperature", {"EVAL_LEARNED_MIX": "0"}),
    ("plain round trip", {"NGRAM_ENABLED": "0", "TTT_ENABLED": "0", "EVAL_LEARNED_MIX": "0", "TTT_TEMPERATURE": "1"}),
    ("old code, its defaults", {"old": "1"}),
]


def embedded_env() -> dict:
    """The environment after run.sh's embedded_settings (the same shapes the CPU run evaluates with)."""
    script = f'source <(sed -n "/^embedded_settings()/,/^}}/p" {ROOT / "run.sh"}); embedded_settings; env -0'
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def score(code: Path, artifact: Path, data: Path, tokenizer: Path, settings: dict, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_env = {**env, **settings, "EVAL_ONLY": str(artifact), "DATA_PATH": str(data),
                   "TOKENIZER_PATH": str(tokenizer), "OUTPUT_DIR": tmp, "RUN_ID": "ablate", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, str(code)], env=run_env, capture_output=True, text=True, cwd=tmp)
    if r.returncode != 0:
        raise SystemExit(f"ablate_eval: {code.name} {settings} failed:\n{r.stderr[-3000:]}")
    bpb = float(re.search(r"^final_integrated_exact val_loss:\S+ val_bpb:(\S+)$", r.stdout, re.M)[1])
    ms = float(re.search(r"^final_integrated .*eval_time:(\d+)ms", r.stdout, re.M)[1])
    parts = re.search(r"^integrated_parts: (.*)$", r.stdout, re.M)[1]
    phases = re.search(r"^integrated_phases: (.*)$", r.stdout, re.M)[1]  # seconds per phase of the pass
    return dict(bpb=bpb, seconds=ms / 1000, parts=f"{parts} | {phases}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "embedded" / "sp1024")
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--jobs", type=int, default=1, help="evaluations run at the same time")
    ap.add_argument("--texts", default="val,heldout2", help="which of val,heldout2 to score")
    ap.add_argument("--sweep", nargs="+", help="score these comma-separated NAME=VALUE sets instead of the table")
    args = ap.parse_args()
    args.corpus = args.corpus.resolve()
    rows = [(s, dict(kv.split("=", 1) for kv in s.split(","))) for s in args.sweep] if args.sweep else ROWS
    texts = {"val": args.corpus / "datasets" / "fineweb10B_sp1024", "heldout2": args.corpus / "datasets" / "heldout2"}
    texts = {k: v for k, v in texts.items() if k in args.texts.split(",")}
    tokenizer = args.corpus / "tokenizers" / "fineweb_1024_bpe.model"
    for path in (args.artifact, tokenizer, *texts.values()):
        if not path.exists():
            raise SystemExit(f"ablate_eval: {path} does not exist (build the corpus with tools/embedded_corpus.py)")
    env = {**os.environ, **embedded_env()}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "train_gpt_old.py"
        old.write_bytes(subprocess.run(["git", "show", f"{args.old_rev}:train_gpt.py"], cwd=ROOT, check=True,
                                       capture_output=True).stdout)
        def one(job):
            (name, settings), (text, data) = job
            code = old if settings.get("old") else ROOT / "train_gpt.py"
            r = score(code, args.artifact.resolve(), data, tokenizer, {k: v for k, v in settings.items() if k != "old"}, env)
            print(f"  {name:34s} {text:9s} {r['bpb']:.6f} {r['seconds']:.1f}s ({r['parts']})", flush=True)
            return (name, text), r
        jobs = [(row, t) for row in rows for t in texts.items()]
        with ThreadPoolExecutor(args.jobs) as pool:  # each job is its own process
            res = dict(pool.map(one, jobs))
    if args.sweep:
        model_only = lambda r: re.search(r"model_only_bpb:(\S+)", r["parts"])[1]
        lines = [f"sweep: {n:50s} " + " ".join(f"{t}:{res[n, t]['bpb']:.6f} model_only:{model_only(res[n, t])} "
                                                 f"({res[n, t]['seconds']:.1f}s)" for t in texts) for n, _ in rows]
        print("\n".join(lines))
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return
    lines = [f"ablate_eval: artifact {args.artifact} corpus {args.corpus} old code {args.old_rev}",
             f"{'row':34s} | {'val BPB':>9s} {'delta':>9s} {'eval s':>6s} | {'heldout2':>9s} {'delta':>9s} {'eval s':>6s}"]
    for name, _ in ROWS:
        cells = []
        for text in texts:
            r, base = res[name, text], res[ROWS[0][0], text]
            delta = r["bpb"] - base["bpb"] if name.startswith("-") else float("nan")
            cells.append(f"{r['bpb']:9.6f} {delta:+9.6f} {r['seconds']:6.1f}" if delta == delta else
                         f"{r['bpb']:9.6f} {'':9s} {r['seconds']:6.1f}")
        lines.append(f"{name:34s} | " + " | ".join(cells))
    for text in texts:
        plain = res["plain round trip", text]["bpb"]
        new, old_bpb = res[ROWS[0][0], text]["bpb"], res["old code, its defaults", text]["bpb"]
        lines.append(f"{text}: gain over the plain round trip: new {plain - new:+.6f} BPB, old code {plain - old_bpb:+.6f} BPB")
    lines.append("delta = BPB with the part off - BPB with all on (positive: the part helps)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
