"""Shared fixtures: the embedded corpus (built once per session) and tiny configurations."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(
    num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, mlp_mult=2.0,
    bigram_vocab_size=256, bigram_dim=16, ve_dim=16, xsa_last_n=2, ve_last_n=2,
    train_seq_len=64, train_batch_tokens=8 * 64 * 2, iterations=6, max_wallclock_seconds=0.0,
    warmup_steps=0, train_log_every=2, val_loss_every=0, val_batch_tokens=64 * 16,
    gptq_n_samples=8, gptq_block_size=32, eval_seq_len=64, eval_stride=16, eval_batch_seqs=8,
    ttt_chunk_tokens=1024, ngram_audit_positions=8, muon_momentum_warmup_steps=10, swa_every=2,
    eval_mode="sliding",  # the sliding-mode tests and verify's broken copies need it whatever the default; doc mode's use doc_hp
)


def tiny_hp(**overrides) -> "tg.Hyperparameters":
    """A small configuration with every component active (4 layers: 2 encoder, XSA/VE on the last 2)."""
    hp = tg.Hyperparameters(**{**TINY, **overrides})
    hp.validate()
    return hp


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The embedded corpus built by tools/embedded_corpus.py, as run.sh builds it."""
    out = tmp_path_factory.mktemp("embedded")
    subprocess.run([sys.executable, str(ROOT / "tools" / "embedded_corpus.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def corpus_env(corpus) -> dict:
    """Environment variables pointing train_gpt.py at the embedded corpus with the tiny configuration."""
    env = {k.upper(): str(v) for k, v in TINY.items()}
    env.update(DATA_PATH=str(corpus / "datasets" / "fineweb10B_sp1024"),
               TOKENIZER_PATH=str(corpus / "tokenizers" / "fineweb_1024_bpe.model"))
    return env


@pytest.fixture(scope="session")
def sp(corpus):
    return tg.load_tokenizer(str(corpus / "tokenizers" / "fineweb_1024_bpe.model"), 1024)


def run_script(env_overrides: dict, tmp_path: Path, nproc: int = 1, timeout: int = 600):
    """Run train_gpt.py as a subprocess (optionally under torchrun with gloo); returns CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"OUTPUT_DIR": str(tmp_path), "RUN_ID": "test", "OMP_NUM_THREADS": "1"})
    env.update(env_overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_gpt.py")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))


def replace(hp, **kw):
    return dataclasses.replace(hp, **kw)
