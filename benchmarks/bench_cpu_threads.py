"""CPU s/step of the run.sh embedded shape for two copies of train_gpt.py (old/new) at OMP_NUM_THREADS.

    cp <old> /tmp/cmp/old_train_gpt.py; cp train_gpt.py /tmp/cmp/new_train_gpt.py
    OMP_NUM_THREADS=1 python3 benchmarks/bench_cpu_threads.py old new
"""
import sys, time, importlib.util, torch
import os; torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
def load(p, name):
    s = importlib.util.spec_from_file_location(name, p); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); return m
D = "/work/main/data/embedded/datasets/fineweb10B_sp1024"
cfg = dict(num_layers=6, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8, xsa_last_n=2, bigram_vocab_size=2048,
           bigram_dim=64, ve_dim=64, train_seq_len=256, train_batch_tokens=16384, data_path=D, warmup_steps=0)
for name in sys.argv[1:]:
    tg = load(f"/tmp/cmp/{name}_train_gpt.py", name)
    hp = tg.Hyperparameters(**cfg); torch.manual_seed(0)
    d = tg.Dist(); model = tg.GPT(hp); muon, adam, rep = tg.build_optimizers(model, hp, d)
    tr = tg.Trainer(hp, d, model, model, muon, adam, rep)
    loader = tg.DistributedTokenLoader(D, d, 1024); counter = tg.BigramCounter(1024, 0.5, d.device)
    tr.step(loader, counter, 1.0, 0.95, False)
    t0 = time.perf_counter()
    for _ in range(3): tr.step(loader, counter, 1.0, 0.95, False)
    print(name, f"{(time.perf_counter() - t0) / 3:.2f} s/step (threads:{torch.get_num_threads()}, 6x128, 16384 tokens)", flush=True)
