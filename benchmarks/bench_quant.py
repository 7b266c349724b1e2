"""The exporter on a trained model: per matrix and width (QUANT_BITS) the compressed bytes and Hessian-weighted
error; the quantization gap in BPB (same sliding-window eval before and after) for all-int4/5/6 and for the
widths the allocator picks under several caps; the storage choices measured (codes packed vs one per byte,
xz vs raw LZMA2 streams, one stream per matrix vs one stream); and the export time.

    python3 benchmarks/bench_quant.py [--run-dir .]

Reads <run-dir>/final_model.pt (the full-precision checkpoint a run leaves) and the configuration from
<run-dir>/logs/<run>.txt, and the data that run used (the embedded corpus for ./run.sh on a CPU).
"""
import argparse
import json
import lzma
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
                    names = {f.name for f in tg.fields(tg.Hyperparameters)}
                    return tg.Hyperparameters(**{k: v for k, v in cfg.items() if k in names})
    sys.exit(f"bench_quant: no run log with a config line in {run_dir / 'logs'}")


def sliding_bpb(tensors, hp, val, luts, d) -> float:
    m = tg.GPT(hp)
    tg.load_unbanked_state_dict(m, tensors)
    return tg.evaluate(m, val, luts, hp, d, tg.RunLog(None), use_ngram=False, use_ttt=False).model_bpb


def storage_choices(q: dict) -> None:
    """Per width, all matrices: codes packed (b bits each) vs one per byte; xz vs raw LZMA2 per stream; one
    stream per matrix vs one stream for all."""
    raw = lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": tg.LZMA_PRESET}])
    xz = lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=tg.LZMA_PRESET)
    for b in sorted(next(iter(q["matrices"].values()))):
        per_byte, packed, blobs = 0, 0, []
        for name, c in q["matrices"].items():
            (metas, stream), shape = c[b][0], c[b][0][0][0]["shape"]
            data, n = lzma.decompress(stream), shape[0] * shape[1]
            nc = -(-n // tg._codes_per_byte(b))
            u = (tg.unpack_codes(data[:nc], n, b).to(torch.int16) + 2 ** (b - 1) - 1).numpy().astype(np.uint8)
            scales = data[nc:]
            bits = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :b].reshape(-1)
            per_byte += len(xz(u.tobytes() + scales))
            packed += len(xz(np.packbits(bits, bitorder="little").tobytes() + scales))
            blobs.append(data)
        sep_xz = sum(len(c[b][0][1]) for c in q["matrices"].values())
        sep_raw = sum(len(raw(x)) for x in blobs)
        one = len(xz(b"".join(blobs)))
        print(f"int{b}: codes one per byte {per_byte} vs bit-packed {packed} bytes ({packed / per_byte - 1:+.1%}); "
              f"as stored ({'packed' if tg._codes_per_byte(b) > 1 else 'one per byte'}): {len(blobs)} xz streams "
              f"{sep_xz} vs raw LZMA2 {sep_raw} (+{(sep_xz - sep_raw) / len(blobs):.0f} bytes/stream) vs one xz "
              f"stream for all {one} ({sep_xz - one:+d})")


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
          f"{hp.gptq_n_samples} x {hp.train_seq_len} calibration tokens, clip levels {hp.gptq_clip_levels}, "
          f"widths {hp.quant_bits}, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    H = tg.collect_hessians(model, hp, d)
    print(f"calibration: {time.perf_counter() - t0:.2f}s")
    t0 = time.perf_counter()
    q = tg.quantize_model(tg.unbanked_state_dict(model), H, hp, d)
    print(f"GPTQ + LZMA of every width (one process): {time.perf_counter() - t0:.2f}s")
    widths = hp.bit_widths()
    print(f"{'matrix':28s} {'shape':>12s} " + " ".join(f"{'int%d bytes' % b:>11s} {'int%d H-err' % b:>11s}" for b in widths))
    for name, c in q["matrices"].items():
        print(f"{name:28s} {str(tuple(c[5][0][0][0]['shape'])):>12s} "
              + " ".join(f"{len(c[b][0][1]):11d} {c[b][1]:11.4e}" for b in widths))
    storage_choices(q)
    header = dict(config={k: getattr(hp, k) for k in tg.MODEL_FIELDS}, code_sha256="", tokenizer_sha256="")
    sizes = {b: len(tg.pack_artifact(header, [q["rest"]] + [c[b][0] for c in q["matrices"].values()])) for b in widths}
    pre = sliding_bpb(tg.unbanked_state_dict(model), hp, val, luts, d)
    print(f"sliding-window val_bpb before quantization: {pre:.4f}")
    code = len((ROOT / "train_gpt.py").read_bytes())
    caps = {"all-int4": sizes[4], "between all-int4 and all-int5": (sizes[4] + sizes[5]) // 2, "all-int5": sizes[5],
            f"ARTIFACT_SIZE_CAP - SIZE_MARGIN_BYTES - code ({code})": hp.artifact_size_cap - hp.size_margin_bytes - code}
    out = Path("/tmp") / "bench_quant_artifact.bin"
    for label, cap in caps.items():
        lines = []
        size = tg.write_artifact(q, header, cap, out, lines.append)
        _, tensors = tg.read_artifact(out)
        chosen = lines[-1].split("quant_alloc: ")[1]
        post = sliding_bpb(tensors, hp, val, luts, d)
        print(f"cap {label}: {cap} bytes -> artifact {size} bytes; {chosen}; val_bpb {post:.4f} (gap {post - pre:+.4f})")


if __name__ == "__main__":
    main()
