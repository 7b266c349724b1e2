"""Training-only paired ablation (issue 21 item 0): raw and averaged weights of short step-based runs.

    python3 benchmarks/gap_train.py [--steps 150] [--seeds 1337 42] [--configs default,no_qat,...] [--set K=V ...]

The CPU shape of run.sh's embedded_settings (via ablate_train.embedded_env), step-based (MAX_WALLCLOCK_SECONDS=0),
one thread, one run at a time in this process. Each run is train_gpt's own setup and `train_model` loop; no export,
GPTQ, TTT or n-gram cache. Per run it scores, with train_gpt's contiguous evaluator (`eval_val_loss`, TRAIN_SEQ_LEN
windows), the raw weights at the last step and the final (EMA/SWA) weights, on the val split and on heldout2.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402
import train_gpt as tg  # noqa: E402
from ablate_train import embedded_env  # noqa: E402

CONFIGS = {
    "default": {},
    "no_qat": {"LATE_QAT_FRAC": "1"},
    "const_lr_no_qat": {"WARMDOWN_FRAC": "1e-9", "LATE_QAT_FRAC": "1"},  # the seed's wall-clock schedule, never reached
    "seed_proj_init": {"EMBED_PROJ_INIT": "orthogonal"},
    # + PR #850's optimizer for the two projections: Muon at the encoder LR (train_gpt's EMBED_PROJ_MUON; the
    # 150-step rows of logs/ablate_train_gap_20261203.txt used an equivalent harness-side step, outside the clip norm)
    "seed_proj_muon": {"EMBED_PROJ_INIT": "orthogonal", "EMBED_PROJ_MUON": "1"},
    "proj_muon": {"EMBED_PROJ_MUON": "1"},
}
METRICS = ("raw_val", "final_val", "raw_h2", "final_h2")


def run_one(base: dict, name: str, seed: int, steps: int, texts: dict, luts) -> dict:
    env = {**base, **CONFIGS[name], "SEED": str(seed), "ITERATIONS": str(steps), "MAX_WALLCLOCK_SECONDS": "0",
           "VAL_LOSS_EVERY": "0"}
    hp = tg.Hyperparameters.from_env(env)
    d = tg.Dist()
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    trainer = tg.Trainer(hp, d, model, model, *tg.build_optimizers(model, hp, d))
    raw, apply_final = {}, tg.WeightAverager.apply_final

    def capture(self):
        raw["sd"] = copy.deepcopy(model.state_dict())
        return apply_final(self)
    tg.WeightAverager.apply_final = capture
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tg.train_model(trainer, texts["val"], luts, tg.RunLog(Path(tmp) / "log.txt"))
    finally:
        tg.WeightAverager.apply_final = apply_final
    r = dict(config=name, seed=seed, steps=steps, train_s=round(time.time() - t0, 1))
    for text, tokens in texts.items():
        r[f"final_{text}"] = tg.eval_val_loss(model, tokens, luts, hp, d)[1]
    model.load_state_dict(raw["sd"])
    for text, tokens in texts.items():
        r[f"raw_{text}"] = tg.eval_val_loss(model, tokens, luts, hp, d)[1]
    print(f"gap_train: done {json.dumps(r)}", flush=True)
    return r


def table(results: list, seeds: list) -> str:
    by = {}
    for r in results:
        by.setdefault(r["config"], {})[r["seed"]] = r
    ref, lines = by.get("default"), []
    for key in METRICS:
        lines.append(f"\n{key} BPB (delta = mean over seeds of config - default at the same seed; negative = better)")
        lines.append(f"{'config':<18}" + "".join(f"{'seed ' + str(s):>11}" for s in seeds) + f"{'mean':>9}{'delta':>9}")
        for name, rs in by.items():
            vals = [rs[s][key] for s in seeds if s in rs]
            paired = [rs[s][key] - ref[s][key] for s in seeds if s in rs and ref and s in ref]
            lines.append(f"{name:<18}" + "".join(f"{rs[s][key]:>11.4f}" if s in rs else f"{'-':>11}" for s in seeds)
                         + f"{statistics.mean(vals):>9.4f}" + (f"{statistics.mean(paired):>+9.4f}" if paired else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    ap.add_argument("--table-from", default="", help="tabulate the `done` lines of an earlier log")
    args = ap.parse_args()
    if args.table_from:
        rs = [json.loads(l.split("done ", 1)[1]) for l in Path(args.table_from).read_text().splitlines()
              if l.startswith("gap_train: done ")]
        print(table(rs, args.seeds))
        return
    torch.set_num_threads(1)
    base = embedded_env()
    base.update(TRAIN_LOG_EVERY="50")
    base.update(item.split("=", 1) for item in args.set)
    print("gap_train: settings " + " ".join(f"{k}={base[k]}" for k in sorted(base) if k.isupper()
                                             and k in {f.name.upper() for f in tg.fields(tg.Hyperparameters)}), flush=True)
    hp = tg.Hyperparameters.from_env(base)
    luts = tg.build_byte_luts(tg.load_tokenizer(hp.tokenizer_path, hp.vocab_size), hp.vocab_size)
    texts = {"val": tg.load_validation_tokens(hp.data_path, hp.vocab_size),
             "h2": tg.load_validation_tokens(str(Path(hp.data_path).parent / "heldout2"), hp.vocab_size)}
    results = [run_one(base, name, seed, args.steps, texts, luts) for seed in args.seeds
               for name in args.configs.split(",")]
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
