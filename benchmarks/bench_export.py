"""Export time with 1 and with several processes: GPTQ at every width + LZMA of every candidate, spread over
the ranks (q/k/v of a layer together), one gather, the width allocation and the write on rank 0.

    python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/bench_export.py [--layers 6 --dim 256]

Needs the embedded corpus (./run.sh builds it in data/embedded/sp1024) for the calibration sequences. The weights
are the random init plus noise: the time depends on the shapes, not on training.
"""
import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--data", default=str(ROOT / "data" / "embedded" / "sp1024"))
    args = ap.parse_args()
    hp = tg.Hyperparameters(num_layers=args.layers, model_dim=args.dim, num_heads=4, num_kv_heads=2, rope_dims=8,
                            train_seq_len=256, gptq_n_samples=32, eval_batch_seqs=8,
                            data_path=f"{args.data}/datasets/fineweb10B_sp1024",
                            tokenizer_path=f"{args.data}/tokenizers/fineweb_1024_bpe.model")
    hp.validate()
    d = tg.init_distributed()
    torch.manual_seed(0)
    model = tg.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tg.barrier()
    t0 = time.perf_counter()
    H = tg.collect_hessians(model, hp, d)
    t1 = time.perf_counter()
    q = tg.quantize_model(tg.unbanked_state_dict(model), H, hp, d)
    t2 = time.perf_counter()
    if d.is_main:
        header = dict(config={k: getattr(hp, k) for k in tg.MODEL_FIELDS}, code_sha256="", tokenizer_sha256="")
        size = tg.write_artifact(q, header, hp.artifact_size_cap, Path("/tmp/bench_export_artifact.bin"), lambda l: None)
    t3 = time.perf_counter()
    tg.barrier()
    if d.is_main:
        print(f"bench_export: {hp.num_layers}x{hp.model_dim} model, widths {hp.quant_bits}, clip levels "
              f"{hp.gptq_clip_levels}, {d.world_size} process(es), {os.cpu_count()} cores, torch threads "
              f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}: calibration {t1 - t0:.2f}s, "
              f"GPTQ + LZMA + gather {t2 - t1:.2f}s, allocation + write {t3 - t2:.2f}s ({size} bytes)")
    if dist_on():
        torch.distributed.destroy_process_group()


def dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


if __name__ == "__main__":
    main()
