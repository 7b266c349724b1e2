"""train_gpt.py: an 11-layer GPT for the parameter-golf contest, trained, exported and evaluated in one file.

Run (8 GPUs, real data):   torchrun --standalone --nproc_per_node=8 train_gpt.py
Run (anywhere, no data):   ./run.sh  (builds an embedded corpus and runs a small configuration on the CPU)
Reproduce from an artifact: EVAL_ONLY=final_model.gptq.xz torchrun --standalone --nproc_per_node=8 train_gpt.py

What it does, in data-flow order: read the tokenized FineWeb shards; train the model for at most
MAX_WALLCLOCK_SECONDS with banked Parallel Muon + AdamW, EMA/SWA and late QAT; collect GPTQ Hessians from
training data and quantize every block matrix by GPTQ to int4, int5 or int6, the widths chosen to fit the
cap (inside the same budget); write an LZMA-compressed, self-describing artifact whose bytes plus this file's
bytes must stay under 16,000,000; rebuild the model from that file alone and score the validation split in one
causal pass that mixes the model with an exact n-gram cache of the text already scored (optionally adapting LoRA
weights on it, or scoring each document from its own BOS).

Rules kept at evaluation (the contest's validity conditions):
  C1 causal       the prediction for token t uses only the artifact and tokens < t;
  C2 normalized   the mixed n-gram/model prediction is a full distribution over the vocabulary, summing to 1;
  C3 score first  n-gram counts and LoRA weights learn from a chunk only after that chunk is scored;
  C4 one pass     every validation target is scored exactly once, left to right.
"""

# ==================== Imports ========================================================================

import base64, collections, contextlib, copy, dataclasses, datetime, glob, hashlib, io, json, lzma, math, os, platform
import shutil, signal, struct, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch._dynamo  # noqa: F401  loaded before init_process_group: if it is first imported later (by
# torch.optim) it keeps the gloo process group alive past destroy_process_group and can abort at exit
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

try:  # FlashAttention-3 is optional (see configure_attention)
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:
    _fa3_func = None

class GolfError(Exception):
    """A failure the user can fix (bad setting, missing or corrupt file, over the cap, over budget)."""


# ==================== Hyperparameters ================================================================
# One typed settings object. Every field is read from the environment variable of the same name in upper
# case (NUM_LAYERS, XSA_LAST_N, ...) by `Hyperparameters.from_env`, called inside main(); tests construct
# it directly. The defaults are the submitted run: reproducing needs only `SEED=... torchrun ...`.

@dataclass(frozen=True)
class Hyperparameters:
    # --- data and run bookkeeping ---
    vocab_size: int = 1024                # 1024 (the official download), 4096 or 8192 (README "Data")
    data_path: str = ""                   # empty: ./data/datasets/fineweb10B_sp{VOCAB_SIZE}
    tokenizer_path: str = ""              # empty: ./data/tokenizers/fineweb_{VOCAB_SIZE}_bpe.model
    seed: int = 1337
    dist_timeout_seconds: float = 300.0   # a collective waiting longer than this ends the run (a rank died)
    run_id: str = ""                      # empty: derived from the start time and SEED
    output_dir: str = "."                 # final_model.pt, final_model.gptq.xz, submission.json, logs/
    submission_author: str = ""           # submission.json's author; empty: git config user.name
    github_id: str = ""                   # submission.json's github_id; empty: git config github.user
    data_label: str = ""                  # what the data is (log, submission.json); empty: fineweb10B_sp{VOCAB_SIZE}
    # --- model (README "Model") ---
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    rope_dims: int = 16
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    embed_proj_init: str = "orthogonal"   # PR #850: BigramHash table 0, both projections orth/sqrt(2L) | zero
    embed_proj_muon: bool = True          # BigramHash / VE projections in Muon at MATRIX_LR_ENCODER (PR #850), not AdamW:
    # with the orthogonal start -0.011 val / -0.022 heldout2 BPB, 300 steps x 2 seeds (logs/ablate_train_gap300_20261203.txt)
    bigram_vocab_size: int = 4096
    bigram_dim: int = 128
    ve_dim: int = 128
    ve_last_n: int = 2
    xsa_last_n: int = 4
    smear_gate: bool = True               # component switches (ablations): 0 removes the part and its params
    gated_attn: bool = True
    value_residual: bool = True
    unet_skips: bool = True
    num_loops: int = 0                    # depth recurrence (PR #1204, #1493): extra passes (0 = off) over the layers
    loop_start: int = 3                   # LOOP_START..LOOP_END (inclusive), sharing their weights
    loop_end: int = 5
    enable_looping_at: float = 0.35       # fraction of the training budget after which the loop runs (PR #1420)
    parallel_start_layer: int = 0         # GPT-J-style parallel attention + MLP from this layer on (PR #1204); 0 = off
    smear_gate_bos_fix: bool = False      # SmearGate mixes nothing into a BOS position (PR #1797)
    attn_gate_inputs: int = 0             # 0: dense attention gate (all MODEL_DIM inputs); N: sparse, the first N (PR #1787)
    # --- training (README "Training") ---
    iterations: int = 20000               # step cap; the step count itself when MAX_WALLCLOCK_SECONDS=0
    train_seq_len: int = 2048
    train_batch_tokens: int = 786432      # global, independent of WORLD_SIZE
    max_wallclock_seconds: float = 600.0  # 0 = step-based run (deterministic schedules from the step count)
    export_reserve_seconds: float = 10.0  # floor of the time kept for calibration + export (measured: BudgetPlan)
    warmup_steps: int = 20                # compile warm-up steps, undone before the clock starts
    warmdown_frac: float = 0.25           # WSD: constant LR, then a cosine to zero over this last fraction
    matrix_lr_encoder: float = 0.025      # Muon LR of the first NUM_LAYERS // 2 blocks
    matrix_lr_decoder: float = 0.05       # Muon LR of the remaining blocks
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    embed_lr: float = 0.035
    scalar_lr: float = 0.025
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.04
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.997
    swa_every: int = 50
    swa_lr_threshold: float = 0.2
    swa_weight: float = 0.3
    late_qat_frac: float = 0.85
    attn_backend: str = "auto"            # auto|fa3|cudnn|flash|efficient|math (configure_attention, bench_train.py)
    complement_alpha: float = 0.5
    val_loss_every: int = 4000            # 0 = only at the end
    val_batch_tokens: int = 524288
    train_log_every: int = 100
    # --- export (README "Export") ---
    gptq_n_samples: int = 256
    gptq_block_size: int = 128
    gptq_percdamp: float = 0.01
    gptq_clip_levels: str = "1.0,0.96,0.92,0.88,0.84"
    quant_bits: str = "4,5,6"             # widths a block matrix may get; int5 (late QAT's grid) is the start
    embed_bits: int = 8                   # the tied embedding's start and widest width (GPTQ); it may go 2 lower
    artifact_size_cap: int = 16_000_000
    size_margin_bytes: int = 2048         # left under the cap: room to fix a comment in the code after a run
    # --- evaluation (README "Evaluation") ---
    eval_only: str = ""                   # path of an artifact: skip training, evaluate it
    eval_mode: str = "sliding"            # sliding: one stream of sliding windows | doc: each document from its BOS;
    # doc scored 0.25-0.41 BPB better on the embedded texts (logs/ablate_eval_20261204_*), but its rows would idle ~30x
    # at these settings on FineWeb (benchmarks/bench_doc_batching.py): not the default until it batches better
    doc_chunk_tokens: int = 64            # doc mode: targets per score-then-adapt chunk of a document
    ngram_doc_local: bool = True          # doc mode: the cache also holds the target's own document's scored chunks
    phased_ttt_num_phases: int = 0        # doc mode: global SGD phases on the documents already scored (0: off)
    phased_ttt_prefix_docs: int = 0       # the phases split the first this many documents
    phased_ttt_lr: float = 0.001
    phased_ttt_steps: int = 1             # SGD steps of the block matrices per phase
    eval_seq_len: int = 2048
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    eval_budget_seconds: float = 600.0
    eval_dump_path: str = ""              # .npz of per-target arrays for audits
    eval_audit_path: str = ""             # .npy of target positions whose full distributions the dump holds
    eval_learned_mix: bool = True         # fit the n-gram escape weights and temperature on scored chunks
    ttt_enabled: bool = False             # off: cost 0.013-0.030 BPB, 2 artifacts x 2 texts (logs/ablate_eval_20261203_*)
    ttt_chunk_tokens: int = 65536
    ttt_temperature: float = 1.0          # the scoring temperature (the start value when it is learned)
    ttt_lora_rank: int = 8
    ttt_last_n: int = 2
    ttt_lr: float = 0.03                  # chosen by logs/sweep_ttt_eval_20261126.txt (0.003, 0.01, 0.03)
    ttt_steps: int = 3                    # AdamW steps on each chunk after it is scored
    ttt_grad_clip: float = 1.0
    ngram_enabled: bool = True
    ngram_eval_order: int = 9
    ngram_eval_min_order: int = 2
    ngram_audit_positions: int = 64

    def __post_init__(self):  # the data follows the vocabulary unless its paths are given
        V = self.vocab_size
        for name, default in (("data_path", f"./data/datasets/fineweb10B_sp{V}"), ("data_label", f"fineweb10B_sp{V}"),
                              ("tokenizer_path", f"./data/tokenizers/fineweb_{V}_bpe.model")):
            if not getattr(self, name):
                object.__setattr__(self, name, default)

    @classmethod
    def from_env(cls, env, recorded: dict | None = None) -> "Hyperparameters":
        """The settings from the environment; those it does not set come from `recorded` (an artifact's
        EVAL_FIELDS under EVAL_ONLY), then from the defaults."""
        hp = cls(**{**(recorded or {}), **{f.name: _parse_setting(f.name.upper(), env[f.name.upper()], f.type)
                                           for f in fields(cls) if f.name.upper() in env}})
        hp.validate()
        return hp

    num_encoder_layers = property(lambda self: self.num_layers // 2)  # the U-Net's first half
    mlp_hidden = property(lambda self: int(self.mlp_mult * self.model_dim))
    head_dim = property(lambda self: self.model_dim // self.num_heads)
    kv_dim = property(lambda self: self.num_kv_heads * self.head_dim)

    def clip_levels(self) -> tuple:
        return tuple(float(x) for x in self.gptq_clip_levels.split(","))

    def bit_widths(self) -> tuple:
        return tuple(sorted({int(x) for x in self.quant_bits.split(",")}))

    def embed_widths(self) -> tuple:
        return tuple(range(max(2, self.embed_bits - 2), self.embed_bits + 1))

    def validate(self) -> None:
        def need(ok: bool, var: str, why: str) -> None:
            if not ok:
                raise GolfError(f"{var}={getattr(self, var.lower())!r} is invalid: {why}")
        need(self.output_dir.strip() != "", "OUTPUT_DIR", "must name a folder (. for the current one)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (int, float) and f.name != "seed":
                need(value >= 0 and math.isfinite(value), f.name.upper(), "must be a finite number >= 0")
        at_least = dict(num_layers=2, num_heads=1, num_kv_heads=1, ttt_last_n=1, train_seq_len=2, train_batch_tokens=1,
                        dist_timeout_seconds=1, muon_backend_steps=1, swa_every=1, train_log_every=1, gptq_block_size=1,
                        gptq_n_samples=1, iterations=1, eval_seq_len=1, eval_stride=1, ttt_chunk_tokens=1,
                        eval_batch_seqs=1, ttt_steps=1, doc_chunk_tokens=1, phased_ttt_steps=1, ttt_lora_rank=1, ngram_eval_order=2, ngram_eval_min_order=2)
        for var, lo in at_least.items():  # NUM_LAYERS: encoder/decoder halves; NGRAM_EVAL_ORDER: a 1-token context
            need(getattr(self, var) >= lo, var.upper(), f"must be >= {lo}")
        for var in ("complement_alpha", "late_qat_frac", "swa_lr_threshold", "muon_momentum", "swa_weight",
                    "muon_momentum_warmup_start", "adam_beta1", "adam_beta2", "gptq_percdamp", "enable_looping_at"):
            need(getattr(self, var) <= 1, var.upper(), "must be in [0, 1]")
        need(self.ema_decay < 1, "EMA_DECAY", "must be in [0, 1)")
        for var in ("ve_last_n", "xsa_last_n", "ttt_last_n"):
            need(getattr(self, var) <= self.num_layers, var.upper(), "must be <= NUM_LAYERS")
        for var in ("eval_budget_seconds", "ttt_temperature", "qk_gain_init"):
            need(getattr(self, var) > 0, var.upper(), "must be > 0")
        need(2 <= self.vocab_size <= 65536, "VOCAB_SIZE", "must be in 2..65536 (uint16 shards)")
        need(self.model_dim % self.num_heads == 0, "NUM_HEADS", "must divide MODEL_DIM")
        need(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", "must divide NUM_HEADS")
        need(self.head_dim % 2 == 0, "MODEL_DIM", "head dim (MODEL_DIM / NUM_HEADS) must be even")
        need(self.rope_dims % 2 == 0 and self.rope_dims <= self.head_dim, "ROPE_DIMS", "must be even and <= head dim")
        need(self.mlp_hidden >= 1, "MLP_MULT", "MLP hidden width must be >= 1")
        if self.num_loops:
            need(self.loop_end < self.num_layers, "LOOP_END", "must be < NUM_LAYERS (the looped range is inclusive)")
            need(self.loop_start <= self.loop_end, "LOOP_START", "must be <= LOOP_END")
        need(self.parallel_start_layer < self.num_layers, "PARALLEL_START_LAYER", "must be < NUM_LAYERS (0 = off)")
        need(self.attn_gate_inputs <= self.model_dim, "ATTN_GATE_INPUTS", "must be <= MODEL_DIM (0 = dense gate)")
        need(self.gated_attn or not self.attn_gate_inputs, "ATTN_GATE_INPUTS", "needs GATED_ATTN=1 (0 without a gate)")
        need(self.logit_softcap > 0, "LOGIT_SOFTCAP", "must be > 0 (logits are softcap * tanh(z / softcap))")
        need(8 * self.train_seq_len <= self.train_batch_tokens, "TRAIN_SEQ_LEN",
             f"must be <= TRAIN_BATCH_TOKENS / 8 = {self.train_batch_tokens // 8} (one sequence per micro-batch and rank)")
        need(self.bigram_vocab_size != 1, "BIGRAM_VOCAB_SIZE", "need 0 (no BigramHash) or at least 2 buckets")
        need(self.train_batch_tokens % (8 * self.train_seq_len) == 0, "TRAIN_BATCH_TOKENS",
             "must be a positive multiple of 8 * TRAIN_SEQ_LEN (8 micro-batches per step)")
        need(self.max_wallclock_seconds == 0 or self.export_reserve_seconds < self.max_wallclock_seconds,
             "EXPORT_RESERVE_SECONDS", "must be smaller than MAX_WALLCLOCK_SECONDS")
        need(0 < self.warmdown_frac <= 1, "WARMDOWN_FRAC", "must be in (0, 1]")
        need(self.embed_proj_init in ("zero", "orthogonal"), "EMBED_PROJ_INIT", "must be zero or orthogonal")
        need(self.attn_backend in ("auto", "fa3") + SDPA_ORDER, "ATTN_BACKEND", f"must be auto, fa3 or one of {SDPA_ORDER}")
        need(self.val_batch_tokens >= self.train_seq_len, "VAL_BATCH_TOKENS", "must hold one sequence")
        levels, widths = (_parse_list(fn) for fn in (self.clip_levels, self.bit_widths))
        need(1.0 in levels and all(0 < c <= 1 for c in levels), "GPTQ_CLIP_LEVELS",
             "must be a comma list of numbers in (0, 1] including 1.0 (the grid of a row late QAT converged)")
        need(2 <= self.embed_bits <= 8, "EMBED_BITS", "must be in 2..8")
        need(BASE_BITS in widths and all(2 <= b <= 8 for b in widths), "QUANT_BITS",
             f"must be a comma list of widths in 2..8 including {BASE_BITS} (late QAT's grid)")
        need(self.size_margin_bytes < self.artifact_size_cap, "SIZE_MARGIN_BYTES", "must be < ARTIFACT_SIZE_CAP")
        need(self.eval_seq_len % self.eval_stride == 0, "EVAL_STRIDE", "must divide EVAL_SEQ_LEN")
        need(self.eval_mode in ("sliding", "doc"), "EVAL_MODE", "must be sliding or doc")
        need(self.doc_chunk_tokens <= self.eval_seq_len, "DOC_CHUNK_TOKENS", "must be <= EVAL_SEQ_LEN")
        need(self.eval_mode == "doc" or self.phased_ttt_num_phases == 0, "PHASED_TTT_NUM_PHASES",
             "needs EVAL_MODE=doc")
        need(self.phased_ttt_num_phases == 0 or self.phased_ttt_prefix_docs >= self.phased_ttt_num_phases,
             "PHASED_TTT_PREFIX_DOCS", "must be >= PHASED_TTT_NUM_PHASES (a phase ends after a document)")
        need(self.ttt_chunk_tokens % self.eval_seq_len == 0, "TTT_CHUNK_TOKENS",
             "must be a multiple of EVAL_SEQ_LEN (windows and TTT sequences never straddle chunks)")
        need(self.ngram_eval_min_order <= self.ngram_eval_order, "NGRAM_EVAL_MIN_ORDER", "must be <= NGRAM_EVAL_ORDER")
        need(self.ngram_eval_order < 2 ** NGramCache.ORDER_BITS, "NGRAM_EVAL_ORDER",
             f"must be < {2 ** NGramCache.ORDER_BITS} (the order field of the cache keys)")
        need(not self.eval_dump_path or Path(self.eval_dump_path).resolve().parent.is_dir(), "EVAL_DUMP_PATH",
             "its folder must exist")
        need(not self.eval_audit_path or Path(self.eval_audit_path).is_file(), "EVAL_AUDIT_PATH", "no such file")

def _parse_list(parse) -> tuple:
    try:
        return parse()
    except ValueError:
        return ()

def _parse_setting(name: str, text: str, kind: type):
    try:
        if kind is bool:
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return low in ("1", "true", "yes")
        return kind(text.replace("_", "")) if kind is int else kind(text)
    except ValueError:
        raise GolfError(f"{name}={text!r} is not a valid {kind.__name__}") from None

# What an evaluation reads: recorded in the artifact, so that EVAL_ONLY scores it as its run did.
EVAL_FIELDS = ("seed", "eval_mode", "doc_chunk_tokens", "ngram_doc_local", "phased_ttt_num_phases", "phased_ttt_prefix_docs",
               "phased_ttt_lr", "phased_ttt_steps", "eval_seq_len", "eval_stride", "eval_batch_seqs",
               "eval_budget_seconds", "eval_learned_mix",
               "ttt_enabled", "ttt_chunk_tokens", "ttt_temperature", "ttt_lora_rank", "ttt_last_n", "ttt_lr", "ttt_steps",
               "ttt_grad_clip", "ngram_enabled", "ngram_eval_order", "ngram_eval_min_order", "ngram_audit_positions")
# What the artifact must record to rebuild the network.
MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_dims",
                "rope_base", "logit_softcap", "bigram_vocab_size", "bigram_dim", "ve_dim", "ve_last_n",
                "xsa_last_n", "smear_gate", "gated_attn", "value_residual", "unet_skips", "num_loops", "loop_start",
                "loop_end", "parallel_start_layer", "smear_gate_bos_fix", "attn_gate_inputs")


# ==================== Distributed and logging helpers ================================================
# The same file runs as one CPU process, as several CPU processes under torchrun (gloo), and on GPUs
# (NCCL). Every cross-rank reduction goes through `all_reduce`, a no-op for a single process.

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main = property(lambda self: self.rank == 0)
    is_cuda = property(lambda self: self.device.type == "cuda")

def init_distributed(timeout_seconds: float = 300.0) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world_size != 0:
        raise GolfError(f"WORLD_SIZE={world_size} must divide 8 (grad accumulation = 8 / WORLD_SIZE)")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        # A timeout, so a rank that stopped ends the run with a message instead of a silent 30-minute wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds))
    return Dist(rank, world_size, device)

def multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'avg' or 'max'); returns t. No-op for a single process."""
    if multi_process():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}[op])
    return t

def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    if multi_process():
        dist.broadcast(t, src)
    return t

def barrier() -> None:
    if multi_process():
        dist.barrier()

def sync(d: Dist) -> None:
    if d.is_cuda:
        torch.cuda.synchronize(d.device)

class RunLog:
    """Rank-0 `key:value` lines to stdout and logs/<RUN_ID>.txt; an unwritable file (full disk): said, console only."""

    def __init__(self, path: Path | None):
        self.path, self.file_ok = path, True
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console or not self.file_ok:
            print(msg, flush=True)
        try:
            if self.file_ok:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(msg + "\n")
        except OSError as e:
            self.file_ok = False
            print(f"warning: the run log {self.path} cannot be written ({e.strerror or e}); console only from here",
                  file=sys.stderr, flush=True)

def write_atomic(path: Path, data: bytes) -> None:
    """Write <path>.tmp, then rename (never a half-written file); on failure the .tmp goes, the OSError names path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None

def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or scheduler's share), not os.cpu_count()."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

def describe_environment(d: Dist) -> list[str]:
    import sentencepiece
    gpu = torch.cuda.get_device_name(d.device) if d.is_cuda else "none"
    return [f"versions: python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
            f"sentencepiece:{sentencepiece.__version__} fa3:{_fa3_func is not None}",
            f"hardware: device:{d.device.type} gpu:{gpu.replace(' ', '_')} world_size:{d.world_size} "
            f"cpus:{usable_cpus()}/{os.cpu_count()} host:{platform.node()} platform:{platform.platform()}"]


# ==================== Data and BPB accounting ========================================================
# Shards: 256 little-endian int32 header [20240520, 1, N, 0...] then N uint16 tokens; every document is BOS (id 1)
# then its tokens. Every rank reads the same stream and takes its slice, so the global batch does not depend on
# WORLD_SIZE. BPB counts the UTF-8 bytes each target token adds, from three lookup tables of the tokenizer.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
BOS_ID = 1

def check_shard(path: Path) -> int:
    """Validate a shard's header and size (cheap: reads 1 KiB); returns its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_INTS * 4:
        raise GolfError(f"shard {path}: {size} bytes is shorter than the {SHARD_HEADER_INTS * 4}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if (header[0], header[1]) != (SHARD_MAGIC, SHARD_VERSION):
        raise GolfError(f"shard {path}: magic, version {header[0]}, {header[1]} != {SHARD_MAGIC}, {SHARD_VERSION} "
                        f"(not a token shard of this format)")
    n = int(header[2])
    if size != SHARD_HEADER_INTS * 4 + 2 * n:
        raise GolfError(f"shard {path}: header says {n} tokens ({SHARD_HEADER_INTS * 4 + 2 * n} bytes) "
                        f"but the file has {size} bytes (truncated or corrupt)")
    return n

def load_data_shard(path: Path) -> torch.Tensor:
    n = check_shard(path)
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_INTS * 4)
    return torch.from_numpy(tokens.astype(np.int32))

def shard_files(data_path: str, split: str) -> list[Path]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise GolfError(f"DATA_PATH={data_path!r}: no {split} shards matching {pattern} "
                        f"(fetch the data, see README, or run ./run.sh to build the embedded corpus)")
    return files

def check_train_shards(data_path: str, vocab_size: int, d: Dist) -> int:
    """Every train shard's header, size and token range at start-up (split over ranks and threads); token count."""
    files = shard_files(data_path, "train")
    counts = [check_shard(p) for p in files]
    mine = list(range(d.rank, len(files), d.world_size))
    top = torch.full((len(files),), -1.0, dtype=torch.float64)
    scan = lambda i: float(np.memmap(files[i], dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4,
                                     shape=(counts[i],)).max()) if counts[i] else -1.0
    with ThreadPoolExecutor(max(1, min(usable_cpus(), len(mine)))) as pool:
        top[mine] = torch.tensor(list(pool.map(scan, mine)), dtype=torch.float64)
    top = all_reduce(top.to(d.device), "max").cpu()
    for path, m in zip(files, top.tolist()):
        check_token_range(torch.tensor(m), vocab_size, f"train shard {path}")
    return sum(counts)

def load_validation_tokens(data_path: str, vocab_size: int) -> torch.Tensor:
    tokens = torch.cat([load_data_shard(p) for p in shard_files(data_path, "val")])
    if tokens.numel() < 2:
        raise GolfError(f"DATA_PATH={data_path!r}: validation split has {tokens.numel()} tokens")
    check_token_range(tokens, vocab_size, "validation shards")
    return tokens

def check_token_range(tokens: torch.Tensor, vocab_size: int, what: str) -> None:
    top = int(tokens.max())
    if top >= vocab_size:
        raise GolfError(f"{what}: token id {top} >= VOCAB_SIZE={vocab_size} (tokenizer/data mismatch)")

class TokenStream:
    """The train shards in order, forever, the next one read in a thread (ids: check_train_shards at start-up)."""

    def __init__(self, data_path: str):
        self.files, self.file_idx, self.pos = shard_files(data_path, "train"), 0, 0
        self.prefetch = ThreadPoolExecutor(1)  # its thread ends when the stream is garbage-collected
        self.tokens, self.next = self._load(0), self.prefetch.submit(self._load, 1 % len(self.files))

    def _load(self, i: int) -> torch.Tensor:
        return load_data_shard(self.files[i])

    def take(self, n: int) -> torch.Tensor:
        parts = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = self.next.result(), 0  # a bad shard raises here, when it is needed
                self.next = self.prefetch.submit(self._load, (self.file_idx + 1) % len(self.files))
            parts.append(self.tokens[self.pos:self.pos + n])
            self.pos, n = self.pos + parts[-1].numel(), n - parts[-1].numel()
        return torch.cat(parts)

class DistributedTokenLoader:
    """The next global micro-batch plus one token, the same on every rank (every pair of the stream trained on once
    whatever WORLD_SIZE is): this rank's (x, y) and the whole micro-batch (for the complementary loss's bigrams)."""

    def __init__(self, data_path: str, d: Dist):
        self.stream, self.d = TokenStream(data_path), d
        self.carry = self.stream.take(1)

    def next_batch(self, micro_tokens: int, seq_len: int):
        chunk = torch.cat([self.carry, self.stream.take(micro_tokens)])
        self.carry = chunk[-1:]
        if self.d.is_cuda:  # a copy from pageable memory blocks the host; from pinned memory it is async. The
            chunk = chunk.pin_memory()  # pinned-block cache reuses a buffer only once its copy is done
        tokens = chunk.to(self.d.device, non_blocking=True).long()
        n = micro_tokens // self.d.world_size
        local = tokens[self.d.rank * n:(self.d.rank + 1) * n + 1]
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len), tokens

@dataclass
class ByteLUTs:
    base_bytes: torch.Tensor         # (V,) int16: UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: torch.Tensor  # (V,) bool: the piece starts with "▁"
    is_boundary: torch.Tensor        # (V,) bool: control/unknown/unused pieces (BOS...): no space before

    def to(self, device) -> "ByteLUTs":
        return ByteLUTs(*(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary)))

def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    if not Path(path).is_file():
        raise GolfError(f"TOKENIZER_PATH={path!r}: no such file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except (OSError, RuntimeError) as e:
        raise GolfError(f"TOKENIZER_PATH={path!r}: not a SentencePiece model ({e})") from None
    if sp.vocab_size() != vocab_size:
        raise GolfError(f"TOKENIZER_PATH={path!r} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    if sp.piece_to_id("\u2581") == sp.unk_id():
        # Without "▁" as its own piece a lone space is byte-encoded and the byte count silently inflates.
        raise GolfError(f"TOKENIZER_PATH={path!r}: '\u2581' is not a piece of its own")
    return sp

def build_byte_luts(sp, vocab_size: int) -> ByteLUTs:  # the contest's baseline build_sentencepiece_luts
    base = torch.zeros(vocab_size, dtype=torch.int16)
    space, boundary = torch.zeros(vocab_size, dtype=torch.bool), torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                space[i], piece = True, piece[1:]
            base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(base, space, boundary)

def target_bytes(prev: torch.Tensor, tgt: torch.Tensor, luts: ByteLUTs) -> torch.Tensor:
    """Bytes each target adds: its piece, plus a leading "▁"'s space unless it follows a boundary (BOS drops it)."""
    extra = luts.has_leading_space[tgt] & ~luts.is_boundary[prev]
    return luts.base_bytes[tgt].to(torch.int64) + extra.to(torch.int64)

def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    return nll_nats / math.log(2.0) / n_bytes if n_bytes else math.nan  # a chunk of BOS targets only has 0 bytes


# ==================== Model ==========================================================================
# README "Model". The block matrices (q/out, k/v, MLP up, MLP down) live in four contiguous 3-D parameter banks
# owned by the GPT, so that Parallel Muon can shard whole matrices across ranks. Blocks receive 2-D views
# of the banks and apply them through `MatrixSlot`s: parameter-free modules whose forward hooks see each
# matrix's input (GPTQ Hessians) and which can carry a LoRA adapter (test-time training).

ATTN_GATE_BIAS = 4.0      # sigmoid(4) ~ 0.982: gated attention starts almost open
LEAKY_SLOPE = 0.9         # LeakyReLU^2: PR #493, PR #518 (in PR #549); slope 0.9: PR #850
BASE_BITS = 5             # late QAT's grid and the export's start width (int5: PR #286 MLP, PR #850 all blocks)

def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a weight; the reduction in float32 whatever the activations' dtype."""
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)

def int_row_scale(W: torch.Tensor, qmax: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-row symmetric scale clip*max|W_row|/qmax, rounded to fp16 (as stored) and returned as float32.
    An all-zero row gets scale 1 (its integers are 0). No floor: real rows have entries ~0.02-0.1."""
    amax = W.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = (amax * clip / qmax).half().float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))

def row_grid_scale(W: torch.Tensor, qmax: int, clip_levels: tuple = (1.0,)) -> torch.Tensor:
    """A row's grid in late QAT and `quantize_rtn`: of the scales clip * max|row| / qmax (clip in GPTQ_CLIP_LEVELS),
    the one with the smallest round-to-nearest error on the row (first on a tie); a QAT-converged row keeps its
    grid (clip 1.0, error 0). No .item() or branch on values, so the QAT forward compiles; W may be a 3-D bank."""
    Wf = W.detach().float()
    scales = torch.stack([int_row_scale(Wf, qmax, c) for c in clip_levels])  # (K, ..., R, 1)
    err = ((torch.clamp(torch.round(Wf / scales), -qmax, qmax) * scales - Wf) ** 2).sum(-1, keepdim=True)
    return scales.gather(0, err.argmin(0, keepdim=True)).squeeze(0)  # (..., R, 1)

def fake_quant_int5(W: torch.Tensor, clip_levels: tuple = (1.0,)) -> torch.Tensor:
    """Late QAT (PR #286, PR #850; STE form here): W rounded to int5 on the `row_grid_scale` grid with a
    straight-through gradient. The exporter's GPTQ picks among the same clip levels by Hessian error, so the
    grids agree where both pick clip 1.0 (a QAT-converged row). Works on 2-D matrices and 3-D banks."""
    qmax = 2 ** (BASE_BITS - 1) - 1
    scale = row_grid_scale(W, qmax, clip_levels)
    Wq = torch.clamp(torch.round(W.detach().float() / scale), -qmax, qmax) * scale
    return Wq.to(W.dtype) + (W - W.detach())  # value exactly Wq; gradient exactly identity

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) queries, (B, T, Hkv, D) keys/values -> (B, T, H, D). The one attention shim: FlashAttention-3
    when `configure_attention` chose it, else PyTorch SDPA with native GQA (each KV head serves its query heads
    without being copied: 1% faster than copying them, H200)."""
    if _use_fa3 and q.is_cuda:
        out = _fa3_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
        return (out[0] if isinstance(out, tuple) else out).to(q.dtype)  # some builds also return the log-sum-exp
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)

_use_fa3 = False  # set by configure_attention (ATTN_BACKEND=fa3)
SDPA_ORDER = ("cudnn", "flash", "efficient", "math")  # SDPA's backends, fastest first on H100
_SDPA_ENUM = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}

def configure_attention(hp: Hyperparameters, d: Dist) -> str:
    """Choose the attention kernel before anything is compiled; returns its name for the log. On CUDA: SDPA with
    its backend order set to cuDNN > flash > efficient > math (torch 2.9 tries FA2 first on H100, 1.7-2.3x slower
    than cuDNN: README "GPU measurements"); ATTN_BACKEND forces one, or FA3, which `auto` never picks (no
    committed log has measured it). For SDPA the name is its own choice for the training shapes
    (`_fused_sdp_choice`, what its dispatch calls)."""
    global _use_fa3
    want, dtype, _use_fa3 = hp.attn_backend, torch.bfloat16 if d.is_cuda else torch.float32, False
    q = torch.randn(1, hp.train_seq_len, hp.num_heads, hp.head_dim, device=d.device, dtype=dtype, requires_grad=True)
    kv = torch.randn(1, hp.train_seq_len, hp.num_kv_heads, hp.head_dim, device=d.device, dtype=dtype)
    if want == "fa3":
        if not (d.is_cuda and _fa3_func is not None):
            raise GolfError("ATTN_BACKEND=fa3: FlashAttention-3 (flash_attn_interface) is not installed or there is no GPU")
        try:
            _use_fa3 = True
            causal_attention(q, kv, kv).sum().backward()  # raises if unable to run these shapes
        except Exception as e:  # noqa: BLE001  any failure of an optional kernel means: not this one
            _use_fa3 = False
            raise GolfError(f"ATTN_BACKEND=fa3: cannot run here ({type(e).__name__}: {e})") from None
        return "fa3"
    order = [int(getattr(SDPBackend, _SDPA_ENUM[b])) for b in SDPA_ORDER]
    if d.is_cuda:
        for b, flag in zip(SDPA_ORDER, ("cudnn", "flash", "mem_efficient", "math")):
            getattr(torch.backends.cuda, f"enable_{flag}_sdp")(want in ("auto", b))
        if hasattr(torch._C, "_set_sdp_priority_order"):  # torch >= 2.6 (without it SDPA tries flash first)
            torch._C._set_sdp_priority_order(order + [b for b in torch._C._get_sdp_priority_order() if b not in order])
    choice = torch._fused_sdp_choice(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), is_causal=True,
                                     enable_gqa=q.size(2) != kv.size(2))
    if choice not in order:
        raise GolfError(f"ATTN_BACKEND={want}: no attention kernel can run the training shapes here")
    return f"sdpa_{SDPA_ORDER[order.index(choice)]}"

class LoRA(nn.Module):
    """Rank-r adapters for test-time training, y += (x A_b^T) B_b^T for batch row b: one per row (doc mode: one per
    document) or, with batch 1, one shared by every row. A starts at A0 (r, in), B at 0: each starts as a no-op."""

    def __init__(self, A0: torch.Tensor, out_features: int, batch: int = 1):
        super().__init__()
        self.A0 = A0
        self.A = nn.Parameter(A0.expand(batch, *A0.shape).clone())
        self.B = nn.Parameter(A0.new_zeros(batch, out_features, A0.size(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        return (x @ self.A.to(x.dtype).transpose(1, 2)) @ self.B.to(x.dtype).transpose(1, 2)

class MatrixSlot(nn.Module):
    """y = x W^T for a bank matrix W passed in by the caller (+ an optional LoRA adapter)."""

    def __init__(self):
        super().__init__()
        self.lora: LoRA | None = None

    def forward(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, W.to(x.dtype))
        return y if self.lora is None else y + self.lora(x)

class Rotary(nn.Module):
    """Partial RoPE (PR #315): rotates only the first `rope_dims` of each head's dimensions."""

    def __init__(self, rope_dims: int, base: float):
        super().__init__()
        self.rope_dims = rope_dims
        self.register_buffer("inv_freq", base ** (-torch.arange(0, rope_dims, 2).float() / rope_dims), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        if self.rope_dims == 0:
            return x
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)[None, :, None, :]  # (1, T, 1, rope_dims/2)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        half = self.rope_dims // 2
        x1, x2, rest = x[..., :half], x[..., half:self.rope_dims], x[..., self.rope_dims:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest], dim=-1)

class CausalSelfAttention(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = hp.num_heads, hp.num_kv_heads, hp.head_dim
        self.c_q, self.c_k, self.c_v, self.c_proj = MatrixSlot(), MatrixSlot(), MatrixSlot(), MatrixSlot()
        self.rotary = Rotary(hp.rope_dims, hp.rope_base)
        self.q_gain = nn.Parameter(torch.full((hp.num_heads,), hp.qk_gain_init))  # the contest's baseline
        # Gated attention (arXiv:2505.06708, PR #413): per-head sigmoid gate, weight 0 and bias 4 (PR #850) at init;
        # sparse: it reads only the first ATTN_GATE_INPUTS channels (PR #1787, modded-nanogpt PR #117)
        self.gate_inputs = hp.attn_gate_inputs if hp.attn_gate_inputs < hp.model_dim else 0
        self.gate = nn.Linear(self.gate_inputs or hp.model_dim, hp.num_heads) if hp.gated_attn else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, ATTN_GATE_BIAS)
        self.use_xsa = layer >= hp.num_layers - hp.xsa_last_n  # XSA (arXiv:2603.09078): PR #265; last 4 layers: PR #287
        self.use_ve = layer >= hp.num_layers - hp.ve_last_n  # value embeddings on the last VE_LAST_N layers
        self.ve_scale = nn.Parameter(torch.tensor(0.1)) if self.use_ve else None
        # Value residual (ResFormer, arXiv:2410.17897): PR #413
        self.vrl_lambda = nn.Parameter(torch.zeros(2)) if layer > 0 and hp.value_residual else None

    def forward(self, x, Wq, Wk, Wv, Wo, v0, ve):
        B, T, _ = x.shape
        q = self.c_q(x, Wq).view(B, T, self.num_heads, self.head_dim)     # (B, T, H, D)
        k = self.c_k(x, Wk).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x, Wv)
        if self.use_ve:
            v = v + self.ve_scale.to(v.dtype) * ve
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if v0 is None:  # layer 0 supplies v0
            v0 = v
        elif self.vrl_lambda is not None:  # value residual: softmax(lambda) mix of layer 0's v and this layer's v
            lam = torch.softmax(self.vrl_lambda.float(), dim=0).to(v.dtype)
            v = lam[0] * v0 + lam[1] * v
        q = self.rotary(rms_norm(q)) * self.q_gain.to(q.dtype)[None, None, :, None]
        k = self.rotary(rms_norm(k))
        y = causal_attention(q, k, v)  # (B, T, H, D)
        if self.use_xsa:  # remove each head's component along its own position's (normalized) value; query
            y = y.unflatten(2, (self.num_kv_heads, -1))  # heads grouped by KV head: no copies of v (PR #549 line)
            vn = F.normalize(v, dim=-1).unsqueeze(3)  # (B, T, Hkv, 1, D)
            y = (y - (y * vn).sum(-1, keepdim=True) * vn).flatten(2, 3)
        if self.gate is not None:
            g = self.gate(x[..., :self.gate_inputs] if self.gate_inputs else x)
            y = y * torch.sigmoid(g.float()).to(y.dtype)[..., None]  # gate (B, T, H)
        return self.c_proj(y.reshape(B, T, -1), Wo), v0

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = MatrixSlot(), MatrixSlot()

    def forward(self, x, W_up, W_down):
        return self.c_proj(F.leaky_relu(self.c_fc(x, W_up), LEAKY_SLOPE).square(), W_down)

class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        D = hp.model_dim
        self.attn, self.mlp = CausalSelfAttention(hp, layer), MLP()
        # Residual mix with x0 and branch scales: the contest's baseline train_gpt.py (modded-nanogpt)
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(D), torch.zeros(D)]))  # x vs x0
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(D)), nn.Parameter(torch.ones(D))
        self.ln_scale = 1.0 / math.sqrt(layer + 1)  # LN scale (PR #315): deeper blocks see damped inputs
        self.parallel = 0 < hp.parallel_start_layer <= layer  # attention and MLP read the same input (GPT-J)

    def forward(self, x, x0, W, v0, ve):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        xn = rms_norm(x) * self.ln_scale
        h, v0 = self.attn(xn, W["q"], W["k"], W["v"], W["o"], v0, ve)
        x = x + self.attn_scale.to(x.dtype) * h
        h = self.mlp(xn if self.parallel else rms_norm(x) * self.ln_scale, W["up"], W["down"])
        return x + self.mlp_scale.to(x.dtype) * h, v0

class ProjectedEmbedding(nn.Module):
    """A token embedding (N(0, 0.01)) through a projection: the value embeddings added (scaled per layer) to v
    (VE128: PR #374), and BigramHash's table. The projection starts at zero (a no-op); with EMBED_PROJ_INIT=orthogonal
    (the default) GPT re-initializes it orthogonal / sqrt(2L) and BigramHash's table at zero instead."""

    def __init__(self, vocab_size: int, dim: int, out_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(idx))

class BigramHash(ProjectedEmbedding):
    """Embedding of a hash of (previous, current) token; position 0 has no previous token and gets a
    reserved bucket, so nothing is read from before the sequence start. PR #135, PR #162; 4096 buckets: PR #850."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__(buckets, dim, model_dim)
        self.buckets = buckets
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket(self, idx: torch.Tensor) -> torch.Tensor:
        prev, cur = idx[:, :-1], idx[:, 1:]
        h = torch.bitwise_xor(36313 * cur, 27191 * prev) % (self.buckets - 1)
        first = torch.full_like(idx[:, :1], self.buckets - 1)
        return torch.cat([first, h], dim=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.scale * super().forward(self.bucket(idx))

class SmearGate(nn.Module):
    """x_t <- (1 - g) * x_t + g * x_{t-1} with a learned per-channel gate g; position 0 mixes with 0, and so
    does a BOS position with `bos_fix` (nothing of the previous document reaches the next one's start)."""

    def __init__(self, dim: int, bos_fix: bool = False):
        super().__init__()
        self.gate, self.bos_fix = nn.Parameter(torch.zeros(dim)), bos_fix

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.sigmoid(self.gate.float()).to(x.dtype)
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if self.bos_fix:
            prev = prev.masked_fill((idx == BOS_ID)[..., None], 0)
        return (1 - g) * x + g * prev

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
EMBEDDING_NAMES = ("tok_emb.weight", "bigram.embed.weight", "ve.embed.weight")  # AdamW at EMBED_LR; int8 rows
PROJ_NAMES = ("bigram.proj.weight", "ve.proj.weight")
TIED_EMBED = "tok_emb"  # the tied embedding: GPTQ at EMBED_BITS with the output head's Hessian, a width like a block's

class GPT(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        L, D, V = hp.num_layers, hp.model_dim, hp.vocab_size
        self.hp = hp
        self.tok_emb = nn.Embedding(V, D)  # tied embeddings, std 0.005, zero-init outputs: the contest's baseline
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        self.bigram = BigramHash(hp.bigram_vocab_size, hp.bigram_dim, D) if hp.bigram_vocab_size else None
        self.smear = SmearGate(D, hp.smear_gate_bos_fix) if hp.smear_gate else None  # SmearGate: PR #65
        self.ve = ProjectedEmbedding(V, hp.ve_dim, hp.kv_dim) if hp.ve_last_n else None  # shared by the last layers
        if hp.embed_proj_init == "orthogonal":  # PR #850's _iw: a BigramHash that starts at 0 with trainable projections
            with torch.no_grad():
                for emb in (e for e in (self.bigram, self.ve) if e is not None):
                    nn.init.orthogonal_(emb.proj.weight).mul_(1.0 / math.sqrt(2 * L))
                if self.bigram is not None:
                    self.bigram.embed.weight.zero_()
        self.blocks = nn.ModuleList(Block(hp, i) for i in range(L))
        self.looping = hp.num_loops > 0  # the trained network loops; training turns it on at ENABLE_LOOPING_AT
        self.num_skips = len(self.layer_sequence(True)) // 2 if hp.unet_skips else 0  # one per encoder output
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, D)) if self.num_skips else None
        # Banks: rows [0, L) are q / k / up / down of layer i; rows [L, 2L) are out / v of layer i - L.
        self.qo_bank = nn.Parameter(torch.zeros(2 * L, D, D))  # output projections (rows L..2L-1) start at zero
        self.kv_bank = nn.Parameter(torch.empty(2 * L, hp.kv_dim, D))
        self.mlp_up_bank = nn.Parameter(torch.empty(L, hp.mlp_hidden, D))
        self.mlp_down_bank = nn.Parameter(torch.zeros(L, D, hp.mlp_hidden))
        with torch.no_grad():
            for i in range(L):
                for W in (self.qo_bank[i], self.kv_bank[i], self.kv_bank[L + i], self.mlp_up_bank[i]):
                    nn.init.orthogonal_(W)  # orthogonal init: PR #65 / PR #135 line of records

    def layer_sequence(self, looping: bool) -> list:
        """The virtual layers: with the loop, LOOP_START..LOOP_END run NUM_LOOPS more times (11 layers, 3-5 twice:
        0-5,3-5,3-5,6-10); the first half of the sequence is the U-Net encoder, the rest the decoder (PR #1493)."""
        hp, layers = self.hp, list(range(self.hp.num_layers))
        if not (looping and hp.num_loops):
            return layers
        a, b = hp.loop_start, hp.loop_end + 1
        return layers[:b] + layers[a:b] * hp.num_loops + layers[b:]

    def layer_weights(self, banks: dict, i: int) -> dict:
        L = self.hp.num_layers
        return {"q": banks["qo_bank"][i], "o": banks["qo_bank"][L + i], "k": banks["kv_bank"][i],
                "v": banks["kv_bank"][L + i], "up": banks["mlp_up_bank"][i], "down": banks["mlp_down_bank"][i]}

    def hidden(self, idx: torch.Tensor, qat: bool = False) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) final normalized hidden states."""
        banks = {name: getattr(self, name) for name in BANKS}
        if qat:
            banks = {name: fake_quant_int5(W, self.hp.clip_levels()) for name, W in banks.items()}
        x = self.tok_emb(idx) if self.bigram is None else self.tok_emb(idx) + self.bigram(idx)
        dev = idx.device.type  # under autocast the residual stream is bf16 too: it halves the memory-bound half of
        # the step (83.6 -> 77.6 ms, H200); weights, optimizer state, norms' reductions and the loss stay fp32
        x = x.to(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype)
        x = rms_norm(x) if self.smear is None else self.smear(rms_norm(x), idx)
        x0, v0, skips = x, None, []
        ve = self.ve(idx) if self.ve is not None else None
        sequence = self.layer_sequence(self.looping)  # a shared layer's bank rows get the gradients of every pass
        n_enc = len(sequence) // 2
        for j, i in enumerate(sequence):
            if j >= n_enc and skips:  # U-Net skips (baseline train_gpt.py, from modded-nanogpt)
                x = x + self.skip_weights[j - n_enc].to(x.dtype) * skips.pop()
            x, v0 = self.blocks[i](x, x0, self.layer_weights(banks, i), v0, ve)
            if j < n_enc and self.num_skips:
                skips.append(x)
        return rms_norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output head with the softcap c*tanh(z/c), in float32 (the contest's baseline; Gemma 2)."""
        z = F.linear(h, self.tok_emb.weight.to(h.dtype)).float()
        c = self.hp.logit_softcap
        return c * torch.tanh(z / c)

    def forward(self, idx, targets, loss_weights=None, qat: bool = False) -> torch.Tensor:
        logits = self.logits(self.hidden(idx, qat)).view(-1, self.hp.vocab_size)
        if loss_weights is None:
            return F.cross_entropy(logits, targets.reshape(-1))
        ce = F.cross_entropy(logits, targets.reshape(-1), reduction="none")
        return (ce * loss_weights.reshape(-1)).mean()

def block_matrices(model: GPT) -> dict:
    """The block matrices as ordinary 2-D views of the banks, named after their MatrixSlots."""
    slot = dict(q="attn.c_q", o="attn.c_proj", k="attn.c_k", v="attn.c_v", up="mlp.c_fc", down="mlp.c_proj")
    banks = {name: getattr(model, name) for name in BANKS}
    return {f"blocks.{i}.{slot[k]}": W for i in range(model.hp.num_layers)
            for k, W in model.layer_weights(banks, i).items()}

def unbanked_state_dict(model: GPT) -> dict:
    """state_dict with the banks replaced by their named 2-D matrices (the artifact's view)."""
    sd = {k: v.detach() for k, v in model.state_dict().items() if k not in BANKS}
    sd.update({name + ".weight": W.detach() for name, W in block_matrices(model).items()})
    return sd

def load_unbanked_state_dict(model: GPT, sd: dict) -> None:
    with torch.no_grad():
        for name, W in block_matrices(model).items():
            W.copy_(sd[name + ".weight"])
        rest = {k: v for k, v in sd.items() if not k.endswith(".weight") or k[:-7] not in block_matrices(model)}
        missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in BANKS]
    if missing or unexpected:
        raise GolfError(f"artifact does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ==================== Optimizers =====================================================================
# Parallel Muon for the four banks (and, with EMBED_PROJ_MUON, the BigramHash / VE projections, each a bank of one
# matrix): each bank's gradient is reduce-scattered so each rank owns whole matrices, whose owner runs Nesterov
# momentum and bf16 Newton-Schulz; the updates are all-gathered while the next bank is computed. No DDP: the small
# replicated parameters (AdamW) get one flat all-reduce.

# Muon and its quintic Newton-Schulz: Keller Jordan (modded-nanogpt), via the contest's baseline train_gpt.py
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Newer PyTorch renamed the single-tensor collectives (same signatures); use whichever exists.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """U V^T of each matrix in G (..., R, C), in bf16; the quintic puts singular values in ~[0.7, 1.2], not at 1."""
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    wide = X.size(-2) <= X.size(-1)
    if not wide:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT

def as_bank(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)  # a 2-D matrix (EMBED_PROJ_MUON) is a bank of one, owned by rank 0

# Parameter banks + Parallel Muon: PR #399 (used by the merged record PR #549); decoupled WD: PR #65/#162 line
class ParallelMuon(torch.optim.Optimizer):
    """Muon over 3-D banks (N, R, C), each rank owning ceil(N / world) whole matrices; `lrs` (N,) per matrix. Use:
    launch_reduce_scatter() after backward, wait_reduce_scatter(), owned_grad_sq_norm(grads) to clip, step()."""

    def __init__(self, banks: list, lrs: list, momentum: float, weight_decay: float, backend_steps: int, d: Dist):
        groups = [dict(params=[p], lrs=lr.to(p.device), lr_mult=1.0, momentum=momentum) for p, lr in zip(banks, lrs)]
        super().__init__(groups, dict(weight_decay=weight_decay, backend_steps=backend_steps))
        self.d, self._pending = d, []

    def _shard(self, p: torch.Tensor) -> tuple:
        p = as_bank(p)
        per_rank = -(-p.size(0) // self.d.world_size)
        lo = min(self.d.rank * per_rank, p.size(0))
        return per_rank, lo, min(lo + per_rank, p.size(0))

    @torch.no_grad()
    def launch_reduce_scatter(self) -> None:
        """Average each bank's gradient onto its owners in bf16 (Newton-Schulz runs in bf16 anyway), rows padded."""
        self._pending = []
        for group in self.param_groups:
            p, grad = as_bank(group["params"][0]), as_bank(group["params"][0].grad)
            per_rank, lo, hi = self._shard(p)
            if self.d.world_size == 1:
                self._pending.append((grad, None))
                continue
            flat = F.pad(grad.bfloat16(), (0, 0, 0, 0, 0, per_rank * self.d.world_size - p.size(0)))
            out = torch.empty((per_rank,) + p.shape[1:], device=p.device, dtype=torch.bfloat16)
            self._pending.append((out[:hi - lo], _reduce_scatter(out, flat, op=dist.ReduceOp.AVG, async_op=True)))

    @torch.no_grad()
    def wait_reduce_scatter(self) -> list:
        """This rank's averaged gradient shards, float32."""
        for _, work in self._pending:
            if work is not None:
                work.wait()
        return [g if work is None else g.float() for g, work in self._pending]

    @torch.no_grad()
    def owned_grad_sq_norm(self, grads: list) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(grads)).square().sum()

    @torch.no_grad()
    def step(self, grads: list, clip_coef: torch.Tensor) -> None:
        """Owners orthogonalize their shards; the bf16 updates, all-gathered while the next bank runs, go everywhere."""
        updates = []
        for group, g in zip(self.param_groups, grads):
            p = as_bank(group["params"][0])
            per_rank, lo, hi = self._shard(p)
            state = self.state[group["params"][0]]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p[lo:hi])
            buf, mu = state["momentum_buffer"], group["momentum"]
            g = g * clip_coef
            buf.mul_(mu).add_(g)
            update, work = zeropower_via_newtonschulz5(g + mu * buf, group["backend_steps"]), None  # Nesterov, bf16
            if self.d.world_size > 1:
                send = F.pad(update, (0, 0, 0, 0, 0, per_rank - (hi - lo)))
                update = torch.empty((per_rank * self.d.world_size,) + p.shape[1:], device=p.device, dtype=update.dtype)
                work, lo, hi = _all_gather(update, send, async_op=True), 0, p.size(0)
            updates.append((group, p, update, lo, hi, work))
        for group, p, update, lo, hi, work in updates:
            if work is not None:
                work.wait()
            lr = (group["lrs"][lo:hi] * group["lr_mult"]).view(-1, 1, 1)
            update = update[:hi - lo].to(p.dtype) * math.sqrt(max(1.0, p.size(-2) / p.size(-1)))
            p[lo:hi].mul_(1 - lr * group["weight_decay"]).sub_(lr * update)  # decoupled weight decay

def build_optimizers(model: GPT, hp: Hyperparameters, d: Dist):
    """ParallelMuon for the banks (+ the projections); AdamW for embeddings (EMBED_LR) and the rest (SCALAR_LR): (muon, adam, params)."""
    L, n_enc = hp.num_layers, hp.num_encoder_layers
    layer_lr = torch.tensor([hp.matrix_lr_encoder if i < n_enc else hp.matrix_lr_decoder for i in range(L)])  # PR #850
    banks = [getattr(model, name) for name in BANKS]
    lrs = [layer_lr.repeat(2), layer_lr.repeat(2), layer_lr, layer_lr]  # bank rows: layer i and L + i
    names = dict(model.named_parameters())
    projs = [n for n in PROJ_NAMES if hp.embed_proj_muon and n in names]
    banks += [model.get_parameter(n) for n in projs]
    lrs += [torch.tensor([hp.matrix_lr_encoder])] * len(projs)  # PR #850's encoder group
    muon = ParallelMuon(banks, lrs, hp.muon_momentum_warmup_start, hp.muon_wd, hp.muon_backend_steps, d)
    named = [(n, p) for n, p in model.named_parameters() if n not in BANKS + tuple(projs)]
    embeds = [p for n, p in named if n in EMBEDDING_NAMES]
    scalars = [p for n, p in named if n not in EMBEDDING_NAMES]
    groups = [dict(params=ps, lr=lr, base_lr=lr) for ps, lr in ((embeds, hp.embed_lr), (scalars, hp.scalar_lr))]
    adam = torch.optim.AdamW(groups, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd,
                             fused=d.is_cuda)
    return muon, adam, embeds + scalars

def all_reduce_grads(params: list, op: str = "avg", wait: bool = True):
    """One flat all-reduce of the replicated gradients; wait=False returns the function that waits and copies back."""
    if not multi_process():
        return None if wait else (lambda: None)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    work = dist.all_reduce(flat, op=dist.ReduceOp.AVG if op == "avg" else dist.ReduceOp.SUM, async_op=True)

    def finish() -> None:
        work.wait()
        torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)])
    return finish() if wait else finish


# ==================== Training =======================================================================
# WSD schedule on the wall clock (or on the step count when MAX_WALLCLOCK_SECONDS=0, which makes two runs
# with the same SEED bit-identical on the same CPU), complementary loss, late QAT, EMA + SWA. Compile
# warm-up steps run before the clock and are undone. The loop stops when its predicted end (BudgetPlan: training
# + the export measured before the clock) would pass the budget, so export fits inside MAX_WALLCLOCK_SECONDS.

def autocast(d: Dist):
    return torch.autocast("cuda", dtype=torch.bfloat16) if d.is_cuda else contextlib.nullcontext()

class BigramCounter:
    """Complementary training (bigram-weighted loss, PR #803): bigram counts of every training token seen so far,
    identical on every rank without communication (each counts the whole global micro-batch).
    weight = max(0.1, 1 - alpha * count(prev->tgt) / (count(prev) + 1))."""

    def __init__(self, vocab_size: int, alpha: float, device: torch.device):
        self.V, self.alpha = vocab_size, alpha
        # int32 pair counts: V^2 * 4 bytes per rank (4 MiB at V=1024, 256 MiB at 8192); a single bigram stays
        # below 2^31 over a whole run (~5e9 training tokens, the most frequent bigram ~1-2% of them)
        self.pair = torch.zeros(vocab_size * vocab_size, dtype=torch.int32, device=device)
        self.prev = torch.zeros(vocab_size, dtype=torch.int64, device=device)

    def weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.pair[x * self.V + y].float()
        n = self.prev[x].float()
        return torch.clamp(1.0 - self.alpha * c / (n + 1.0), min=0.1)

    def update(self, chunks: list) -> None:
        """Count the bigrams of a whole step's global micro-batches (1-D token tensors)."""
        for tokens in chunks:
            prev, tgt = tokens[:-1], tokens[1:]
            ones = torch.ones_like(prev)  # index_add_, unlike bincount, needs no host sync on CUDA
            self.pair.index_add_(0, prev * self.V + tgt, ones.int())
            self.prev.index_add_(0, prev, ones)

def lr_multiplier(progress: float, warmdown_frac: float) -> float:
    """WSD (PR #850; MiniCPM, arXiv:2404.06395): 1 for the first (1 - warmdown_frac), then a cosine to 0 at 1."""
    start = 1.0 - warmdown_frac
    x = min(1.0, max(0.0, (progress - start) / warmdown_frac))  # 0 until the warm-down starts: multiplier 1
    return 0.5 * (1.0 + math.cos(math.pi * x))

def muon_momentum_at(step: int, hp: Hyperparameters) -> float:  # warm-up 0.92 -> 0.99: PR #65 / PR #162 line
    frac = min(1.0, step / hp.muon_momentum_warmup_steps) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return hp.muon_momentum_warmup_start + frac * (hp.muon_momentum - hp.muon_momentum_warmup_start)

@dataclass
class Trainer:
    """What a training step needs; `step_fn` is the (compiled on CUDA) model forward returning the loss."""
    hp: Hyperparameters
    d: Dist
    model: GPT
    step_fn: object
    muon: ParallelMuon
    adam: torch.optim.Optimizer
    replicated: list

    @property
    def grad_accum(self) -> int:
        return 8 // self.d.world_size

    def step(self, loader: DistributedTokenLoader, counter: BigramCounter | None, lr_mult: float,
             momentum: float, qat: bool) -> torch.Tensor:
        hp, accum = self.hp, self.grad_accum
        total, seen = torch.zeros((), device=self.d.device), []
        for _ in range(accum):
            x, y, tokens = loader.next_batch(hp.train_batch_tokens // accum, hp.train_seq_len)
            seen.append(tokens)
            weights = counter.weights(x, y) if counter is not None else None  # counts of earlier steps
            with autocast(self.d):
                loss = self.step_fn(x, y, weights, qat)
            (loss / accum).backward()
            total += loss.detach()
        self.muon.launch_reduce_scatter()
        finish_replicated = all_reduce_grads(self.replicated, wait=False)  # queued after them (NCCL: same stream)
        if counter is not None:  # once per step, so the weights do not depend on WORLD_SIZE; runs during the
            counter.update(seen)  # communication above
        grads = self.muon.wait_reduce_scatter()
        finish_replicated()
        clip, replicated = torch.ones((), device=self.d.device), [p.grad for p in self.replicated]
        if hp.grad_clip_norm > 0:
            sq = all_reduce(self.muon.owned_grad_sq_norm(grads)) + self.muon.owned_grad_sq_norm(replicated)
            clip = torch.clamp(hp.grad_clip_norm / (sq.sqrt() + 1e-6), max=1.0)
            torch._foreach_mul_(replicated, clip)
        for group in self.adam.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
        for group in self.muon.param_groups:
            group["lr_mult"], group["momentum"] = lr_mult, momentum
        self.adam.step()
        self.muon.step(grads, clip)
        self.model.zero_grad(set_to_none=True)
        return total / accum

    def snapshot(self):
        return copy.deepcopy((self.model.state_dict(), self.muon.state_dict(), self.adam.state_dict()))

    def restore(self, snap) -> None:
        for obj, sd in zip((self.model, self.muon, self.adam), snap):
            obj.load_state_dict(sd)

class WeightAverager:
    """EMA of every parameter each step; during the low-LR tail (LR multiplier < SWA_LR_THRESHOLD) a
    snapshot every SWA_EVERY steps. Final = (1 - SWA_WEIGHT) * EMA + SWA_WEIGHT * mean(snapshots).
    EMA 0.997: PR #287; tight SWA (LR scale < 0.2, every 50 steps): PR #374; SWA on top of EMA: PR #401."""

    def __init__(self, model: GPT, hp: Hyperparameters):
        self.hp, self.params = hp, [p.detach() for p in model.parameters()]  # views: follow in-place updates
        self.ema = [p.float().clone() for p in self.params]
        self.swa, self.swa_count = None, 0

    @torch.no_grad()
    def update(self, step: int, lr_mult: float) -> None:
        """One fused multi-tensor lerp per step (parameters are float32, so no casts or copies)."""
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.hp.ema_decay)
        if lr_mult < self.hp.swa_lr_threshold and step % self.hp.swa_every == 0:
            if self.swa is None:
                self.swa = [torch.zeros_like(e) for e in self.ema]
            torch._foreach_add_(self.swa, self.params)
            self.swa_count += 1

    @torch.no_grad()
    def apply_final(self) -> str:
        final = self.ema
        if self.swa_count > 0:
            w = self.hp.swa_weight
            final = [(1 - w) * e + (w / self.swa_count) * s for e, s in zip(self.ema, self.swa)]
        for p, f in zip(self.params, final):
            p.copy_(f)
        return f"ema_decay:{self.hp.ema_decay} swa_snapshots:{self.swa_count} swa_weight:{self.hp.swa_weight}"

@torch.no_grad()
def eval_val_loss(model: GPT, val_tokens: torch.Tensor, luts: ByteLUTs, hp: Hyperparameters, d: Dist):
    """Quick validation for training progress: contiguous TRAIN_SEQ_LEN sequences (no sliding window)."""
    seq = hp.train_seq_len
    n_seqs = (val_tokens.numel() - 1) // seq
    lo, hi = n_seqs * d.rank // d.world_size, n_seqs * (d.rank + 1) // d.world_size
    batch = max(1, hp.val_batch_tokens // (d.world_size * seq))
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # nll, tokens, bytes
    model.eval()
    for s in range(lo, hi, batch):
        e = min(hi, s + batch)
        chunk = val_tokens[s * seq:e * seq + 1].to(d.device, dtype=torch.int64)
        x, y = chunk[:-1].view(-1, seq), chunk[1:].view(-1, seq)
        with autocast(d):
            logits = model.logits(model.hidden(x))
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        sums += torch.stack([nll.double(), torch.tensor(y.numel(), device=d.device, dtype=torch.float64),
                             target_bytes(x, y, luts).sum().double()])
    model.train()
    all_reduce(sums)
    nll, tokens, n_bytes = sums.tolist()
    return nll / tokens, bits_per_byte(nll, n_bytes)

@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    export_estimate: float = 0.0  # what the stop rule reserved for calibration + export (0: step-based run)
    interrupted: int = 0          # the signal that stopped training (0: none)

def warmup_and_restore(trainer: Trainer, log: RunLog) -> dict:
    """Warm-up undone before the clock (the contest's baseline): compile every variant (plain and late-QAT, each
    without and with the loop), then restore weights and optimizer state; the caller starts a fresh loader and
    fresh bigram counts. Returns {looping: seconds of its last warm-up step} (the loop's cost, for BudgetPlan)."""
    hp, W = trainer.hp, trainer.hp.warmup_steps
    if W == 0:
        return {}
    variants = [(loop, qat) for loop in ((False, True) if hp.num_loops else (False,))
                for qat in ((False, True) if hp.late_qat_frac < 1 else (False,))]
    snap, seconds = trainer.snapshot(), {}
    loader = DistributedTokenLoader(hp.data_path, trainer.d)
    counter = BigramCounter(hp.vocab_size, hp.complement_alpha, trainer.d.device) if hp.complement_alpha > 0 else None
    t0 = time.perf_counter()
    for i in range(W):
        loop, qat = variants[max(k for k in range(len(variants)) if i >= k * W // len(variants))]
        trainer.model.looping, t = loop, time.perf_counter()
        trainer.step(loader, counter, 1.0, hp.muon_momentum_warmup_start, qat)
        sync(trainer.d)
        seconds[loop] = time.perf_counter() - t
    trainer.restore(snap)
    trainer.model.looping = False
    log(f"warmup_steps:{W} warmup_time:{time.perf_counter() - t0:.1f}s variants(loop,qat):{variants} "
        f"restored:weights,optimizer_state,loader,bigram_counts")
    return seconds

class SharedClock:
    """Training time agreed by every rank without a host sync per step: each step posts this rank's clock into
    a max-all-reduce and reads the result posted one step earlier (on CUDA that waits only for the earlier
    step, so the GPU queue never drains). Decisions taken from `read()` are one step late, identical on all ranks."""

    def __init__(self, d: Dist):
        self.d, self.pending = d, []

    def post(self, values: list) -> None:
        t = torch.tensor(values, dtype=torch.float64, pin_memory=self.d.is_cuda).to(self.d.device, non_blocking=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True).wait()  # on NCCL: a stream wait, not a host one
        if self.d.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            t = (host, event)
        self.pending.append(t if self.d.is_cuda else (t, None))

    def read(self) -> list | None:
        """The values posted by the previous call of `post` (None before the second post)."""
        if len(self.pending) < 2:
            return None
        t, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        return t.tolist()

@dataclass
class BudgetPlan:
    """When to stop: the predicted end of the run (training so far + the steps still to come before a stop
    decision takes effect + calibration and export, as measured before the clock) must fit the budget."""
    limit: float              # MAX_WALLCLOCK_SECONDS
    export_estimate: float    # seconds for calibration + quantization + writing, with safety factor and floor
    loop_ratio: float = 1.0   # a looped step's seconds / a plain one's (warm-up), until a looped step is measured

    def predicted_end(self, elapsed: float, step_seconds: float) -> float:
        return elapsed + 2 * step_seconds + self.export_estimate  # 2: the step SharedClock lags by, and the next

    def step_estimate(self, last_step: float, steps_measured: float, loop_from: int | None) -> float:
        """The coming steps' seconds: the last measured step's, scaled by `loop_ratio` once the loop runs
        (from step `loop_from` on) while the shared clock has not yet measured a looped step."""
        return last_step * (self.loop_ratio if loop_from is not None and steps_measured <= loop_from else 1.0)

    def train_share(self) -> float:
        """The training seconds the schedule (WSD, QAT start) is laid out over."""
        return max(1e-9, self.limit - self.export_estimate)

EXPORT_SAFETY = 1.5  # measured export time x this (a loaded machine or bigger final weights): see BudgetPlan

def trained_scale_copy(model: GPT, seed: int) -> tuple:
    """A copy of the model whose block matrices are Gaussian noise at an orthogonal matrix's RMS (1/sqrt(cols)):
    trained weights have no zero matrices and high-entropy codes, which LZMA compresses far more slowly than
    the initial weights, 43% of whose block entries are zero (output projections). Returns (copy, the zero
    fraction of the initial and of the copy's block matrices)."""
    probe, gen = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    zero = lambda m: sum(int((getattr(m, n) == 0).sum()) for n in BANKS) / sum(getattr(m, n).numel() for n in BANKS)
    with torch.no_grad():
        for name in BANKS:
            W = getattr(probe, name)
            W.copy_(torch.randn(W.shape, generator=gen) / math.sqrt(W.size(-1)))
    return probe, zero(model), zero(probe)

def plan_budget(trainer: Trainer, log: RunLog, warmup_seconds: dict | None = None) -> BudgetPlan | None:
    """Measure calibration + export before the clock, on weights at trained scale (`trained_scale_copy`), into a
    scratch folder: the same code the run ends with, at this model size and world size. The loop's step-time
    ratio: the larger of virtual / physical layers (the blocks' share of a step grows by that) and the ratio of
    the warm-up's last looped and plain steps (a short warm-up's first step also pays one-time costs)."""
    hp, d = trainer.hp, trainer.d
    if hp.max_wallclock_seconds <= 0:
        return None
    seconds, ratio = warmup_seconds or {}, 1.0
    if hp.num_loops:
        ratio = seconds[True] / max(seconds[False], 1e-9) if len(seconds) == 2 else 1.0
        ratio = max(len(trainer.model.layer_sequence(True)) / hp.num_layers,
                    float(all_reduce(torch.tensor([ratio], dtype=torch.float64, device=d.device), "max").item()))
    probe, zero_init, zero_probe = trained_scale_copy(trainer.model, hp.seed)
    probe.looping = hp.num_loops > 0  # the export's Hessians run every pass
    scratch = Path(hp.output_dir) / f".export_probe_{os.getpid()}"
    if d.is_main:  # only rank 0 writes (the checkpoint and the artifact)
        scratch.mkdir(exist_ok=True)
    try:
        t0 = time.perf_counter()
        export(probe, hp, d, RunLog(None), scratch, TrainResult(0, 0.0))
        measured = time.perf_counter() - t0
        sync(d)
        measured = float(all_reduce(torch.tensor([measured], dtype=torch.float64, device=d.device), "max").item())
    finally:
        barrier()
        if d.is_main:
            shutil.rmtree(scratch)
    del probe
    plan = BudgetPlan(hp.max_wallclock_seconds, max(hp.export_reserve_seconds, EXPORT_SAFETY * measured), loop_ratio=ratio)
    log(f"budget_plan: export_probe:{measured:.1f}s probe_zero_frac:{zero_probe:.3f} (initial weights "
        f"{zero_init:.3f}) export_estimate:{plan.export_estimate:.1f}s "
        f"(max of EXPORT_RESERVE_SECONDS={hp.export_reserve_seconds:g} and {EXPORT_SAFETY} x probe) "
        f"train_share:{plan.train_share():.1f}s limit:{hp.max_wallclock_seconds:g}s"
        + (f" loop_step_ratio:{ratio:.2f}" if hp.num_loops else ""))
    if plan.train_share() < 0.05 * hp.max_wallclock_seconds:
        raise GolfError(f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g} leaves no time to train: export is "
                        f"estimated at {plan.export_estimate:.1f}s (raise the budget or shrink the model)")
    return plan

def train_model(trainer: Trainer, val_tokens: torch.Tensor, luts: ByteLUTs, log: RunLog) -> TrainResult:
    hp, d = trainer.hp, trainer.d
    plan = plan_budget(trainer, log, warmup_and_restore(trainer, log))
    start = time.perf_counter()  # the clock starts here, before the loader reads its first shard
    loader = DistributedTokenLoader(hp.data_path, d)
    counter = BigramCounter(hp.vocab_size, hp.complement_alpha, d.device) if hp.complement_alpha > 0 else None
    averager = WeightAverager(trainer.model, hp)
    clock = SharedClock(d)
    step, loss, val_s, last_log = 0, torch.zeros((), device=d.device), 0.0, -1.0
    shared = [0.0, 0.0, 0.0, 0.0]  # [training seconds, last step's seconds, steps, stop signal] agreed by all ranks,
    # a step late
    stop_reason, t_prev, loop_from = "iterations", start, None  # loop_from: the steps run before the loop
    trainer.model.looping = False
    while step < hp.iterations:
        train_s = shared[0]
        progress = train_s / plan.train_share() if plan else step / hp.iterations
        if hp.num_loops and loop_from is None and progress >= hp.enable_looping_at:
            loop_from, trainer.model.looping = step, True
            est = plan.step_estimate(shared[1], shared[2], step) if plan else 0.0
            log(f"looping_started: step:{step} train_time:{train_s:.1f}s progress:{progress:.3f} layers:"
                f"{','.join(map(str, trainer.model.layer_sequence(True)))}" + (
                    f" step_estimate:{shared[1]:.3f}s->{est:.3f}s (x{plan.loop_ratio:.2f}) predicted_end:"
                    f"{plan.predicted_end(train_s, est):.1f}s limit:{plan.limit:g}s" if plan else ""))
        elif plan and loop_from is not None and shared[2] == loop_from + 1:  # the first looped step measured
            log(f"looping_measured: step:{step} looped_step:{shared[1]:.3f}s predicted_end:"
                f"{plan.predicted_end(train_s, shared[1]):.1f}s limit:{plan.limit:g}s")
        if plan and plan.predicted_end(train_s, plan.step_estimate(shared[1], shared[2], loop_from)) > plan.limit:
            stop_reason = "predicted_budget"
            break
        if shared[3]:
            stop_reason = f"signal_{signal.Signals(int(shared[3])).name}"
            break
        lr_mult = lr_multiplier(min(progress, 1.0), hp.warmdown_frac)
        qat = progress >= hp.late_qat_frac
        loss = trainer.step(loader, counter, lr_mult, muon_momentum_at(step, hp), qat)
        step += 1
        averager.update(step, lr_mult)
        now = time.perf_counter()
        clock.post([now - start - val_s, now - t_prev, float(step), float(StopSignal.received)])
        t_prev = now
        shared = clock.read() or shared
        if step % hp.train_log_every == 0 or step == hp.iterations or shared[0] - last_log > 20:
            last_log = shared[0]
            log_train_step(hp, step, all_reduce(loss.detach().clone(), "avg").item(), shared, lr_mult, qat, plan, log)
        if hp.val_loss_every > 0 and step % hp.val_loss_every == 0:
            t0 = time.perf_counter()
            val_loss, val_bpb = eval_val_loss(trainer.model, val_tokens, luts, hp, d)
            log(f"step:{step}/{hp.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{shared[0] * 1000:.0f}ms")
            val_s += time.perf_counter() - t0
            t_prev = time.perf_counter()
    check_finite(all_reduce(loss.detach().clone(), "avg").item(), step)
    hi, neg_lo = all_reduce(torch.tensor([step, -step], dtype=torch.float64, device=d.device), "max").tolist()
    if hi != -neg_lo:  # every rank must take the same break (the shared clock), or the collectives below hang
        raise GolfError(f"ranks stopped at different steps ({-neg_lo:.0f} to {hi:.0f}): the shared clock disagreed")
    log(f"stop: {stop_reason} at step {step} on every rank (world_size {d.world_size})")
    trainer.model.looping = hp.num_loops > 0  # the network as the artifact records it
    if hp.num_loops and loop_from is None:
        log(f"looping_never_started: training stopped at progress {progress:.3f} < ENABLE_LOOPING_AT="
            f"{hp.enable_looping_at:g}; the exported network loops all the same")
    if shared[3]:
        log(f"training_stopped: {stop_reason} at step {step}: finishing the weights, checkpoint and artifact")
    log(f"weight_averaging: {averager.apply_final()}")
    sync(d)
    train_s = time.perf_counter() - start - val_s
    if plan:
        log(f"budget_prediction: stop:{stop_reason} step:{step}/{hp.iterations} train_time:{train_s:.1f}s "
            f"step_estimate:{shared[1]:.2f}s export_estimate:{plan.export_estimate:.1f}s "
            + (f"loop_from_step:{loop_from} " if hp.num_loops else "") +
            f"predicted_total:{train_s + plan.export_estimate:.1f}s limit:{plan.limit:g}s")
    return TrainResult(step, train_s, plan.export_estimate if plan else 0.0, int(shared[3]))

def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise GolfError(f"train_loss is {loss} at step {step}: training diverged (lower the learning rates "
                        f"MATRIX_LR_ENCODER/MATRIX_LR_DECODER/EMBED_LR/SCALAR_LR or GRAD_CLIP_NORM)")

def log_train_step(hp, step: int, loss: float, shared: list, lr_mult: float, qat: bool, plan, log: RunLog) -> None:
    """`shared` is SharedClock's [seconds, last step's seconds, steps], one step behind `step`."""
    check_finite(loss, step)
    train_s, done = shared[0], max(1.0, shared[2])
    avg_ms = 1000 * train_s / done
    eta = max(0.0, plan.train_share() - train_s) if plan is not None else avg_ms * (hp.iterations - step) / 1000
    log(f"step:{step}/{hp.iterations} train_loss:{loss:.4f} train_time:{train_s * 1000:.0f}ms "
        f"step_avg:{avg_ms:.2f}ms tok_s:{hp.train_batch_tokens * done / max(train_s, 1e-9):.0f} "
        f"lr_mult:{lr_mult:.3f} qat:{int(qat)} eta:{eta:.0f}s")


# ==================== Quantization and serialization =================================================
# README "Export". Block matrices: full-Hessian GPTQ (Frantar et al. 2022, names follow IST-DASLab's gptq.py), H from
# training data inside the training budget, every width of QUANT_BITS in one sweep. Embeddings: int8 rows; tensors
# of <= 65,536 elements: fp16. Artifact: magic | u32 header length | JSON header | u32 length of each stream | the
# streams (xz, one per block matrix, one for the rest; no pickle). Its size is a constant plus the streams' sizes,
# so every candidate's real bytes and error are known before writing, and `allocate_bits` fits the cap by construction.

ARTIFACT_MAGIC = b"PGOLF\x06"
ARTIFACT_VERSION = 2
SMALL_TENSOR_NUMEL = 65536
LZMA_PRESET = 9 | lzma.PRESET_EXTREME  # LZMA instead of zstd/zlib: PR #549 line of records

def quantize_rtn(W: torch.Tensor, bits: int = 5, clip_levels: tuple = (1.0,)) -> tuple:
    """Per-row symmetric round-to-nearest on the `row_grid_scale` grid: (Q int8 in [-qmax, qmax], scale fp16)."""
    qmax = 2 ** (bits - 1) - 1
    scale = row_grid_scale(W, qmax, clip_levels)
    Q = torch.clamp(torch.round(W.float() / scale), -qmax, qmax).to(torch.int8)
    return Q, scale.view(-1).half()

def dequantize(Q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return Q.float() * scale.float().view(-1, 1)

def hessian_weighted_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row tr-contribution (W - W_hat) H (W - W_hat)^T: the layer's output error on the inputs."""
    E = (W - W_hat).float()
    return ((E @ H.float()) * E).sum(dim=1)

def _gptq_columns(WT: torch.Tensor, Hinv: torch.Tensor, scale: torch.Tensor, qmax: torch.Tensor, block_size: int):
    """The GPTQ sweep with lazy batched updates on W^T (C, R), a column contiguous (~2x faster on a CPU); WT is
    updated in place; Hinv: upper Cholesky factor of H^-1; scale, qmax (R,). Returns Q^T (C, R), float."""
    QT = torch.zeros_like(WT)
    for i1 in range(0, WT.size(0), block_size):
        i2 = min(i1 + block_size, WT.size(0))
        W1, Hinv1 = WT[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            QT[i1 + i] = torch.clamp(torch.round(W1[i] / scale), -qmax, qmax)
            Err1[i] = (W1[i] - QT[i1 + i] * scale) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # lazy update of the columns after this block
    return QT

def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: tuple = (5,), block_size: int = 128,
                  percdamp: float = 0.01, clip_levels: tuple = (1.0,)) -> dict:
    """GPTQ of W (R, C) given H (C, C), columns by descending diag(H), damping percdamp * mean(diag H). Every
    (width, clip level) runs in one sweep as extra rows (GPTQ treats rows independently); per width each row keeps
    the clip with the least Hessian-weighted error *after* GPTQ. Returns {b: (Q int8, scale fp16, error (R,))}.
    GPTQ: arXiv:2210.17323; full-Hessian int5 GPTQ: PR #850 (baseline PR #414); per-row clip search: PR #850's."""
    W, H = W.float().clone(), H.float().clone()
    R, C = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # an input that is always zero: its weights do nothing
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    invperm = torch.argsort(perm)
    Hp = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(Hp))
    Hp += damp * torch.eye(C, device=H.device)
    L, info = torch.linalg.cholesky_ex(Hp)
    if info != 0:
        raise GolfError(f"GPTQ: Hessian not positive definite after damping GPTQ_PERCDAMP={percdamp}")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    grid = [(2 ** (b - 1) - 1, c) for b in bits for c in clip_levels]
    scales = torch.stack([int_row_scale(W, qmax, c).view(-1) for qmax, c in grid])  # (B*K, R)
    qmax = torch.tensor([float(qmax) for qmax, _ in grid], device=W.device).repeat_interleave(R)
    WT = W[:, perm].repeat(len(grid), 1).T.contiguous()
    Q = _gptq_columns(WT, Hinv, scales.view(-1), qmax, block_size).T[:, invperm]
    err = hessian_weighted_error(W.repeat(len(grid), 1), Q * scales.view(-1, 1), H).view(len(bits), -1, R)
    Q, scales = Q.view(len(bits), -1, R, C), scales.view(len(bits), -1, R)
    best, rows = err.argmin(1), torch.arange(R, device=W.device)  # (B, R): each row's clip level per width
    return {b: (Q[j, best[j], rows].to(torch.int8), scales[j, best[j], rows].half(), err[j, best[j], rows])
            for j, b in enumerate(bits)}

def _codes_per_byte(bits: int) -> int:
    """Widths that divide 8 are packed, others one per byte: after LZMA, int4 two to a byte is 0.9% smaller,
    int5/int6 bit-packed 9%/6% larger (logs/bench_quant_embedded_cpu.txt)."""
    return 8 // bits if 8 % bits == 0 else 1

def pack_codes(Q: torch.Tensor, bits: int) -> bytes:
    """Integers in [-qmax, qmax] as unsigned codes q + qmax, `_codes_per_byte` of them in a byte."""
    per = _codes_per_byte(bits)
    u = (Q.reshape(-1).to(torch.int16) + 2 ** (bits - 1) - 1).to(torch.uint8).cpu().numpy()
    u = np.concatenate([u, np.zeros(-u.size % per, dtype=np.uint8)]).reshape(-1, per)
    return np.bitwise_or.reduce(u << (bits * np.arange(per, dtype=np.uint8)), axis=1).astype(np.uint8).tobytes()

def unpack_codes(data: bytes, n: int, bits: int) -> torch.Tensor:
    qmax, per = 2 ** (bits - 1) - 1, _codes_per_byte(bits)
    b = np.frombuffer(data, dtype=np.uint8)
    u = ((b[:, None] >> (bits * np.arange(per, dtype=np.uint8))) & (2 ** (8 // per) - 1)).reshape(-1)[:n]
    if u.size != n or (n and u.max() > 2 * qmax):
        raise ValueError(f"{bits}-bit codes truncated or out of range")
    return torch.from_numpy(u.astype(np.int16) - qmax).to(torch.int8)

def quantize_tensor(name: str, W: torch.Tensor) -> dict:
    """A tensor that is not a block matrix -> int8 rows (embeddings, large matrices) or fp16 (pure)."""
    if name in EMBEDDING_NAMES or (W.ndim == 2 and W.numel() > SMALL_TENSOR_NUMEL):
        Q, scale = quantize_rtn(W, 8)
        return dict(kind="int", bits=8, q=Q, scale=scale)
    return dict(kind="fp16", data=W.half())

def encode_stream(entries: dict) -> tuple:
    """{name: entry} -> (metas, one xz stream of each tensor's codes and fp16 row scales, or fp16 values)."""
    metas, raw = [], []
    for name, e in entries.items():
        t = e["q"] if e["kind"] == "int" else e["data"]
        metas.append(dict(name=name, kind=e["kind"], bits=e.get("bits", 16), shape=list(t.shape)))
        raw += [pack_codes(t, e["bits"]), e["scale"].cpu().numpy().astype("<f2").tobytes()] if e["kind"] == "int" \
            else [t.cpu().numpy().astype("<f2").tobytes()]
    return metas, lzma.compress(b"".join(raw), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=LZMA_PRESET)

def decode_stream(metas: list, data: bytes) -> dict:
    raw, ends, out = lzma.decompress(data), [0], {}
    take = lambda k: raw[ends[-1]:ends.append(ends[-1] + k) or ends[-1]]  # the next k bytes
    fp16 = lambda k: torch.from_numpy(np.frombuffer(take(k), dtype="<f2").astype(np.float32))
    for t in metas:
        n = math.prod(t["shape"])
        out[t["name"]] = dequantize(unpack_codes(take(-(-n // _codes_per_byte(t["bits"]))), n, t["bits"]).view(
            t["shape"]), fp16(2 * t["shape"][0])) if t["kind"] == "int" else fp16(2 * n).view(t["shape"])
    if ends[-1] != len(raw):
        raise ValueError(f"stream of {len(raw)} bytes, its tensors {ends[-1]}")
    return out

def pack_artifact(header: dict, streams: list) -> bytes:
    """The container of (metas, stream) pairs; `header` holds the architecture and the hashes."""
    head = json.dumps({**header, "version": ARTIFACT_VERSION, "streams": [m for m, _ in streams]},
                      separators=(",", ":")).encode()
    return (ARTIFACT_MAGIC + struct.pack("<I", len(head)) + head
            + struct.pack(f"<{len(streams)}I", *(len(s) for _, s in streams)) + b"".join(s for _, s in streams))

def parse_header(blob: bytes) -> tuple:
    if blob[:len(ARTIFACT_MAGIC)] != ARTIFACT_MAGIC:
        raise ValueError("bad magic")
    (hlen,) = struct.unpack_from("<I", blob, len(ARTIFACT_MAGIC))
    off = len(ARTIFACT_MAGIC) + 4
    header = json.loads(blob[off:off + hlen])
    if header["version"] != ARTIFACT_VERSION:
        raise ValueError(f"version {header['version']} != {ARTIFACT_VERSION}")
    return header, off + hlen

def deserialize_artifact(blob: bytes) -> tuple:
    """Inverse of pack_artifact: (header, {name: float32 tensor}). Needs nothing but the bytes."""
    header, off = parse_header(blob)
    lengths = struct.unpack_from(f"<{len(header['streams'])}I", blob, off)
    off += 4 * len(lengths)
    if off + sum(lengths) != len(blob):
        raise ValueError(f"{len(blob)} bytes, the header says {off + sum(lengths)}")
    ends = np.cumsum((off,) + lengths).tolist()
    with ThreadPoolExecutor(usable_cpus()) as pool:  # LZMA releases the GIL
        parts = pool.map(decode_stream, header["streams"], [blob[a:b] for a, b in zip(ends, ends[1:])])
        return header, {k: v for part in parts for k, v in part.items()}

def _decode_file(path: Path, decode):
    try:
        return decode(Path(path).read_bytes())
    except FileNotFoundError:
        raise GolfError(f"artifact {path}: no such file") from None
    except (lzma.LZMAError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        raise GolfError(f"artifact {path}: corrupt or not an artifact of this script ({e})") from None

def read_artifact(path: Path) -> tuple:
    return _decode_file(path, deserialize_artifact)

def artifact_header(path: Path) -> dict:
    """The artifact's JSON header (config, code_sha256, tokenizer_sha256, each tensor's kind, bits and shape)."""
    return _decode_file(path, lambda blob: parse_header(blob)[0])

def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def model_from_artifact(path: Path, hp: Hyperparameters, d: Dist, log: RunLog | None = None) -> GPT:
    """Rebuild the network from the artifact alone (every shape from its header), trained with TOKENIZER_PATH's."""
    header, tensors = read_artifact(path)
    config = header["config"]
    if set(config) != set(MODEL_FIELDS) or config["vocab_size"] != hp.vocab_size:
        raise GolfError(f"artifact {path}: architecture {config} does not fit this script with VOCAB_SIZE={hp.vocab_size}")
    if Path(hp.tokenizer_path).is_file() and file_sha256(hp.tokenizer_path) != header["tokenizer_sha256"]:
        raise GolfError(f"artifact {path} was trained with the tokenizer of sha256 {header['tokenizer_sha256']}, but "
                        f"TOKENIZER_PATH={hp.tokenizer_path} has sha256 {file_sha256(hp.tokenizer_path)}")
    arch = dataclasses.replace(hp, **config)
    arch.validate()
    model = GPT(arch).to(d.device)
    try:
        load_unbanked_state_dict(model, {k: v.to(d.device) for k, v in tensors.items()})
    except (KeyError, RuntimeError) as e:
        raise GolfError(f"artifact {path}: tensors do not match its architecture ({e})") from None
    if log is not None:
        widths = sorted(t["bits"] for s in header["streams"][1:] for t in s)
        log(f"artifact_loaded: {path} config:{json.dumps(config, separators=(',', ':'))} matrix_bits:"
            f"{','.join(f'int{b}x{widths.count(b)}' for b in sorted(set(widths)))} code_sha256:"
            f"{header['code_sha256'][:16]} same_code:{header['code_sha256'] == code_identity()[2]}")
    return model

@torch.no_grad()
def collect_hessians(model: GPT, hp: Hyperparameters, d: Dist) -> dict:
    """H = mean x^T x of every block matrix's input over GPTQ_N_SAMPLES training sequences, identical on
    all ranks (each rank takes a share, then one all-reduce). q/k/v share one input, so one H. The tied
    embedding is quantized as the output head it also is: its H is that of the final hidden states (PR #1394).
    A looped layer's hooks fire on every pass: its H sums them (the error counts once per pass)."""
    sources = {f"blocks.{i}.{key}": block.get_submodule(key) for i, block in enumerate(model.blocks)
               for key in ("attn.c_q", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    C = {name: W.size(1) for name, W in block_matrices(model).items()}
    C[TIED_EMBED] = model.hp.model_dim
    H = {name: torch.zeros(C[name], C[name], device=d.device) for name in [*sources, TIED_EMBED]}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].size(-1)).float()
            H[name].addmm_(x.T, x)
        return fn

    handles = [slot.register_forward_pre_hook(hook(name)) for name, slot in sources.items()]
    seq = hp.train_seq_len
    tokens = TokenStream(hp.data_path).take(hp.gptq_n_samples * seq)
    lo, hi = hp.gptq_n_samples * d.rank // d.world_size, hp.gptq_n_samples * (d.rank + 1) // d.world_size
    batch = hp.eval_batch_seqs  # sequences per no-grad forward, as in evaluation
    model.eval()
    try:
        for s in range(lo, hi, batch):
            x = tokens[s * seq:min(hi, s + batch) * seq].view(-1, seq).to(d.device, dtype=torch.int64)
            with autocast(d):
                h = model.hidden(x).detach().reshape(-1, model.hp.model_dim).float()
            H[TIED_EMBED].addmm_(h.T, h)
    finally:
        for h in handles:
            h.remove()
        model.train()
    for name in list(H):
        H[name] = all_reduce(H[name]) / tokens.numel()
        if name.endswith("attn.c_q"):
            H[name[:-3] + "c_k"] = H[name[:-3] + "c_v"] = H[name]
    return H

def assign_groups(shapes: dict, hessians: dict, world_size: int) -> list:
    """[(names, owner rank)]: the block matrices grouped by shared Hessian (q, k, v read one input: one
    Cholesky, one sweep), the groups spread over the ranks by their GPTQ cost rows * C^2, largest first."""
    groups = {}
    for name in shapes:
        groups.setdefault(id(hessians[name]), []).append(name)
    groups = list(groups.values())
    cost = [sum(shapes[n][0] for n in g) * shapes[g[0]][1] ** 2 for g in groups]
    load, owners = [0] * world_size, [0] * len(groups)
    for i in sorted(range(len(groups)), key=lambda i: -cost[i]):
        owners[i] = min(range(world_size), key=load.__getitem__)
        load[owners[i]] += cost[i]
    return list(zip(groups, owners))

def gather_to_main(obj, d: Dist) -> list | None:
    """[every rank's obj] on rank 0, None elsewhere (one process: [obj])."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out

def quantize_model(sd: dict, hessians: dict, hp: Hyperparameters, d: Dist) -> dict | None:
    """Each rank GPTQs its groups of `sd`'s block matrices (those with a Hessian) at every width, compressing meanwhile;
    rank 0 gets {"rest": (metas, stream), "matrices": {name: {bits: ((metas, stream), error, rank)}}}, others None."""
    key = {k: k.removesuffix(".weight") for k in sd}
    shapes = {key[k]: tuple(W.shape) for k, W in sd.items() if key[k] in hessians}
    mine = {}
    with ThreadPoolExecutor(max(1, usable_cpus() // d.world_size)) as pool:
        for names, owner in assign_groups(shapes, hessians, d.world_size):
            if owner != d.rank:
                continue
            Ws = [sd[n + ".weight"] for n in names]
            widths = hp.embed_widths() if names == [TIED_EMBED] else hp.bit_widths()
            res = gptq_quantize(torch.cat(Ws), hessians[names[0]], widths, hp.gptq_block_size, hp.gptq_percdamp,
                                hp.clip_levels())
            rows = np.cumsum([0] + [W.size(0) for W in Ws]).tolist()
            for name, r0, r1 in zip(names, rows, rows[1:]):
                mine[name] = {b: (pool.submit(encode_stream, {name + ".weight": dict(
                    kind="int", bits=b, q=Q[r0:r1].cpu(), scale=s[r0:r1].cpu())}), e[r0:r1].sum().item(), d.rank)
                    for b, (Q, s, e) in res.items()}
        mine = {n: {b: (f.result(), e, r) for b, (f, e, r) in c.items()} for n, c in mine.items()}
    parts = gather_to_main(mine, d)
    if parts is None:
        return None
    matrices = {n: c for part in parts for n, c in part.items()}
    rest = {k: quantize_tensor(k, W) for k, W in sd.items() if key[k] not in shapes}
    return dict(rest=encode_stream(rest), matrices={n: matrices[n] for n in shapes})

def allocate_bits(sizes: dict, errors: dict, budget: int, start: dict) -> tuple:
    """Widths with sum(sizes[n][width]) <= budget, from `start` one step at a time: while over, lower the matrix
    whose error rises least per byte saved; then, while a raise fits, raise the one whose error drops most per byte
    added. Returns (choice, [(name, old, new, total after)], total); total > budget if nothing fits."""
    choice = dict(start)
    total, moves = sum(sizes[n][b] for n, b in choice.items()), []

    def step(n, up):  # (width, byte change, error change) of n's next width step, or None
        ws = sorted(sizes[n])
        i = ws.index(choice[n]) + (1 if up else -1)
        return (w := ws[i], sizes[n][w] - sizes[n][choice[n]], errors[n][w] - errors[n][choice[n]]) \
            if 0 <= i < len(ws) else None

    while True:
        over = total > budget
        cands = [(s[2] / -s[1], n, s) for n in sizes if (s := step(n, False)) and s[1] < 0] if over else \
            [(s[2] / max(s[1], 1), n, s) for n in sizes if (s := step(n, True)) and s[2] < 0 and total + s[1] <= budget]
        if not cands:
            return choice, moves, total
        _, n, (w, db, _) = min(cands, key=lambda c: c[0])
        total += db
        moves.append((n, choice[n], w, total))
        choice[n] = w

def write_artifact(q: dict, header: dict, budget: int, path: Path, log: RunLog) -> int:
    """Choose the widths (`allocate_bits` on the measured stream sizes) to fit `budget`, write, return the size;
    where even the smallest widths do not fit, write nothing and return their size (> budget). Logs every step."""
    mats, rest = q["matrices"], q["rest"]
    sizes = {n: {b: len(c[b][0][1]) for b in c} for n, c in mats.items()}
    errors = {n: {b: c[b][1] for b in c} for n, c in mats.items()}
    start = {n: BASE_BITS if BASE_BITS in c else max(c) for n, c in mats.items()}  # the embedding: EMBED_BITS
    for n, c in mats.items():
        log(f"gptq: {n}.weight shape:{tuple(c[start[n]][0][0][0]['shape'])} rank:{c[start[n]][2]} "
            + " ".join(f"int{b}:{sizes[n][b]}B,h_err:{errors[n][b]:.4e}" for b in sorted(c)))
    streams = lambda choice: [rest] + [mats[n][choice[n]][0] for n in mats]  # stream 0: all but the matrices
    fixed = len(pack_artifact(header, [(m, s if i == 0 else b"") for i, (m, s) in enumerate(streams(start))]))
    choice, moves, total = allocate_bits(sizes, errors, budget - fixed, start)
    for n, old, new, t in moves:
        log(f"quant_alloc: {n}.weight int{old}->int{new} bytes:{sizes[n][old]}->{sizes[n][new]} "
            f"h_err:{errors[n][old]:.4e}->{errors[n][new]:.4e} artifact:{fixed + t}")
    widths = [b for n, b in choice.items() if n != TIED_EMBED]
    log(f"quant_alloc: widths:{','.join(f'int{b}x{widths.count(b)}' for b in sorted(set(widths)))} "
        f"{TIED_EMBED}:int{choice.get(TIED_EMBED, 0)} artifact:{fixed + total} budget:{budget} "
        f"headroom:{budget - fixed - total} h_err:{sum(errors[n][b] for n, b in choice.items()):.4e} "
        f"start_h_err:{sum(errors[n][b] for n, b in start.items()):.4e}")
    if fixed + total > budget:
        return fixed + total
    blob = pack_artifact(header, streams(choice))
    if len(blob) != fixed + total:  # the header's length does not depend on the widths (one digit each)
        raise RuntimeError(f"artifact is {len(blob)} bytes, its parts {fixed + total}")
    write_atomic(path, blob)
    return len(blob)


# ==================== Evaluation =====================================================================
# README "Evaluation", the number that is reported. One left-to-right pass over the validation tokens in chunks of
# TTT_CHUNK_TOKENS targets. For each chunk: (1) score every target once with a sliding window (length
# EVAL_SEQ_LEN, stride EVAL_STRIDE; windows split across ranks) with the LoRA weights and temperature
# learned from earlier chunks; (2) mix the model's distribution with the Witten-Bell n-gram chain over
# counts of earlier chunks only; (3) add the chunk to the cache and to the mixer's history, refit the
# mixer; (4) TTT_STEPS LoRA steps on the chunk; (3) and (4) not after the last. EVAL_MODE=doc: a step
# is a group of documents, each scored from its own BOS in rounds of DOC_CHUNK_TOKENS targets (doc_schedule), the
# cache's counts plus a local layer of the document's own scored chunks (score_docs), DocTTT, phased_sgd. Every
# validity condition (C1-C4) is tested in tests/test_eval_validity.py.

def make_windows(n_tokens: int, seq_len: int, stride: int) -> torch.Tensor:
    """Sliding windows (parameter-golf records, e.g. PR #65) over targets 1..n_tokens-1, each scored once:
    (K, 3) rows of (input start, first scored target, last scored target). The first window scores its whole
    length, later ones their last `stride`: a target sees >= seq_len - stride tokens of context once there are."""
    last = n_tokens - 1
    first_end = min(seq_len, last)
    ends = torch.cat([torch.arange(first_end, last, stride), torch.tensor([last])])
    lo = torch.cat([torch.tensor([1]), ends[:-1] + 1])
    return torch.stack([(ends - seq_len).clamp(min=0), lo, ends], dim=1)

@dataclass
class Scored:
    """Per-target results of one rank for one chunk (float64 except the int64 positions)."""
    pos: torch.Tensor        # (M,) target positions
    logp: torch.Tensor       # (M,) model log-probability of the target (after temperature)
    entropy: torch.Tensor    # (M,) model entropy in nats
    dz: torch.Tensor         # (M,) target logit minus its mean under the scored distribution
    var_z: torch.Tensor      # (M,) variance of the logits under the scored distribution
    audit_pos: torch.Tensor  # (A,) audited target positions in this rank's share
    audit_rows: torch.Tensor  # (A, V) full model log-probabilities there
    ce: torch.Tensor | None = None   # (M,) with score_windows(train=True): CE with its graph
    row: torch.Tensor | None = None  # (M,) the window (batch row) of each target
    local: tuple | None = None       # doc mode: (C, c, u) of the document-local cache layer at pos, at audit_pos (rows)

def audit_positions(n_tokens: int, k: int, path: str = "") -> torch.Tensor:
    """The audited targets: those listed in `path` (an .npy chosen by a reviewer, e.g. tools/verify.py at random),
    else K positions spread evenly over the whole pass; from positions only, never from tokens."""
    if not path:
        return torch.linspace(1, n_tokens - 1, min(k, n_tokens - 1)).round().long().unique()
    try:
        pos = torch.from_numpy(np.load(path).astype(np.int64).reshape(-1)).unique()
    except (OSError, ValueError) as e:
        raise GolfError(f"EVAL_AUDIT_PATH={path!r}: not an .npy of target positions ({e})") from None
    if pos.numel() and (pos.min() < 1 or pos.max() > n_tokens - 1):
        raise GolfError(f"EVAL_AUDIT_PATH={path!r}: positions must be targets 1..{n_tokens - 1}")
    return pos

def score_windows(model: GPT, hidden_fn, tokens: torch.Tensor, windows: torch.Tensor, hp: Hyperparameters,
                  temperature: float, d: Dist, audit_pos: torch.Tensor, length: int = 0, train: bool = False) -> Scored:
    """Score the targets lo..hi of each window (start, lo, hi) from its inputs start..start+length-1 (length 0:
    hi - start). train: also the per-target CE with its graph (doc-mode TTT backpropagates the scored forward)."""
    out = collections.defaultdict(list)
    B, N = hp.eval_batch_seqs, tokens.numel()
    for b in range(0, windows.size(0), B):
        w = windows[b:b + B]
        n, T = w.size(0), length or int(w[0, 2] - w[0, 0])
        if n < B:  # fixed shapes: for the compiled forward, and so a row's result never depends on the batch
            w = torch.cat([w, w[-1:].expand(B - n, 3)])  # (a shorter text scores its earlier targets bit-identically)
        start, lo, hi = (w[:, i].to(d.device) for i in range(3))
        idx = (start[:, None] + torch.arange(T, device=d.device)).clamp(max=N - 1)  # (B, T) input positions
        with torch.set_grad_enabled(train), autocast(d):
            h = hidden_fn(tokens[idx])  # (B, T, D)
        j = torch.arange(T, device=d.device)[None, :]
        mask = (j >= (lo - start - 1)[:, None]) & (j <= (hi - start - 1)[:, None])
        mask &= (torch.arange(B, device=d.device) < n)[:, None]
        tgt_pos = (idx + 1)[mask]
        with torch.set_grad_enabled(train):
            z32 = model.logits(h[mask])
        if train:
            out["ce"].append(F.cross_entropy(z32 / temperature, tokens[tgt_pos], reduction="none"))
        out["row"].append((b + torch.arange(B, device=d.device))[:, None].expand(B, T)[mask])
        z = z32.detach().double()  # (M, V)
        lp = torch.log_softmax(z / temperature, dim=-1)  # float64: the scored distribution sums to 1 to ~1e-15
        p, z_t = lp.exp(), z.gather(1, tokens[tgt_pos][:, None]).squeeze(1)
        mean_z = (p * z).sum(-1)
        out["pos"].append(tgt_pos)
        out["logp"].append(lp.gather(1, tokens[tgt_pos][:, None]).squeeze(1))
        out["entropy"].append(-(p * lp).sum(-1))
        out["dz"].append(z_t - mean_z)
        out["var_z"].append((p * z * z).sum(-1) - mean_z ** 2)
        audited = torch.isin(tgt_pos, audit_pos)
        out["audit_pos"].append(tgt_pos[audited])
        out["audit_rows"].append(lp[audited])
    empty = torch.zeros(0, device=d.device, dtype=torch.float64)
    cat = lambda k, e: torch.cat(out[k]) if out[k] else e
    return Scored(*(cat(k, empty) for k in ("pos", "logp", "entropy", "dz", "var_z")),
                  cat("audit_pos", empty.long()), cat("audit_rows", empty.view(0, hp.vocab_size)),
                  cat("ce", empty.float()), cat("row", empty.long()))

def add_run(runs: list, keys: torch.Tensor, counts: torch.Tensor) -> None:
    """Append sorted unique `keys` with `counts` as a run (keys, prefix sums of counts), merging
    log-structured: a run is merged into the previous one while that one is not at least twice its size."""
    if keys.numel():
        runs.append((keys, torch.cat([counts.new_zeros(1), counts.cumsum(0)])))
    while len(runs) >= 2 and runs[-2][0].numel() <= 2 * runs[-1][0].numel():
        (k2, c2), (k1, c1) = runs.pop(), runs.pop()
        keys, inv = torch.unique(torch.cat([k1, k2]), return_inverse=True)
        merged = torch.zeros_like(keys).index_add_(0, inv, torch.cat([c1.diff(), c2.diff()]))
        runs.append((keys, torch.cat([merged.new_zeros(1), merged.cumsum(0)])))

def exact_counts(runs: list, keys: torch.Tensor) -> torch.Tensor:
    """Total count stored under each key (one exact-match binary search per run)."""
    total = torch.zeros_like(keys)
    for run_keys, cum in runs:
        i = torch.searchsorted(run_keys, keys).clamp(max=run_keys.numel() - 1)
        total += torch.where(run_keys[i] == keys, cum[i + 1] - cum[i], 0)
    return total

class NGramCache:
    """Exact counts of (context, next token) for orders NGRAM_EVAL_MIN_ORDER..NGRAM_EVAL_ORDER over
    tokens already scored, and per context the number of distinct next tokens (a second table: a pair adds
    1 to its context the first time it is ever seen). Key of a pair = order (4 bits) | 49-bit hash of the
    n - 1 previous tokens | token (10 bits for V=1024), in one int64: all pairs of a context are contiguous
    in key order, so count(ctx) = sum_v count(ctx, v) by construction (a prefix-sum difference), even if
    two contexts collide in the hash. Each table is a few sorted runs (add_run): an update is one sort, a
    look-up one binary search per run, vectorized over a chunk and all orders, on the GPU when there is one.
    Lineage: order-2..9 backoff cache with entropy-adaptive per-order mixing: PR #809 (entropy centers: PR #798);
    65K chunks: PR #840; integrated TTT + n-gram loop: PR #779.
    Exact per-context counts (valid): this project, after the ruling on hashed caches (PR #779, PR #720)."""

    PRIME = 2 ** 31 - 1
    BASES = (1_000_003, 1_234_567_891)
    ORDER_BITS = 4

    def __init__(self, min_order: int, max_order: int, vocab_size: int, tag_bits: int = 0):
        self.orders = list(range(max_order, min_order - 1, -1))  # highest first
        self.vbits = max(1, (vocab_size - 1).bit_length())
        # tag_bits: a document-local cache's keys carry the document as explicit bits above the hash, so two
        # documents never share a count, whatever the hashes do
        self.ctx_bits = 63 - self.ORDER_BITS - tag_bits - self.vbits
        self.runs, self.distinct_runs = [], []  # on the device of the tokens they are built from

    def context_keys(self, tokens: torch.Tensor, pos: torch.Tensor, tag: torch.Tensor | None = None) -> tuple:
        """(K, M) keys of the contexts tokens[p-n+1 : p] (token bits zero; the document `tag` (M,) of a local cache)
        for each order n of self.orders and each target position p, and whether the context lies inside the text."""
        a, b = torch.zeros_like(pos), torch.zeros_like(pos)
        keys = {}
        for k in range(1, self.orders[0]):
            t = tokens[(pos - k).clamp(min=0)] + 1
            a = (a * self.BASES[0] + t) % self.PRIME  # < 2^62: no int64 overflow
            b = (b * self.BASES[1] + t) % self.PRIME
            h = ((a << max(0, self.ctx_bits - 31)) ^ b) & ((1 << self.ctx_bits) - 1)
            keys[k + 1] = ((k + 1) << (63 - self.ORDER_BITS)) | (h << self.vbits)
        lo = torch.stack([keys[n] for n in self.orders])
        if tag is not None:
            lo = lo | (tag << (self.ctx_bits + self.vbits))
        valid = torch.stack([pos - (n - 1) >= 0 for n in self.orders])
        return lo, valid

    def _prefix(self, keys: torch.Tensor, right: bool) -> torch.Tensor:
        """Total count of all stored pairs with key < keys (<= with right=True), over all runs."""
        total = torch.zeros_like(keys)
        for run_keys, cum in self.runs:
            total += cum[torch.searchsorted(run_keys, keys, right=right)]
        return total

    @staticmethod
    def _in_key_order(fn, keys: torch.Tensor) -> torch.Tensor:
        """fn on the keys sorted (binary searches in key order are cache-friendly: ~5x on CPU), unsorted."""
        flat, perm = keys.reshape(-1).sort()
        out = torch.empty_like(flat)
        out[perm] = fn(flat)
        return out.view_as(keys)

    def context_counts(self, ctx: torch.Tensor) -> torch.Tensor:
        """count(ctx) = sum over v of count(ctx, v): the pairs in the key range [ctx | 0, ctx | V-1]."""
        return self._in_key_order(
            lambda c: self._prefix(c | ((1 << self.vbits) - 1), True) - self._prefix(c, False), ctx)

    def pair_counts(self, key: torch.Tensor) -> torch.Tensor:
        """count(ctx, v) for pair keys ctx | v."""
        return self._in_key_order(lambda k: exact_counts(self.runs, k), key)

    def stats(self, tokens: torch.Tensor, pos: torch.Tensor, tgt: torch.Tensor | None = None, tag=None) -> tuple:
        """float64 (count(ctx), count(ctx, v), distinct(ctx)) for every order (highest first) at the target
        positions `pos`: shapes (K, M), (K, M) with v = tokens[pos] or (K, M, V') for tgt of shape (M, V'),
        (K, M). Contexts reaching before the text count 0."""
        ctx, valid = self.context_keys(tokens, pos, tag)
        ctx = torch.where(valid, ctx, 0)  # order 0 keys are never stored
        tgt = tokens[pos] if tgt is None else tgt
        pair = self.pair_counts(ctx | tgt) if tgt.dim() == 1 else self.pair_counts(ctx[..., None] | tgt)
        distinct = self._in_key_order(lambda k: exact_counts(self.distinct_runs, k), ctx)
        return self.context_counts(ctx).double(), pair.double(), distinct.double()

    def update(self, tokens: torch.Tensor, pos: torch.Tensor, tag=None, base: "NGramCache | None" = None) -> None:
        """Add the pairs (context, tokens[p]) of every order for every target position p in `pos`. With `base`
        (the cache this local one is added to, unchanged meanwhile) a pair it holds is no new continuation, so
        the distinct counts of both add up to those of the union."""
        lo, valid = self.context_keys(tokens, pos, tag)
        keys, inv, counts = torch.unique((lo | tokens[pos])[valid], return_inverse=True, return_counts=True)
        new = exact_counts(self.runs, keys) == 0  # pairs never seen before: one more distinct continuation
        if base is not None:
            base_keys = (base.context_keys(tokens, pos)[0] | tokens[pos])[valid]
            new &= exact_counts(base.runs, torch.zeros_like(keys).scatter_(0, inv, base_keys)) == 0
        ctx, n_new = torch.unique(keys[new] >> self.vbits << self.vbits, return_counts=True)
        add_run(self.runs, keys, counts)
        add_run(self.distinct_runs, ctx, n_new)

    def memory_bytes(self) -> int:
        return sum(k.numel() * 8 + c.numel() * 8 for k, c in self.runs + self.distinct_runs)

def witten_bell(lp_model: torch.Tensor, C: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
                beta: torch.Tensor) -> tuple:
    """Interpolated Witten-Bell over the orders (Witten & Bell 1991; Chen & Goodman 1998), bottoming out
    in the model: p_n(v) = (c_n(v) + k_n p_{n-1}(v)) / (C_n + k_n), k_n = beta_n * distinct_n, from the
    lowest order up; p_n = p_{n-1} where the context was never seen. Each step is a convex mix of a count
    distribution and a distribution, so sum_v p(v) = 1 by construction, and an unseen target keeps
    k_n / (C_n + k_n) of its lower-order probability (mixing only the highest seen order with the model,
    PR #809's backoff, scored 0.02-0.07 BPB worse: logs/ablate_eval_20261126.txt). Shapes: lp_model (M,)
    or (M, V); C, u, beta (K, M) or broadcastable to c (K, M[, V]), orders highest first. Returns (log p, the weight not on the model)."""
    if c.dim() > C.dim():  # whole rows: one context per row, all tokens
        C, u, beta = C[..., None], u[..., None], beta[..., None]
    p = lp_model.exp()
    w_model = torch.ones_like(p)
    for k in reversed(range(C.size(0))):
        kappa = beta[k] * u[k]
        den = (C[k] + kappa).clamp(min=1e-30)  # C = 0 gives 0 / 1e-30 below, never a NaN gradient
        p = torch.where(C[k] > 0, (c[k] + kappa * p) / den, p)
        w_model = torch.where(C[k] > 0, w_model * kappa / den, w_model)
    return p.log(), 1 - w_model

class LearnedMix:
    """Mixing parameters fitted online on targets already scored (C3: a chunk's values are fixed before it
    is scored): log beta per (order, model-entropy bin) of the Witten-Bell chain and log(1/temperature),
    starting at beta = BETA_INIT and TTT_TEMPERATURE. After each chunk, every FIT_EVERY-th
    target joins a history of FIT_WINDOW chunks and FIT_STEPS Adam steps are taken on its mean mixed NLL
    (gradients summed over ranks: every rank holds the same values). The temperature enters the fit by a
    second-order expansion of log p_T(target) around the scoring temperature (scoring itself is exact)."""

    BIN_WIDTH, BINS, FIT_EVERY, FIT_WINDOW, FIT_STEPS, LR = 1.0, 4, 8, 16, 8, 0.05
    BETA_INIT = 8.0  # a context seen once first keeps 8/9 on the model; plain Witten-Bell's 1/2 (beta = 1) scored early
    # chunks worse than the model alone: 0.06-0.11 BPB lost, 2 seeds x 2 texts (logs/eval_mix_init_20261126.txt)

    def __init__(self, n_orders: int, hp: Hyperparameters, d: Dist):
        self.K, self.learn, self.d = n_orders, hp.eval_learned_mix, d
        self.theta = torch.full((n_orders * self.BINS + 1,), math.log(self.BETA_INIT), dtype=torch.float64,
                                device=d.device)
        self.theta[-1] = -math.log(hp.ttt_temperature)
        self.theta.requires_grad_(self.learn)
        self.opt = torch.optim.Adam([self.theta], lr=self.LR) if self.learn else None
        self.history = []

    @property
    def temperature(self) -> float:
        return math.exp(-float(self.theta.detach()[-1]))

    def beta(self, entropy: torch.Tensor) -> torch.Tensor:
        """(K, M) escape multipliers of each target's entropy bin."""
        b = (entropy / self.BIN_WIDTH).long().clamp(max=self.BINS - 1)
        return self.theta[:-1].view(self.K, self.BINS).exp()[:, b]

    def mix(self, lp_model: torch.Tensor, entropy: torch.Tensor, C, c, u) -> tuple:
        with torch.no_grad():
            return witten_bell(lp_model, C, c, u, self.beta(entropy))

    def observe(self, sc: Scored, C, c, u) -> None:
        """Add a chunk that has been scored to the history and refit (no-op when EVAL_LEARNED_MIX=0)."""
        if not self.learn:
            return
        keep = sc.pos % self.FIT_EVERY == 0
        s0 = torch.full_like(sc.logp, 1 / self.temperature)
        self.history = self.history[-(self.FIT_WINDOW - 1):] + [
            (sc.logp[keep], sc.entropy[keep], sc.dz[keep], sc.var_z[keep], s0[keep], C[:, keep], c[:, keep], u[:, keep])]
        lp0, ent, dz, var, s0, C, c, u = (torch.cat(x, dim=-1) for x in zip(*self.history))
        for _ in range(self.FIT_STEPS):
            ds = self.theta[-1].exp() - s0
            lp = (lp0 + ds * dz - 0.5 * var * ds ** 2).clamp(max=0.0)  # log p at the new temperature
            loss = -witten_bell(lp, C, c, u, self.beta(ent))[0].sum()
            grad, = torch.autograd.grad(loss, self.theta)
            total = all_reduce(torch.cat([grad, grad.new_tensor([float(lp0.numel())])]))
            self.theta.grad = total[:-1] / total[-1].clamp(min=1)
            self.opt.step()
            with torch.no_grad():
                self.theta.clamp_(-5.0, 5.0)

def ngram_stats(cache: NGramCache | None, tokens: torch.Tensor, pos: torch.Tensor, tgt=None) -> tuple:
    """cache.stats, or empty (0, M) tensors (no orders) without a cache."""
    if cache is not None:
        return cache.stats(tokens, pos, tgt)
    empty = torch.zeros(0, pos.numel(), dtype=torch.float64, device=tokens.device)
    return empty, empty if tgt is None else empty[..., None].expand(0, pos.numel(), tgt.size(1)), empty

def ngram_audit(cache: NGramCache | None, mixer: LearnedMix, tokens: torch.Tensor, sc: Scored,
                mixed: torch.Tensor) -> tuple:
    """Materialize the full mixed distribution at the audited targets. Returns ([max |sum p - 1|, -min p,
    max |log p[target] - scored log p|, count mismatches] (all should be ~0), the (A, V) distributions, the
    (A, K) escape multipliers they were mixed with)."""
    i = torch.nonzero(torch.isin(sc.pos, sc.audit_pos)).flatten()  # same order as audit_pos
    V = sc.audit_rows.size(1)
    C, c, u = ngram_stats(cache, tokens, sc.audit_pos, torch.arange(V, device=tokens.device).expand(i.numel(), V))
    if sc.local is not None:
        C, c, u = (x + y for x, y in zip((C, c, u), sc.local[1]))
    mismatch = (c.sum(-1) != C).sum().double()  # sum_v count(ctx, v) must equal count(ctx)
    beta = mixer.beta(sc.entropy[i]).detach()
    logp, _ = mixer.mix(sc.audit_rows, sc.entropy[i], C, c, u)
    p = logp.exp()
    target_err = (logp.gather(1, tokens[sc.audit_pos][:, None]).squeeze(1) - mixed[i]).abs()
    zero = torch.zeros(1, dtype=torch.float64, device=tokens.device)
    return torch.stack([torch.cat([(p.sum(1) - 1).abs(), zero]).max(), torch.cat([-p.flatten(), zero]).max(),
                        torch.cat([target_err, zero]).max(), mismatch]), p, beta.T

def attach_loras(model: GPT, hp: Hyperparameters, d: Dist, batch: int) -> list:
    """Freeze the model and put LoRA adapters (`batch` per slot) on the q and v projections of the last TTT_LAST_N
    blocks, A0 ~ N(0, 1/in) from SEED + 1; returns the slots. Shapes from the loaded model (EVAL_ONLY: the artifact's)."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen, arch, slots = torch.Generator().manual_seed(hp.seed + 1), model.hp, []
    for block in model.blocks[-hp.ttt_last_n:]:
        for slot, out_features in ((block.attn.c_q, arch.model_dim), (block.attn.c_v, arch.kv_dim)):
            A0 = torch.randn(hp.ttt_lora_rank, arch.model_dim, generator=gen) / math.sqrt(arch.model_dim)
            slot.lora = LoRA(A0.to(d.device), out_features, batch)
            slots.append(slot)
    return slots

def byte_weighted_grads(model: GPT, tokens: torch.Tensor, lo: int, n_seqs: int, S: int, params: list,
                        hp: Hyperparameters, d: Dist, luts: ByteLUTs) -> None:
    """Set .grad of `params`, the same on every rank, to the gradient of the byte-weighted mean CE of the n_seqs
    sequences of S targets from target lo on: the sequences split across ranks (EVAL_BATCH_SEQS per forward), each
    rank's loss its share of the one global mean, the gradients summed."""
    idx = lo - 1 + S * torch.arange(n_seqs, device=tokens.device)[:, None] + torch.arange(S, device=tokens.device)
    x, y = tokens[idx], tokens[idx + 1]  # (n_seqs, S)
    w = target_bytes(x, y, luts).clamp(min=1).double()
    total = w.sum()  # the whole mean's bytes: every rank knows them, no communication
    for p in params:
        p.grad = torch.zeros_like(p)  # a rank with no sequences (more ranks than sequences) adds zero
    hi = n_seqs * (d.rank + 1) // d.world_size
    for b in range(n_seqs * d.rank // d.world_size, hi, hp.eval_batch_seqs):
        e = min(b + hp.eval_batch_seqs, hi)
        with autocast(d):
            z = model.logits(model.hidden(x[b:e]))
        ce = F.cross_entropy(z.flatten(0, 1), y[b:e].flatten(), reduction="none")
        ((ce.double() * w[b:e].flatten()).sum() / total).backward()
    all_reduce_grads(params, "sum")

class TestTimeTrainer:
    """LoRA TTT (PR #850; score-first: PR #461) on the q and v projections of the last TTT_LAST_N blocks: after
    a chunk is scored, TTT_STEPS AdamW steps on its byte-weighted CE (PR #850; sequences split across ranks,
    gradients averaged); the next chunk is scored with the live adapters (#850's Polyak average, PR #798, was
    inert here: logs/sweep_ttt_eval_20261126.txt)."""

    def __init__(self, model: GPT, hp: Hyperparameters, d: Dist):
        self.model, self.hp, self.d = model, hp, d
        self.loras = [slot.lora for slot in attach_loras(model, hp, d, 1)]
        self.params = [p for lora in self.loras for p in (lora.A, lora.B)]
        self.opt = torch.optim.AdamW(self.params, lr=hp.ttt_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step(self, tokens: torch.Tensor, lo: int, hi: int, luts: ByteLUTs) -> None:
        """One step on the targets lo..hi (a whole chunk, a multiple of EVAL_SEQ_LEN targets)."""
        S = self.hp.eval_seq_len
        byte_weighted_grads(self.model, tokens, lo, (hi - lo + 1) // S, S, self.params, self.hp, self.d, luts)
        torch.nn.utils.clip_grad_norm_(self.params, self.hp.ttt_grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

def doc_spans(tokens: torch.Tensor) -> torch.Tensor:
    """(D, 2) rows (BOS position, last target) of the documents: a document is scored from its own BOS, and its
    last target is the next document's BOS (the text's last token for the last one), so the targets partition."""
    N = tokens.numel()
    s = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(tokens[1:N - 1].cpu() == BOS_ID).flatten() + 1])
    return torch.stack([s, torch.cat([s[1:], s.new_tensor([N - 1])])], dim=1)

def doc_schedule(spans: torch.Tensor, hp: Hyperparameters) -> tuple:
    """Rounds of windows (start, lo, hi) for documents `spans`: row b scores documents b, b+B, ... (B =
    EVAL_BATCH_SEQS) one DOC_CHUNK_TOKENS chunk per round, each chunk from the window of EVAL_SEQ_LEN inputs ending
    at its last target, starting at the document's BOS while that fits (the document's later tokens, its end
    included, never change a window). Returns (R, B, 3) windows (lo > hi: idle), (R, B) first chunk of a
    document, (R, B) a chunk of the same document follows."""
    B, c, L = hp.eval_batch_seqs, hp.doc_chunk_tokens, hp.eval_seq_len
    rows = []
    for b in range(B):
        parts = [torch.zeros(0, 5, dtype=torch.long)]
        for s, e in spans[b::B].tolist():
            i = torch.arange(-(-(e - s) // c))
            end = (i + 1) * c
            parts.append(torch.stack([s + (end - L).clamp(min=0), s + i * c + 1, (s + end).clamp(max=e),
                                      i == 0, i < i.numel() - 1], 1))
        rows.append(torch.cat(parts))
    R = max(r.size(0) for r in rows)
    out = torch.tensor([0, 1, 0, 0, 0]).repeat(R, B, 1)
    for b, r in enumerate(rows):
        out[:r.size(0), b] = r
    return out[..., :3], out[..., 3].bool(), out[..., 4].bool()

class DocTTT:
    """Per-document score-first LoRA TTT (PR #1530 line): one adapter per row on the q and v projections of the last
    TTT_LAST_N blocks, reset (A to its start, B = 0, Adam state 0) when the row starts a document; after a chunk is
    scored, the CE of that same forward (byte-weighted mean per row) takes one Adam step (TTT_LR), TTT_STEPS - 1
    more on the chunk; none after a document's last chunk. Adam per row (own step count): rows never interact."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, model: GPT, hp: Hyperparameters, d: Dist):
        self.hp, self.slots = hp, attach_loras(model, hp, d, hp.eval_batch_seqs)
        self.params = [p for slot in self.slots for p in (slot.lora.A, slot.lora.B)]
        self.m, self.v = [torch.zeros_like(p) for p in self.params], [torch.zeros_like(p) for p in self.params]
        self.t = torch.zeros(hp.eval_batch_seqs, device=d.device)

    @torch.no_grad()
    def reset(self, rows: torch.Tensor) -> None:
        r = rows.to(self.t.device)
        for slot in self.slots:
            slot.lora.A[r] = slot.lora.A0
            slot.lora.B[r] = 0
        for x in self.m + self.v:
            x[r] = 0
        self.t[r] = 0

    def step(self, sc: Scored, tokens: torch.Tensor, luts: ByteLUTs, live: torch.Tensor) -> None:
        """One Adam step on the scored chunk's CE, rows `live` (bool, per row) only."""
        w = target_bytes(tokens[sc.pos - 1], tokens[sc.pos], luts).clamp(min=1).float() * live[sc.row]
        per_row = torch.zeros(live.numel(), device=w.device).index_add_(0, sc.row, w).clamp(min=1)
        grads = torch.autograd.grad((sc.ce * w / per_row[sc.row]).sum(), self.params)
        (b1, b2), lr = self.BETAS, self.hp.ttt_lr
        self.t += live
        shape = lambda x: x.clamp(min=1e-3).view(-1, 1, 1)  # rows never stepped: m = 0
        bc1, bc2 = shape(1 - b1 ** self.t), shape(1 - b2 ** self.t)
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.m, self.v):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p -= lr * (m / bc1) / ((v / bc2).sqrt() + self.EPS) * live.view(-1, 1, 1)

    @contextlib.contextmanager
    def detached(self):
        """The model without the per-row adapters (phased global TTT trains other batch shapes)."""
        loras = [slot.lora for slot in self.slots]
        for slot in self.slots:
            slot.lora = None
        yield
        for slot, lora in zip(self.slots, loras):
            slot.lora = lora

def score_docs(model: GPT, hidden_fn, tokens: torch.Tensor, spans: torch.Tensor, hp: Hyperparameters, temperature: float,
               d: Dist, audit_pos: torch.Tensor, ttt: DocTTT | None, luts: ByteLUTs, timer, cache=None) -> Scored:
    """Score this rank's documents (doc_schedule), with per-document TTT between rounds. With `cache` and
    NGRAM_DOC_LOCAL, a local cache keyed by document gets each round's targets after they are scored, and
    `Scored.local` holds its counts at every target: the own document's earlier chunks, to add to `cache`'s."""
    windows, first, more = doc_schedule(spans, hp)
    B, parts, local = hp.eval_batch_seqs, [], None
    if cache is not None and hp.ngram_doc_local:
        local = NGramCache(hp.ngram_eval_min_order, hp.ngram_eval_order, hp.vocab_size, max(1, (spans.size(0) - 1).bit_length()))
        doc_of = (torch.arange(B) + B * (first.long().cumsum(0) - 1)).to(d.device)  # (R, B): row b's index in spans
    for r in range(windows.size(0)):
        train = ttt is not None and bool(more[r].any())
        if ttt is not None:
            ttt.reset(first[r])
        with timer("score"):
            sc = score_windows(model, hidden_fn, tokens, windows[r], hp, temperature, d, audit_pos, hp.eval_seq_len, train)
        if train:
            with timer("ttt"):
                live = more[r].to(d.device)
                ttt.step(sc, tokens, luts, live)
                for _ in range(hp.ttt_steps - 1):
                    ttt.step(score_windows(model, hidden_fn, tokens, windows[r], hp, temperature, d, audit_pos,
                                           hp.eval_seq_len, True), tokens, luts, live)
        if local is not None:
            with timer("ngram_local"):
                tag, V = doc_of[r][sc.row], sc.audit_rows.size(1)
                at = tag[torch.isin(sc.pos, sc.audit_pos)]
                sc.local = (local.stats(tokens, sc.pos, tag=tag),
                            local.stats(tokens, sc.audit_pos, torch.arange(V, device=d.device).expand(at.numel(), V), at))
                keep = more[r].to(d.device)[sc.row]  # a document's last chunk is never looked up again
                local.update(tokens, sc.pos[keep], tag[keep], base=cache)
        parts.append(sc)
    if not parts:
        return score_windows(model, hidden_fn, tokens, torch.zeros(0, 3, dtype=torch.long), hp, temperature, d, audit_pos)
    out = Scored(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Scored)[:7]))
    if local is not None:
        out.local = tuple(tuple(torch.cat([p.local[j][k] for p in parts], dim=1) for k in range(3)) for j in range(2))
    return out

def phased_sgd(model: GPT, tokens: torch.Tensor, hi: int, hp: Hyperparameters, d: Dist, luts: ByteLUTs) -> None:
    """Phased global TTT (PR #1610 line): PHASED_TTT_STEPS SGD steps of the block matrices on the byte-weighted
    CE of targets 1..hi (documents already scored), sequences of EVAL_SEQ_LEN split across ranks, gradients
    summed: every rank's model stays identical."""
    S, banks = min(hp.eval_seq_len, hi), [getattr(model, name) for name in BANKS]
    for W in banks:
        W.requires_grad_(True)
    for _ in range(hp.phased_ttt_steps):
        byte_weighted_grads(model, tokens, 1, hi // S, S, banks, hp, d, luts)
        with torch.no_grad():
            for W in banks:
                W -= hp.phased_ttt_lr * W.grad
    for W in banks:
        W.grad = None
        W.requires_grad_(False)

@dataclass
class EvalResult:
    model_loss: float
    model_bpb: float
    mixed_loss: float
    mixed_bpb: float
    n_targets: int
    n_bytes: int
    seconds: float
    audit: list
    phase_seconds: dict
    problems: list = field(default_factory=list)  # why the result is not a valid record (empty: it is)
    temperature: float = 1.0     # the temperature the last chunk was scored with
    roundtrip_bpb: float = math.nan  # the contiguous eval of the loaded artifact (integrated_eval)

def evaluate(model: GPT, val_tokens: torch.Tensor, luts: ByteLUTs, hp: Hyperparameters, d: Dist, log: RunLog,
             use_ngram: bool, use_ttt: bool, label: str = "eval", dump_path: str = "") -> EvalResult:
    """The single pass. dump_path: per-target arrays and the audited distributions (.npz)."""
    t0 = time.perf_counter()
    model.eval()
    tokens = val_tokens.to(d.device, dtype=torch.int64)
    N, doc_mode = tokens.numel(), hp.eval_mode == "doc"
    cache = NGramCache(hp.ngram_eval_min_order, hp.ngram_eval_order, hp.vocab_size) if use_ngram else None
    mixer = LearnedMix(len(cache.orders) if cache else 0, hp, d)
    if doc_mode:  # a step: the documents whose BOS lies in a TTT_CHUNK_TOKENS range, the j-th on rank j % WORLD_SIZE
        spans = doc_spans(tokens)
        step_of = (spans[:, 0] // hp.ttt_chunk_tokens).unique_consecutive(return_inverse=True)[1]
        n_steps = int(step_of[-1]) + 1
        step_bounds = torch.searchsorted(step_of, torch.arange(n_steps + 1))
        ttt = DocTTT(model, hp, d) if use_ttt else None
        P = hp.phased_ttt_num_phases
        phase_ends, phase = [hp.phased_ttt_prefix_docs * k // P for k in range(1, P + 1)], 0
    else:  # a step is a chunk of TTT_CHUNK_TOKENS targets
        windows = make_windows(N, hp.eval_seq_len, hp.eval_stride)
        chunk_of = (windows[:, 2] - 1) // hp.ttt_chunk_tokens
        n_steps = int(chunk_of[-1]) + 1
        bounds = torch.searchsorted(chunk_of, torch.arange(n_steps + 1))
        ttt = TestTimeTrainer(model, hp, d) if use_ttt else None
    hidden_fn = torch.compile(model.hidden, dynamic=False) if d.is_cuda else model.hidden
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # model nll, mixed nll, bytes, targets
    audit = torch.zeros(4, dtype=torch.float64, device=d.device)
    audit_pos = audit_positions(N, hp.ngram_audit_positions, hp.eval_audit_path).to(d.device)
    dump = {k: torch.zeros(N - 1, dtype=torch.float64, device=d.device)
            for k in ("model_nll", "mixed_nll", "bytes", "order", "alpha", "times_scored")} if dump_path else None
    if dump is not None:  # at the audited targets: the mixed and the model's distributions, the escape multipliers
        for k, width in (("audit_p", hp.vocab_size), ("audit_model_p", hp.vocab_size), ("audit_beta", mixer.K)):
            dump[k] = torch.zeros(audit_pos.numel(), width, dtype=torch.float64, device=d.device)
    timer = PhaseTimer(d)
    last_log = time.perf_counter()
    for c in range(n_steps):
        temperature, last = mixer.temperature, c == n_steps - 1  # the temperature this step is scored with
        if doc_mode:
            group = spans[step_bounds[c]:step_bounds[c + 1]]
            lo, hi = int(group[0, 0]) + 1, int(group[-1, 1])  # this step's targets, on every rank
            sc = score_docs(model, hidden_fn, tokens, group[d.rank::d.world_size], hp, temperature, d, audit_pos, ttt,
                            luts, timer, cache)
        else:
            wins = windows[bounds[c]:bounds[c + 1]]
            k = wins.size(0)
            lo, hi = int(wins[0, 1]), int(wins[-1, 2])
            mine = wins[k * d.rank // d.world_size:k * (d.rank + 1) // d.world_size]
            with timer("score"):
                sc = score_windows(model, hidden_fn, tokens, mine, hp, temperature, d, audit_pos)
        n_bytes = target_bytes(tokens[sc.pos - 1], tokens[sc.pos], luts).double()
        with timer("ngram"):
            stats = ngram_stats(cache, tokens, sc.pos)
            if sc.local is not None:  # doc mode: the document's own scored chunks
                stats = tuple(x + y for x, y in zip(stats, sc.local[0]))
            mixed, alpha = mixer.mix(sc.logp, sc.entropy, *stats)
        with timer("audit"):
            errs, p_audit, beta_audit = ngram_audit(cache, mixer, tokens, sc, mixed)
            audit = torch.maximum(audit, errs)
        count = torch.tensor(float(sc.pos.numel()), device=d.device, dtype=torch.float64)
        chunk_sums = torch.stack([-sc.logp.sum(), -mixed.sum(), n_bytes.sum(), count])
        sums += all_reduce(chunk_sums)
        if dump is not None:
            record_dump(dump, sc, mixed, n_bytes, stats[0], alpha, cache, audit_pos, p_audit, beta_audit)
        if not last:  # nothing is learned after the last step is scored
            with timer("learn_mix"):  # after scoring: the fitted values are used from the next step on
                mixer.observe(sc, *stats)
            if cache is not None:
                with timer("ngram_update"):
                    cache.update(tokens, torch.arange(lo, hi + 1, device=d.device))
            if ttt is not None and not doc_mode:
                with timer("ttt"):
                    for _ in range(hp.ttt_steps):
                        ttt.step(tokens, lo, hi, luts)
            if doc_mode and phase < P and int(step_bounds[c + 1]) >= phase_ends[phase]:
                with timer("phased_ttt"), (ttt.detached() if ttt else contextlib.nullcontext()):
                    phased_sgd(model, tokens, hi, hp, d, luts)
                while phase < P and int(step_bounds[c + 1]) >= phase_ends[phase]:
                    phase += 1
        now, (chunk_model, chunk_mixed, chunk_bytes) = time.perf_counter(), chunk_sums[:3].tolist()
        console = now - last_log > 20 or last  # every step goes to the file, one per 20 s to the console
        if console:
            last_log = now
        log(f"{label}_chunk:{c + 1}/{n_steps} model_bpb:{bits_per_byte(chunk_model, chunk_bytes):.4f} "
            f"mixed_bpb:{bits_per_byte(chunk_mixed, chunk_bytes):.4f} temperature:{temperature:.4f} "
            f"running_mixed_bpb:{bits_per_byte(sums[1].item(), sums[2].item()):.4f} elapsed:{now - t0:.1f}s "
            f"eta:{(n_steps - c - 1) * (now - t0) / (c + 1):.1f}s "
            f"ngram_mem:{cache.memory_bytes() / 2**20 if cache else 0:.1f}MiB", console=console)
        if signum := stop_requested(d):
            raise Interrupted(f"interrupted by {signal.Signals(signum).name} during {label} at chunk {c + 1}/{n_steps}: "
                              f"no score (a partial pass is not one)", signum)
    if int(sums[3].item()) != N - 1:
        raise GolfError(f"{label}: scored {int(sums[3].item())} targets, expected {N - 1}")
    all_reduce(audit, "max")
    if dump is not None:
        save_dump(dump, dump_path, d, audit_pos, cache.orders if cache else [])
    model_nll, mixed_nll, n_bytes, n = sums.tolist()
    log(f"{label}_phases: " + " ".join(f"{k}:{v:.2f}s" for k, v in timer.seconds.items()))
    return EvalResult(model_nll / n, bits_per_byte(model_nll, n_bytes), mixed_nll / n, bits_per_byte(mixed_nll, n_bytes),
                      int(n), int(n_bytes), time.perf_counter() - t0, audit.tolist(), dict(timer.seconds),
                      temperature=temperature)

class PhaseTimer:
    """Wall time per eval phase (synchronized on CUDA so kernels are charged to their phase)."""

    def __init__(self, d: Dist):
        self.d, self.seconds = d, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.d)
        t0 = time.perf_counter()
        yield
        sync(self.d)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

def record_dump(dump: dict, sc: Scored, mixed, n_bytes, C, alpha, cache, audit_pos, p_audit, beta_audit) -> None:
    i = sc.pos - 1
    dump["model_nll"][i] = -sc.logp
    dump["mixed_nll"][i] = -mixed
    dump["bytes"][i] = n_bytes
    dump["times_scored"].index_add_(0, i, torch.ones_like(n_bytes))
    if cache is not None:  # the highest order whose context was seen (0: none)
        seen = C > 0
        orders = torch.tensor(cache.orders, device=C.device, dtype=torch.float64)[:, None]
        dump["order"][i] = torch.where(seen, orders, 0.0).amax(0)
    dump["alpha"][i] = alpha
    rows = torch.searchsorted(audit_pos, sc.audit_pos)
    dump["audit_p"][rows], dump["audit_model_p"][rows], dump["audit_beta"][rows] = p_audit, sc.audit_rows.exp(), beta_audit

def save_dump(dump: dict, path: str, d: Dist, audit_pos: torch.Tensor, orders: list) -> None:
    """Per-target arrays (index t-1 = target t) and the audit rows, summed over ranks (targets are disjoint),
    saved by rank 0 with audit_pos and the n-gram orders (highest first, the columns of audit_beta)."""
    arrays = {k: all_reduce(v).cpu().numpy() for k, v in dump.items()}
    arrays["audit_pos"] = audit_pos.cpu().numpy()
    arrays["orders"] = np.array(orders, dtype=np.int64)
    if d.is_main:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        write_atomic(Path(path), buf.getvalue())


# ==================== main ===========================================================================
# Orchestration only. The training budget (MAX_WALLCLOCK_SECONDS) covers the training steps, GPTQ calibration and
# export; the evaluation budget (EVAL_BUDGET_SECONDS) runs from the first load of the artifact to the final number,
# the contiguous round-trip eval included. Progress validation passes are outside both and logged separately.

SUBMISSION_NAME = "Valid complementary n-gram + mixed-width GPTQ + LoRA TTT"
WRAPPER_HEAD = b'import lzma,base64\nexec(compile(lzma.decompress(base64.b85decode("'
WRAPPER_TAIL = b'")),"train_gpt.py","exec"))\n'

def pack_source(source: bytes) -> bytes:
    """The compressed, self-extracting form of this file that the contest counts (LZMA + base85, the top records'
    convention: PR #1285, PR #1394): running it runs the decoded source itself (tools/pack_code.py writes it)."""
    return WRAPPER_HEAD + base64.b85encode(lzma.compress(source, preset=LZMA_PRESET)) + WRAPPER_TAIL

def unpack_source(blob: bytes) -> bytes:
    """The readable source of a file: itself, or what a `pack_source` wrapper decodes to."""
    if not blob.startswith(WRAPPER_HEAD):
        return blob
    return lzma.decompress(base64.b85decode(blob[len(WRAPPER_HEAD):-len(WRAPPER_TAIL)]))

def code_identity() -> tuple:
    """(bytes of the file run (counted in the cap), its readable source (logged), the source's sha256 (artifact))."""
    blob = Path(__file__).read_bytes()
    source = unpack_source(blob)
    return len(blob), source.decode("utf-8"), hashlib.sha256(source).hexdigest()

def log_header(hp: Hyperparameters, d: Dist, log: RunLog, run_id: str, overrides: list) -> None:
    log(f"run_id:{run_id}")
    log("config: " + json.dumps(dataclasses.asdict(hp), sort_keys=True))
    for line in overrides:
        log(f"eval_override: {line}")
    for line in describe_environment(d):
        log(line)
    n_bytes, code, sha = code_identity()
    log(f"code: started_from:{Path(__file__).name} bytes:{n_bytes} readable_source_bytes:{len(code.encode())} "
        f"form:{'compressed' if n_bytes != len(code.encode()) else 'readable'} source_sha256:{sha}")
    log("=" * 40 + " source: train_gpt.py " + "=" * 40 + "\n" + code + "\n" + "=" * 100, console=False)

def save_checkpoint(model: GPT, path: Path) -> str | None:
    """The full-precision weights, written whole or not at all; None, or why it failed (the run goes on)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    try:
        write_atomic(path, buf.getvalue())
    except OSError as e:
        return f"checkpoint not written: {error_line(e)}"

def export(model: GPT, hp: Hyperparameters, d: Dist, log: RunLog, out: Path, train: TrainResult) -> dict:
    """Checkpoint, calibration, quantization, serialization, budget and size checks (an overrun: `problems`). Each
    file is attempted if the other cannot be written: a lost checkpoint is `incomplete`, a lost artifact is fatal."""
    t0 = time.perf_counter()
    incomplete = [why] if d.is_main and (why := save_checkpoint(model, out / "final_model.pt")) else []
    for line in incomplete:
        log(f"error: {line}; the export goes on")
    hessians = collect_hessians(model, hp, d)
    sync(d)
    t1 = time.perf_counter()
    q = quantize_model(unbanked_state_dict(model), hessians, hp, d)
    code_bytes, _, code_sha = code_identity()
    header = dict(config={k: getattr(hp, k) for k in MODEL_FIELDS}, code_sha256=code_sha,
                  tokenizer_sha256=file_sha256(hp.tokenizer_path), eval_settings={k: getattr(hp, k) for k in EVAL_FIELDS})
    budget = hp.artifact_size_cap - hp.size_margin_bytes - code_bytes
    artifact_bytes, write_error = 0, ""
    if d.is_main:
        try:
            artifact_bytes = write_artifact(q, header, budget, out / "final_model.gptq.xz", log)
        except OSError as e:
            artifact_bytes, write_error = -1, error_line(e)
    barrier()
    calib_s, export_s = t1 - t0, time.perf_counter() - t1
    total, used = artifact_bytes + code_bytes, train.train_seconds + calib_s + export_s
    limit = f"{hp.max_wallclock_seconds:.0f}s margin:{hp.max_wallclock_seconds - used:.1f}s" \
        if hp.max_wallclock_seconds > 0 else "none (step-based run)"
    log(f"budget: train_time:{train.train_seconds:.1f}s calibration_time:{calib_s:.1f}s export_time:{export_s:.1f}s "
        f"total:{used:.1f}s predicted_export:{train.export_estimate:.1f}s actual_export:{calib_s + export_s:.1f}s "
        f"limit:{limit}")
    total, used, artifact_bytes = broadcast(torch.tensor([float(total), used, float(artifact_bytes)],
                                                         dtype=torch.float64, device=d.device), 0).tolist()
    if artifact_bytes < 0:
        raise GolfError(f"artifact not written: {write_error or 'see the log of rank 0'}"
                        + (f"; {incomplete[0]}" if incomplete else f"; full-precision checkpoint kept at {out / 'final_model.pt'}"))
    log(f"Code size: {code_bytes} bytes")
    log(f"Serialized model gptq+lzma: {int(artifact_bytes)} bytes")
    log(f"Total submission size: {int(total)} bytes (cap {hp.artifact_size_cap}, headroom {hp.artifact_size_cap - int(total)}, "
        f"of which SIZE_MARGIN_BYTES={hp.size_margin_bytes})")
    if total > hp.artifact_size_cap - hp.size_margin_bytes:
        problem = (f"artifact + code = {int(total)} bytes even at the smallest QUANT_BITS={hp.quant_bits}, over "
                   f"ARTIFACT_SIZE_CAP={hp.artifact_size_cap} - SIZE_MARGIN_BYTES={hp.size_margin_bytes}")
        log(f"export_failed: {problem}; no artifact or submission written; full-precision checkpoint kept at "
            f"{out / 'final_model.pt'}")
        raise GolfError(problem)
    problems = []  # an overrun keeps the artifact and is evaluated, but the record says it is not compliant
    if hp.max_wallclock_seconds > 0 and used > hp.max_wallclock_seconds:
        problems.append(f"training budget overrun by {used - hp.max_wallclock_seconds:.1f}s: train + calibration + "
                        f"export = {used:.1f}s > MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g}")
        log(f"NOT COMPLIANT: {problems[-1]}; the artifact is kept and evaluated, and marked non-compliant")
    return dict(calibration_seconds=calib_s, export_seconds=export_s, artifact_bytes=int(artifact_bytes),
                code_bytes=code_bytes, total_bytes=int(total), problems=problems, incomplete=incomplete)

def log_final(label: str, loss: float, bpb: float, log: RunLog, extra: str = "") -> None:
    log(f"{label} val_loss:{loss:.4f} val_bpb:{bpb:.4f}{extra}")
    log(f"{label}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")

def integrated_eval(artifact: Path, hp: Hyperparameters, d: Dist, log: RunLog, val_tokens, luts,
                    prequant_bpb: float = math.nan) -> EvalResult:
    """The reported evaluation: one clock from the first load of the artifact to the final number. The
    round-trip diagnostic is the cheap contiguous eval of the same loaded model, inside that clock."""
    clock = time.perf_counter()
    model = model_from_artifact(artifact, hp, d, log)
    rt_loss, rt_bpb = eval_val_loss(model, val_tokens, luts, hp, d)
    log_final("final_quant_roundtrip_contiguous", rt_loss, rt_bpb, log,
              "" if math.isnan(prequant_bpb) else f" quant_gap_bpb:{rt_bpb - prequant_bpb:.4f}")
    r = evaluate(model, val_tokens, luts, hp, d, log, use_ngram=hp.ngram_enabled, use_ttt=hp.ttt_enabled,
                 label="integrated", dump_path=hp.eval_dump_path)
    eval_s = time.perf_counter() - clock
    log(f"ngram_audit: max_abs_sum_minus_1:{r.audit[0]:.3e} min_p_clamped:{-r.audit[1]:.3e} "
        f"max_target_logp_err:{r.audit[2]:.3e} count_mismatches:{int(r.audit[3])}")
    log(f"integrated_parts: model_only_bpb:{r.model_bpb:.4f} ngram_gain_bpb:{r.model_bpb - r.mixed_bpb:.4f} "
        f"ngram:{'on' if hp.ngram_enabled else 'off'} learned_mix:{int(hp.eval_learned_mix)} "
        f"ttt:{'on' if hp.ttt_enabled else 'off'} ttt_steps:{hp.ttt_steps} eval_mode:{hp.eval_mode} "
        + (f"ngram_doc_local:{int(hp.ngram_doc_local)} " if hp.eval_mode == "doc" else "") +
        f"phases:{hp.phased_ttt_num_phases if hp.eval_mode == 'doc' else 0} last_scored_temperature:{r.temperature:.4f} "
        f"targets:{r.n_targets} bytes:{r.n_bytes}")
    log(f"eval_budget: from_first_artifact_load:{eval_s:.1f}s limit:{hp.eval_budget_seconds:.0f}s")
    if eval_s > hp.eval_budget_seconds:  # the whole pass was scored: a full score, but not a valid record
        r.problems.append(f"evaluation budget overrun by {eval_s - hp.eval_budget_seconds:.1f}s: {eval_s:.1f}s > "
                          f"EVAL_BUDGET_SECONDS={hp.eval_budget_seconds:g}")
        log(f"NOT COMPLIANT: {r.problems[-1]}")
    log_final("final_integrated", r.mixed_loss, r.mixed_bpb, log, f" eval_time:{eval_s * 1000:.0f}ms")
    r.seconds, r.roundtrip_bpb = eval_s, rt_bpb
    return r

def git_config(key: str) -> str:
    try:
        return subprocess.run(["git", "config", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""

def write_submission(path: Path, hp: Hyperparameters, d: Dist, run_id: str, train: TrainResult, exp: dict,
                     prequant_bpb: float, final: EvalResult, problems: list) -> None:
    hardware = f"{d.world_size}x{torch.cuda.get_device_name(d.device)}" if d.is_cuda else \
        f"{d.world_size}x CPU process ({platform.processor() or platform.machine()}, {usable_cpus()} usable cores)"
    blurb = (f"{hp.num_layers}L x {hp.model_dim} GPT, Parallel Muon, mixed int4/5/6 GPTQ + LZMA; single-pass eval mixing an exact "
             f"normalized n-gram cache (orders {hp.ngram_eval_min_order}-{hp.ngram_eval_order}), {hp.eval_mode} mode, with "
             f"{'LoRA TTT' if hp.ttt_enabled else 'no TTT'}. Data: {hp.data_label}.")
    r = lambda x: round(x, 8)  # noqa: E731
    record = dict(
        name=SUBMISSION_NAME, author=hp.submission_author or git_config("user.name") or "unknown",
        github_id=hp.github_id or git_config("github.user"), date=datetime.date.today().isoformat(),
        val_bpb=r(final.mixed_bpb), val_loss=r(final.mixed_loss), bytes_total=exp["total_bytes"],
        bytes_code=exp["code_bytes"], blurb=("NOT A VALID RECORD (see non_compliance). " if problems else "") + blurb,
        compliant=not problems, non_compliance=problems, seed=hp.seed, run_id=run_id, log=f"logs/{run_id}.txt",
        data=hp.data_label, hardware=hardware, world_size=d.world_size, steps=train.steps,
        train_seconds=round(train.train_seconds, 2), calibration_seconds=round(exp["calibration_seconds"], 2),
        export_seconds=round(exp["export_seconds"], 2), eval_seconds=round(final.seconds, 2),
        components=dict(prequant_val_bpb_contiguous=r(prequant_bpb), quant_gap_bpb_contiguous=r(final.roundtrip_bpb - prequant_bpb),
                        quant_roundtrip_contiguous_val_bpb=r(final.roundtrip_bpb), model_only_bpb=r(final.model_bpb),
                        integrated_bpb=r(final.mixed_bpb), ngram_gain_bpb=r(final.model_bpb - final.mixed_bpb),
                        ttt_enabled=hp.ttt_enabled, artifact_bytes=exp["artifact_bytes"]))
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())

def lock_output_dir(out: Path, run_id: str):
    """One run per OUTPUT_DIR: an flock on OUTPUT_DIR/.run.lock, released however the process ends; the open file.
    Writing it also proves OUTPUT_DIR writable before training (only rank 0 ever writes there)."""
    import fcntl
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = (out / ".run.lock").open("a+")
    except OSError as e:
        raise GolfError(f"OUTPUT_DIR={str(out)!r} is not writable ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        raise GolfError(f"OUTPUT_DIR={str(out)!r} is in use by another run ({f.read().strip() or 'unknown'}): "
                        f"wait for it to end or give this run another OUTPUT_DIR") from None
    f.seek(0)
    f.truncate()
    f.write(f"run_id:{run_id} pid:{os.getpid()} host:{platform.node()} since:{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
    f.flush()
    return f

RESULT_FILES = ("submission.json", "final_model.gptq.xz", "final_model.pt")

def move_aside_previous(out: Path, log: RunLog) -> None:
    """An earlier run's results go together to OUTPUT_DIR/previous/<time of the newest>/, once this run has passed
    its start-up checks: never deleted, and a run that fails cannot leave them looking like its own."""
    old = [out / n for n in RESULT_FILES if (out / n).exists()]
    if not old:
        return
    dest = out / "previous" / f"{datetime.datetime.fromtimestamp(max(p.stat().st_mtime for p in old)):%Y%m%d_%H%M%S}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        os.replace(p, dest / p.name)
        log(f"moved_aside: {p} -> {dest / p.name}")

class Interrupted(GolfError):
    """The run stopped at a safe point after SIGINT/SIGTERM, keeping what it had finished."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum

class StopSignal:
    """The first SIGINT/SIGTERM stops the run at the next training step or eval chunk, on every rank the same (the
    flag travels in SharedClock's max-all-reduce or `stop_requested`); a second one stops the process at once."""
    received = 0

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            if cls.received:
                raise KeyboardInterrupt
            cls.received = signum
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

def stop_requested(d: Dist) -> int:
    """The signal any rank received (0: none), agreed by all ranks."""
    return int(all_reduce(torch.tensor([float(StopSignal.received)], device=d.device), "max").item())

def lost_process(e: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo and NCCL raise RuntimeError subclasses for both)."""
    keys = ("gloo", "NCCL", "Connection closed by peer", "pair closure", "Timed out", "timed out")
    return isinstance(e, getattr(dist, "DistError", ())) or (isinstance(e, RuntimeError) and any(k in str(e) for k in keys))

def error_line(e: BaseException) -> str:
    """One line naming what failed; an OS error names its path; a lost process says so."""
    if isinstance(e, OSError) and not isinstance(e, GolfError):
        return f"{e.strerror or e}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    if lost_process(e):
        timeout = os.environ.get("DIST_TIMEOUT_SECONDS", "300")
        return (f"a process of this run stopped or died (a collective failed; DIST_TIMEOUT_SECONDS={timeout}): "
                f"{str(e).strip().splitlines()[0][:200]}")
    if isinstance(e, KeyboardInterrupt):
        return "interrupted twice: stopped at once, without keeping anything unfinished"
    return str(e)

def log_summary(log: RunLog, status: dict) -> None:
    """The last lines of a run: what it produced, whether it is a valid record (what was checked), where it is."""
    log(f"{'=' * 30} summary {'=' * 30}")
    if "error" in status:
        log(f"result: {'INTERRUPTED' if status.get('interrupted') else 'FAILED'}: {status['error']}")
    elif "val_bpb" in status:
        log(f"result: val_bpb:{status['val_bpb']:.8f} (final_integrated; " + (
            "EVAL_ONLY: no submission.json written)" if status.get("eval_only") else "the val_bpb of submission.json)"))
    problems = status.get("problems", [])
    checked = ", ".join(status.get("checked", []))
    log("compliant: " + ("NO: " + "; ".join(problems) if problems else f"yes ({checked})" if "val_bpb" in status else "n/a")
        + (f"; not checked: {status['not_checked']}" if status.get("not_checked") else ""))
    for line in status.get("incomplete", []):
        log(f"incomplete: {line}")
    if "total_bytes" in status:
        log(f"bytes: artifact:{status['artifact_bytes']} code:{status['code_bytes']} total:{status['total_bytes']} "
            f"cap:{status['cap']} headroom:{status['cap'] - status['total_bytes']}")
    out = status["out"]
    files = [f"log:{status['log']}"] + [f"{n}:{out / n}" for n in RESULT_FILES if (out / n).exists()]
    log("files: " + " ".join(files))

def run(hp: Hyperparameters, d: Dist, log: RunLog, out: Path, run_id: str, status: dict, overrides: list) -> None:
    log_header(hp, d, log, run_id, overrides)
    sp = load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    luts = build_byte_luts(sp, hp.vocab_size).to(d.device)
    val_tokens = load_validation_tokens(hp.data_path, hp.vocab_size)
    log(f"data: val_tokens:{val_tokens.numel()} label:{hp.data_label} tokenizer_sha256:{file_sha256(hp.tokenizer_path)}")
    attention = configure_attention(hp, d)  # before anything is compiled: a compiled graph bakes the kernel in
    if hp.eval_only:  # reproduce a score from an artifact: no training data is touched
        status.update(checked=["evaluation budget"], not_checked="training budget and size cap (EVAL_ONLY)")
        final = integrated_eval(Path(hp.eval_only), hp, d, log, val_tokens, luts)
        status.update(val_bpb=final.mixed_bpb, problems=final.problems)
        return
    if val_tokens.numel() - 1 < hp.train_seq_len:
        raise GolfError(f"DATA_PATH={hp.data_path!r}: the validation split has {val_tokens.numel()} tokens, "
                        f"fewer than one TRAIN_SEQ_LEN={hp.train_seq_len} sequence + 1")
    t0 = time.perf_counter()
    n_train = check_train_shards(hp.data_path, hp.vocab_size, d)
    log(f"data: train_shards:{len(shard_files(hp.data_path, 'train'))} train_tokens:{n_train} "
        f"token_ranges_checked_in:{time.perf_counter() - t0:.1f}s")
    if d.is_main:
        move_aside_previous(out, log)
    torch.manual_seed(hp.seed)
    model = GPT(hp).to(d.device)
    muon, adam, replicated = build_optimizers(model, hp, d)
    step_fn = torch.compile(model, dynamic=False, fullgraph=attention != "fa3") if d.is_cuda else model
    log(f"model: params:{sum(p.numel() for p in model.parameters())} layers:{hp.num_layers} dim:{hp.model_dim} "
        f"encoder_layers:{hp.num_encoder_layers} xsa_layers:{hp.xsa_last_n} ve_layers:{hp.ve_last_n} "
        f"attention:{attention} bf16_residual:{d.is_cuda} compiled:{d.is_cuda}")
    log(f"optimizer: parallel_muon banks:{','.join(f'{n}{tuple(getattr(model, n).shape)}' for n in BANKS)} "
        f"muon_projections:{int(hp.embed_proj_muon)} world_size:{d.world_size} grad_accum:{8 // d.world_size} adamw_params:{sum(p.numel() for p in replicated)} "
        f"complement_alpha:{hp.complement_alpha} bigram_counts:{4 * hp.vocab_size ** 2 / 2 ** 20:.0f}MiB_per_rank "
        f"late_qat_frac:{hp.late_qat_frac}")
    trainer = Trainer(hp, d, model, step_fn, muon, adam, replicated)
    train = train_model(trainer, val_tokens, luts, log)
    tokens_read = train.steps * hp.train_batch_tokens
    log(f"train_data: tokens_read:{tokens_read} train_tokens:{n_train} epochs:{tokens_read / max(1, n_train):.3f}")
    prequant_loss, prequant_bpb = eval_val_loss(model, val_tokens, luts, hp, d)
    log(f"final_weights val_loss:{prequant_loss:.4f} val_bpb:{prequant_bpb:.4f} (EMA/SWA, before quantization)")
    exp = export(model, hp, d, log, out, train)
    status.update(exp, cap=hp.artifact_size_cap, checked=["size cap", "evaluation budget"])
    if hp.max_wallclock_seconds > 0:
        status["checked"].insert(0, "training budget")
    else:
        exp["problems"].append("step-based run (MAX_WALLCLOCK_SECONDS=0): the training budget was not enforced")
    if signum := (train.interrupted or stop_requested(d)):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name} after step {train.steps}: final_model.pt and "
                          f"final_model.gptq.xz are written; not evaluated (no score)", signum)
    final = integrated_eval(out / "final_model.gptq.xz", hp, d, log, val_tokens, luts, prequant_bpb)
    status.update(val_bpb=final.mixed_bpb, problems=exp["problems"] + final.problems)
    if d.is_main:
        write_submission(out / "submission.json", hp, d, run_id, train, exp, prequant_bpb, final, status["problems"])
        log(f"submission: {out / 'submission.json'} val_bpb:{final.mixed_bpb:.8f}")

def resolve_settings(env) -> tuple:
    """The run's settings and, under EVAL_ONLY, the lines saying where the environment overrides what the artifact
    recorded: an artifact is scored with its own vocabulary, seed and evaluation settings unless told otherwise."""
    hp = Hyperparameters.from_env(env)
    if not hp.eval_only:
        return hp, []
    header = artifact_header(Path(hp.eval_only))
    names = {f.name for f in fields(Hyperparameters)}
    recorded = {k: v for k, v in {**header.get("eval_settings", {}), "vocab_size": header["config"]["vocab_size"]}.items()
                if k in names}
    hp = Hyperparameters.from_env(env, recorded)
    return hp, [f"{k.upper()}={getattr(hp, k)!r} (the artifact's: {v!r})" for k, v in recorded.items()
                if getattr(hp, k) != v]

def log_startup_error(env, e: Exception) -> None:
    """A settings error comes before the run log exists: write one for it where OUTPUT_DIR allows (rank 0)."""
    if env.get("RANK", "0") != "0" or not env.get("OUTPUT_DIR", ".").strip():
        return
    with contextlib.suppress(OSError):
        logs = Path(env.get("OUTPUT_DIR", ".")) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        name = env.get("RUN_ID") or f"{datetime.datetime.now():%Y%m%d_%H%M%S}_settings"
        (logs / f"{name}.txt").write_text(f"error: {error_line(e)}\n")

def main() -> int:
    """The whole job; returns the exit code (0 done, 3 done but a file could not be written)."""
    env = os.environ
    try:
        hp, overrides = resolve_settings(env)
    except GolfError as e:
        log_startup_error(env, e)
        raise
    run_id = hp.run_id or f"{datetime.datetime.now():%Y%m%d_%H%M%S}_seed{hp.seed}"
    out = Path(hp.output_dir)
    lock = lock_output_dir(out, run_id) if env.get("RANK", "0") == "0" else None  # noqa: F841  held until exit
    d = init_distributed(hp.dist_timeout_seconds)
    StopSignal.install()
    log = RunLog(out / "logs" / f"{run_id}.txt" if d.is_main else None)
    status = dict(out=out, log=out / "logs" / f"{run_id}.txt", eval_only=bool(hp.eval_only))
    try:
        run(hp, d, log, out, run_id, status, overrides)
    except BaseException as e:
        if not isinstance(e, (GolfError, OSError, KeyboardInterrupt)) and not lost_process(e):
            status["error"] = f"internal error {type(e).__name__}: {e} (traceback on stderr)"
            raise  # a bug: its traceback is the report
        status.update(error=error_line(e), interrupted=isinstance(e, (Interrupted, KeyboardInterrupt)))
        log(f"error: {status['error']}", console=False)  # the console gets it on stderr from __main__
        raise
    finally:
        log_summary(log, status)
    for line in status.get("incomplete", []):
        print(f"error: run incomplete: {line}", file=sys.stderr, flush=True)
    return 3 if status.get("incomplete") else 0

if __name__ == "__main__":
    code = 2
    try:
        code = main()
    except (GolfError, OSError, RuntimeError, KeyboardInterrupt) as e:
        if isinstance(e, RuntimeError) and not lost_process(e):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
        code = 128 + e.signum if isinstance(e, Interrupted) else 130 if isinstance(e, KeyboardInterrupt) else 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
