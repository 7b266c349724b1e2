"""GPTQ vs round-to-nearest on a trained model: per-layer Hessian-weighted error, the quantization gap in
BPB (same sliding-window eval before and after), compressed bytes of the int5 matrices vs their order-0
entropy bound, and GPTQ time.

    python3 benchmarks/bench_quant.py [--run-dir .]

Reads <run-dir>/final_model.pt (the full-precision checkpoint a run leaves) and the configuration from
<run-dir>/logs/<run>.txt, and the data that run used (the embedded corpus for ./run.sh on a CPU).
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def run_config(run_dir: Path) -> tg.Hyperparameters:
    logs = sorted((run_dir / "logs").glob("*.txt"), key=lambda p: p.stat().st_mtime)
    for log in reversed(logs):
        for line in log.read_text(errors="replace").splitlines()[:5]:
            if line.startswith("config: "):
                cfg = json.loads(line[len("config: "):])
                if not cfg.get("eval_only"):
                    return tg.Hyperparameters(**cfg)
    sys.exit(f"bench_quant: no run log with a config line in {run_dir / 'logs'}")


def order0_bytes(values: np.ndarray) -> float:
    p = np.bincount(values, minlength=31) / values.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * values.size / 8)


def sliding_bpb(model, val, luts, hp, d) -> float:
    r = tg.evaluate(model, val, luts, hp, d, tg.RunLog(None), 1.0, use_ngram=False, use_ttt=False)
    return r.model_bpb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, default=Path("."))
    args = ap.parse_args()
    hp = run_config(args.run_dir)
    d = tg.Dist()
    model = tg.GPT(hp)
    model.load_state_dict(torch.load(args.run_dir / "final_model.pt", map_location="cpu"))
    sp = tg.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    luts = tg.build_byte_luts(sp, hp.vocab_size)
    val = tg.load_validation_tokens(hp.data_path, hp.vocab_size)
    print(f"bench_quant: model {hp.num_layers}x{hp.model_dim} from {args.run_dir / 'final_model.pt'}, data {hp.data_label}, "
          f"{hp.gptq_n_samples} x {hp.train_seq_len} calibration tokens, clip levels {hp.gptq_clip_levels}")
    t0 = time.perf_counter()
    H = tg.collect_hessians(model, hp, d)
    print(f"calibration: {time.perf_counter() - t0:.2f}s")
    sd = tg.unbanked_state_dict(model)
    gptq_s, tot = 0.0, {"gptq": 0.0, "rtn": 0.0}
    entries = {"gptq": {}, "rtn": {}}
    print(f"{'matrix':28s} {'shape':>12s} {'H-err GPTQ':>12s} {'H-err RTN':>12s} {'ratio':>6s} {'time':>6s}")
    for name, W in sd.items():
        key = name[:-len(".weight")]
        if key not in H:
            entries["gptq"][name] = entries["rtn"][name] = tg.quantize_tensor(name, W, None, False, hp)
            continue
        Wp = tg.prune_smallest(W.float(), hp.prune_pct)
        t0 = time.perf_counter()
        Q, s = tg.gptq_quantize(Wp, H[key], 5, hp.gptq_block_size, hp.gptq_percdamp, hp.clip_levels())
        dt = time.perf_counter() - t0
        gptq_s += dt
        Qr, sr = tg.quantize_rtn(Wp, 5)
        eg = tg.hessian_weighted_error(W.float(), tg.dequantize(Q, s), H[key]).sum().item()
        er = tg.hessian_weighted_error(W.float(), tg.dequantize(Qr, sr), H[key]).sum().item()
        tot["gptq"] += eg
        tot["rtn"] += er
        entries["gptq"][name] = dict(kind="int5", q=Q, scale=s, gptq=True)
        entries["rtn"][name] = dict(kind="int5", q=Qr, scale=sr, gptq=False)
        print(f"{key:28s} {str(tuple(W.shape)):>12s} {eg:12.4e} {er:12.4e} {eg / er:6.3f} {dt:5.2f}s")
    print(f"total H-weighted error: GPTQ {tot['gptq']:.4e} RTN {tot['rtn']:.4e} ratio {tot['gptq'] / tot['rtn']:.3f}; "
          f"GPTQ time {gptq_s:.1f}s (one process)")
    pre = sliding_bpb(model, val, luts, hp, d)
    print(f"sliding-window val_bpb before quantization: {pre:.4f}")
    for method in ("gptq", "rtn"):
        m = tg.GPT(hp)
        tg.load_unbanked_state_dict(m, {k: tg.entry_to_tensor(e) for k, e in entries[method].items()})
        post = sliding_bpb(m, val, luts, hp, d)
        print(f"quant gap {method.upper():4s}: val_bpb {post:.4f} (gap {post - pre:+.4f})")
    ints = [e["q"] for e in entries["gptq"].values() if e["kind"] == "int5"]
    values = np.concatenate([(q.reshape(-1).to(torch.int16) + tg.INT5_QMAX).numpy() for q in ints]).astype(np.uint8)
    bound = order0_bytes(values)
    only_int5 = {k: e for k, e in entries["gptq"].items() if e["kind"] == "int5"}
    raw = {"bytes": values.tobytes(), "bits5": b"".join(tg.pack_int5(q) for q in ints)}
    for packing in ("bytes", "bits5"):
        with_scales = len(tg.compress(tg.serialize_artifact(only_int5, {}, packing), tg.LZMA_MAX_PARTS))
        size = len(tg.compress(raw[packing], tg.LZMA_MAX_PARTS))
        print(f"int5 values, packing {packing:5s}: {size} bytes compressed vs order-0 entropy bound {bound:.0f} "
              f"({size / bound:.3f}x; {values.size} values, {8 * bound / values.size:.3f} bits/value); "
              f"with header and fp16 row scales {with_scales} bytes")


if __name__ == "__main__":
    main()
