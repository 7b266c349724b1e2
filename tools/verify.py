"""Check an artifact's score against a script that may lie: one command for contest reviewers (README "Reviewers").

    ./run.sh verify ARTIFACT [--submission submission.json] [--log logs/RUN.txt] [--script build/train_gpt.py]
                             [--seed S] [--probes K] [--tokens N] [--nproc P] [--tol 1e-6]

Nothing is taken on the script's word: verify never imports it. It reads the artifact header, unpacks a
compressed --script, counts bytes with the tokenizer and recounts n-grams with its own code, and it runs the
script (EVAL_ONLY + EVAL_DUMP_PATH + EVAL_AUDIT_PATH, a copy of script and artifact in a fresh folder with its
own HOME and TMPDIR per run, under torchrun with --nproc > 1) on texts it changed at positions drawn at run time
from its own randomness (--seed, printed, reproduces a verdict):
  base    the validation tokens as they are, auditing D random decoy targets (full distributions dumped);
  probe k (k = 1..K, one per K-th of the pass) a target q drawn at random gets a random other token and every
          later non-BOS token to one past q's chunk is replaced (alternately rare random tokens or the most
          frequent token repeated); the text stops there (a probe costs the prefix it needs, K probes about
          K/2 passes); q and the decoys before the end are audited.
The base run does not know which targets are probed, so what it reports there is compared with what a probe
run, which changed that target, reports. Rows (exit 1 if any fails):
  size / code bytes / code hash / tokenizer / log source   artifact + bytes of the file run <= both caps; the
        log's `code:` line ran this very file; the header's code_sha256 is the readable source's sha256 (the
        compressed wrapper unpacked here); the header's tokenizer hash; the log embeds the same source
  score           the base run's final_integrated_exact val_bpb equals the log's / submission.json's
  BPB recomputed  sum(mixed_nll) / ln 2 / (bytes counted here from the tokenizer) equals the printed val_bpb
  bytes           the dump's per-target bytes equal the tokenizer's (README "Data" rule)
  C4 once         every run covers each of its targets once (times_scored == 1)
  C1 causal       each probe: targets before q bit-identical to the base run (scores, order, alpha, audited rows)
                  and some later score changed; catches state, caches or per-chunk choices reading what follows
  C2 target       each probe: the distribution the probe run commits to at q (audit_p, normalized) gives the new
                  token the probe's score and the original token the base run's score (the base did not know q
                  was probed): a distribution that reads its target, wherever it does, fails here
  C2 weights      each probe: order and alpha at q are the base run's
  C2 normalized   every audited row of every run: sums to 1, >= 0, its entry at the target is exp(-mixed_nll)
  n-gram recomputed  every audited row equals verify's own Witten-Bell chain over its own exact counts of the
                  targets before q's chunk, given the dumped model distribution and escape multipliers
With --tokens N all runs use the first N validation tokens (the score row is then skipped).
"""
import argparse
import base64
import hashlib
import json
import lzma
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAP_BYTES = 16_000_000  # the contest's cap on artifact + code (decimal)
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
ARTIFACT_MAGIC = b"PGOLF\x06"
WRAPPER = re.compile(rb'\Aimport lzma,base64\nexec\(compile\(lzma\.decompress\(base64\.b85decode\("([0-9A-Za-z!#$%&()*+\-;<=>?@^_`{|}~]*)"\)\),"train_gpt\.py","exec"\)\)\n\Z')
EXACT = re.compile(r"^final_integrated_exact val_loss:(\d\S*) val_bpb:(\d\S*)$", re.M)
DUMP_KEYS = ("model_nll", "mixed_nll", "order", "alpha", "bytes", "times_scored")
PLAN = dict(vocab_size=1024, eval_seq_len=2048, eval_stride=64, ttt_chunk_tokens=65536, artifact_size_cap=CAP_BYTES,
            doc_chunk_tokens=64, ngram_doc_local=1)
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
BOOL_TEXT = ("1", "0", "true", "false", "yes", "no")


# ------------------------------------------------------------------------------------------------
# files: shards, artifact header, script forms, settings
# ------------------------------------------------------------------------------------------------

def read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    n = int(header[2])
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION or path.stat().st_size != HEADER_INTS * 4 + 2 * n:
        raise SystemExit(f"verify: {path} is not a valid token shard")
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)


def write_shard(folder: Path, tokens: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with (folder / "fineweb_val_000000.bin").open("wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    return folder


def validation_tokens(data_path: str) -> np.ndarray:
    files = sorted(Path(data_path).glob("fineweb_val_*.bin"))
    if not files:
        raise SystemExit(f"verify: DATA_PATH={data_path!r} has no fineweb_val_*.bin")
    return np.concatenate([read_shard(p) for p in files])


def artifact_header(path: Path) -> dict:
    """The JSON header of an artifact (magic, u32 length, JSON), parsed here."""
    blob = path.read_bytes()[:1 << 24]
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ValueError("not an artifact (bad magic)")
    (n,) = struct.unpack_from("<I", blob, len(ARTIFACT_MAGIC))
    return json.loads(blob[len(ARTIFACT_MAGIC) + 4:len(ARTIFACT_MAGIC) + 4 + n])


def readable_source_of(blob: bytes) -> tuple:
    """(readable source bytes, form): a file that is exactly the self-extracting wrapper is decoded here."""
    m = WRAPPER.match(blob)
    return (lzma.decompress(base64.b85decode(m[1])), "compressed") if m else (blob, "readable")


def settings(log_path: Path | None, environ, header: dict) -> tuple:
    """(the environment the runs get: the log's config overlaid by the environment; the values verify plans
    with: environment > artifact's eval settings > defaults). Planned values are passed to every run."""
    env = {}
    if log_path is not None:
        line = next((l for l in log_path.read_text(encoding="utf-8").splitlines() if l.startswith("config: ")), None)
        if line is None:
            raise SystemExit(f"verify: --log {log_path} has no 'config:' line")
        env = {k.upper(): str(v) for k, v in json.loads(line[len("config: "):]).items()}
    env.update(environ)
    for k in ("EVAL_ONLY", "EVAL_DUMP_PATH", "EVAL_AUDIT_PATH", "OUTPUT_DIR", "RUN_ID", "RANK", "WORLD_SIZE",
              "LOCAL_RANK"):
        env.pop(k, None)
    recorded = {**header.get("eval_settings", {}), "vocab_size": header.get("config", {}).get("vocab_size")}
    as_int = lambda x: int(str(x).lower() in ("1", "true", "yes")) if str(x).lower() in BOOL_TEXT else int(x)
    plan = {k: as_int(env.get(k.upper(), recorded.get(k) if recorded.get(k) is not None else v)) for k, v in PLAN.items()}
    V = plan["vocab_size"]
    plan["data_path"] = env.get("DATA_PATH") or f"./data/datasets/fineweb10B_sp{V}"
    plan["tokenizer_path"] = env.get("TOKENIZER_PATH") or f"./data/tokenizers/fineweb_{V}_bpe.model"
    env.update({k.upper(): str(plan[k]) for k in ("vocab_size", "eval_seq_len", "eval_stride", "ttt_chunk_tokens",
                                                  "doc_chunk_tokens", "ngram_doc_local")})
    env["TOKENIZER_PATH"] = str(Path(plan["tokenizer_path"]).resolve())
    return env, plan


def eval_run(script: Path, env: dict, artifact: Path, tokens: np.ndarray, audit: np.ndarray, work: Path, tag: str,
             nproc: int) -> dict:
    """One EVAL_ONLY run on `tokens` in a fresh folder (copies of script and artifact, own HOME/TMPDIR/caches):
    {'bpb', 'loss', 'dump', 'seconds'} or {'error'}."""
    run_dir = work / tag
    data = write_shard(run_dir / "data", tokens)
    for sub in ("home", "tmp", "cache"):
        (run_dir / sub).mkdir()
    np.save(run_dir / "audit.npy", audit.astype(np.int64))
    shutil.copyfile(script, run_dir / script.name)
    shutil.copyfile(artifact, run_dir / artifact.name)
    dump_path = run_dir / "dump.npz"
    env = {**env, "DATA_PATH": str(data), "EVAL_ONLY": str(run_dir / artifact.name), "EVAL_DUMP_PATH": str(dump_path),
           "EVAL_AUDIT_PATH": str(run_dir / "audit.npy"), "OUTPUT_DIR": str(run_dir / "out"), "RUN_ID": f"verify_{tag}",
           "HOME": str(run_dir / "home"), "TMPDIR": str(run_dir / "tmp"), "XDG_CACHE_HOME": str(run_dir / "cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "cache" / "inductor"), "TRITON_CACHE_DIR": str(run_dir / "cache" / "triton")}
    cmd = [sys.executable, str(run_dir / script.name)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(run_dir / script.name)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=run_dir, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    found = EXACT.findall(r.stdout)
    if r.returncode != 0 or not found or not dump_path.exists():
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"{tag} run failed (exit {r.returncode}): {why[:200]}")
    with np.load(dump_path) as z:
        dump = {k: z[k] for k in z.files}
    shutil.rmtree(run_dir, ignore_errors=True)
    return dict(loss=float(found[-1][0]), bpb=float(found[-1][1]), dump=dump, seconds=seconds)


# ------------------------------------------------------------------------------------------------
# the pass's structure, probes, independent n-gram mixture
# ------------------------------------------------------------------------------------------------

class Chunks:
    """Which targets each step of the pass holds, recomputed here from the settings: sliding windows of EVAL_SEQ_LEN
    by EVAL_STRIDE over targets 1..N-1, a window in step (end - 1) // TTT_CHUNK_TOKENS; in EVAL_MODE=doc the
    documents (from position 0 and each BOS in 1..N-2, a document's targets up to the next one's BOS) whose start
    lies in one TTT_CHUNK_TOKENS range of positions. The n-gram cache of a step holds the targets of earlier steps, and
    in doc mode with NGRAM_DOC_LOCAL those of the DOC_CHUNK_TOKENS chunks of the target's own document before its own."""

    def __init__(self, n_tokens: int, plan: dict, tokens: np.ndarray | None = None, bos: int = -1):
        last, C = n_tokens - 1, plan["ttt_chunk_tokens"]
        self.local = tokens is not None and bool(plan.get("ngram_doc_local", 0))
        self.doc_chunk = plan.get("doc_chunk_tokens", 1)
        if tokens is not None:  # doc mode
            self.starts = starts = np.r_[0, np.flatnonzero(tokens[1:last] == bos) + 1].astype(np.int64)
            key = starts // C
            self.first = starts[np.r_[True, key[1:] != key[:-1]]] + 1
        else:
            first_end = min(plan["eval_seq_len"], last)
            self.ends = np.r_[np.arange(first_end, last, plan["eval_stride"]), last].astype(np.int64)
            chunk = (self.ends - 1) // C
            starts = np.r_[1, self.ends[:-1] + 1]
            self.first = starts[np.r_[True, chunk[1:] != chunk[:-1]]]  # first target of each step
        self.last = np.r_[self.first[1:] - 1, last]

    def of(self, t: int) -> int:
        return int(np.searchsorted(self.first, t, side="right") - 1)

    def own(self, t: int) -> tuple:
        """[lo, hi): the targets of t's own document that the cache holds when t is scored (empty: none)."""
        if not self.local:
            return 0, 0
        s = int(self.starts[np.searchsorted(self.starts, t - 1, side="right") - 1])  # t's BOS (a BOS target ends the doc before)
        return s + 1, s + 1 + (t - s - 1) // self.doc_chunk * self.doc_chunk


def draw_probes(rng, tokens: np.ndarray, K: int, chunks: Chunks, V: int, bos: int, doc: bool, usable=None) -> list:
    """K probes, the k-th in the k-th K-th of the targets: (q, new token, text length L, the changed text from q on). The text
    goes one target past q's chunk (EVAL_MODE=doc: to the next BOS after that, so every document keeps its
    length); BOS tokens are never changed nor added; the later tokens, alternately (from a random start), drawn
    from the rarer half of the vocabulary (surprising) or the most frequent token repeated (predictable), so that a
    per-chunk choice that reads the targets (a temperature, a mixing weight) moves one way or the other."""
    N, probes = tokens.size, []
    by_count = np.argsort(np.bincount(tokens, minlength=V)[:V], kind="stable")
    usable = np.ones(V, bool) if usable is None else usable[:V].copy()  # tokens of >= 1 byte (a chunk never sums to 0)
    if 0 <= bos < V:
        usable[bos] = False
    by_count = by_count[usable[by_count]]
    rare, common = by_count[:by_count.size // 2], by_count[-1]
    flip = int(rng.integers(2))
    edges = np.linspace(2, N, K + 1).astype(np.int64)
    for k in range(K):
        cand = np.arange(edges[k], max(edges[k + 1], edges[k] + 1))
        cand = cand[(cand < N) & (tokens[np.minimum(cand, N - 1)] != bos)]
        if cand.size == 0:
            continue
        q = int(rng.choice(cand))
        end = int(chunks.last[chunks.of(q)])
        later = np.flatnonzero(tokens[end + 2:] == bos) if doc else np.zeros(1, np.int64)
        L = end + 2 + int(later[0]) if later.size else N
        L = min(max(L, q + 1), N)
        part = tokens[q:L].copy()
        part[0] = rng.choice(np.flatnonzero(usable & (np.arange(V) != tokens[q])))
        tail = np.flatnonzero(part[1:] != bos) + 1
        surprising = (k + flip) % 2 == 0
        part[tail] = rng.choice(rare, tail.size) if surprising else common
        probes.append(dict(q=q, new=int(part[0]), L=L, part=part, tail="rare" if surprising else "repeat"))
    return probes


def context_hashes(tokens: np.ndarray, n_max: int) -> dict:
    """{n: h} with h[p] a 64-bit hash of the n - 1 tokens before p (p >= n - 1), for n = 2..n_max."""
    t = tokens.astype(np.uint64) + np.uint64(1)
    h, out, mult = np.zeros(tokens.size, np.uint64), {}, np.uint64(1)
    for k in range(1, n_max):
        with np.errstate(over="ignore"):
            h[k:] += t[:-k] * mult
            mult *= np.uint64(0x9E3779B97F4A7C15)
        out[k + 1] = h.copy()
    return out


def ngram_rows(tokens: np.ndarray, targets: np.ndarray, cached_upto: np.ndarray, orders: list, model_p: np.ndarray,
               beta: np.ndarray, V: int, hashes: dict, own=None) -> np.ndarray:
    """Interpolated Witten-Bell over exact counts, computed here: for each target t the pairs (context, token p)
    of targets p < cached_upto[t] (and own[t][0] <= p < own[t][1]: doc mode's own document), per order n (highest
    first in `orders`): C = count(ctx), c(v), u = distinct v; from the lowest order up p = (c + beta u p) / (C + beta u)
    where C > 0, bottoming out in model_p."""
    counts = {}
    for n in orders:
        h = hashes[n]
        want = np.unique(h[targets])
        hit = np.flatnonzero(want[np.searchsorted(want, h).clip(max=want.size - 1)] == h)
        hit = hit[hit >= n - 1]
        counts[n] = (h[hit], hit)
    out = np.empty((targets.size, V))
    for i, t in enumerate(targets.tolist()):
        p = model_p[i].astype(np.float64)
        for j in reversed(range(len(orders))):
            n = orders[j]
            if t - (n - 1) < 0:
                continue
            hv, pos = counts[n]
            held = pos < cached_upto[i]
            if own is not None:
                held |= (pos >= own[i][0]) & (pos < own[i][1])
            pos = pos[(hv == hashes[n][t]) & held]
            ctx = tokens[t - n + 1:t]
            if pos.size:  # exact contexts only (a hash collision is dropped here)
                same = np.all(tokens[pos[:, None] + np.arange(-(n - 1), 0)] == ctx, axis=1)
                pos = pos[same]
            if pos.size == 0:
                continue
            c = np.bincount(tokens[pos], minlength=V).astype(np.float64)
            kappa = beta[i, j] * np.count_nonzero(c)
            p = (c + kappa * p) / (pos.size + kappa)
        out[i] = p
    return out


# ------------------------------------------------------------------------------------------------
# checks: each returns (status, detail)
# ------------------------------------------------------------------------------------------------

def differs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return np.ones(max(len(a), len(b)), dtype=bool)
    return (a.view(np.uint64) != b.view(np.uint64)).reshape(a.shape[0], -1).any(1) if a.size else np.zeros(len(a), bool)


def tokenizer_bytes(tokenizer_path: str, tokens: np.ndarray) -> np.ndarray:
    """Bytes each target adds (README "Data"): UTF-8 length of its piece without one leading '▁', byte pieces 1,
    control/unknown/unused 0, plus 1 for a leading '▁' unless the previous token is one of those."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    size = max(sp.get_piece_size(), int(tokens.max()) + 1)
    base, space, boundary = np.zeros(size), np.zeros(size, bool), np.ones(size, bool)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            base[i] = 1
        else:
            space[i] = piece.startswith("▁")
            base[i] = len(piece[1:].encode() if space[i] else piece.encode())
    prev, tgt = tokens[:-1], tokens[1:]
    return base[tgt] + (space[tgt] & ~boundary[prev])


def check_size(artifact: Path, script: Path, run_cap: int) -> tuple:
    a, c = artifact.stat().st_size, script.stat().st_size
    cap = min(CAP_BYTES, run_cap)
    return (PASS if a + c <= cap else FAIL), f"artifact {a} + code {c} ({script.name}) = {a + c} (cap {CAP_BYTES}, the run's {run_cap})"


def check_code_bytes(log_path: Path | None, script: Path, form: str) -> tuple:
    if log_path is None:
        return SKIP, f"no --log: {script.name} ({form}, {script.stat().st_size} bytes) counted as given"
    m = re.search(r"^code: .*?bytes:(\d+) .*?form:(\w+)", log_path.read_text(encoding="utf-8"), re.M)
    if m is None:
        return FAIL, f"{log_path.name} has no 'code:' line"
    same = int(m[1]) == script.stat().st_size and m[2] == form
    return (PASS if same else FAIL), (f"the run started from a {m[1]}-byte {m[2]} file; --script is {script.stat().st_size} "
                                      f"bytes, {form}" + ("" if same else " (verify the form that was run)"))


def check_code_hash(header: dict, source: bytes) -> tuple:
    recorded, ours = header.get("code_sha256"), hashlib.sha256(source).hexdigest()
    if not recorded:
        return FAIL, "artifact has no code hash"
    return (PASS if recorded == ours else FAIL), f"artifact {recorded[:16]}… vs readable source {ours[:16]}…"


def check_tokenizer(header: dict, tokenizer_path: str) -> tuple:
    ours = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    ok = header.get("tokenizer_sha256") == ours
    return (PASS if ok else FAIL), f"artifact {str(header.get('tokenizer_sha256'))[:16]}… vs {Path(tokenizer_path).name} {ours[:16]}…"


def check_log_source(log_path: Path | None, source: bytes) -> tuple:
    if log_path is None:
        return SKIP, "no --log given"
    m = re.search(r"^=+ source: train_gpt\.py =+\n(.*?)\n={100}$", log_path.read_text(encoding="utf-8"), re.M | re.S)
    if m is None:
        return FAIL, f"{log_path} embeds no source"
    same = m[1] == source.decode("utf-8", "replace")
    return (PASS if same else FAIL), f"{log_path.name} source {'is' if same else 'is NOT'} the verified script's"


def check_score(base: dict, claims: dict, prefix: bool, tol: float) -> tuple:
    if prefix:
        return SKIP, f"prefix run scored val_bpb {base['bpb']:.8f}; the full score is not reproduced"
    if not claims:
        return SKIP, f"val_bpb {base['bpb']:.8f}; nothing to compare (give --log or --submission)"
    parts = [f"{name} {v:.8f}" for name, v in claims.items()]
    ok = all(abs(v - base["bpb"]) <= tol for v in claims.values())
    return (PASS if ok else FAIL), f"reproduced {base['bpb']:.8f} vs " + ", ".join(parts) + f" (tol {tol:g})"


def check_bpb(base: dict, ours: np.ndarray, tol: float) -> tuple:
    nll = base["dump"]["mixed_nll"]
    if nll.size != ours.size or not np.isfinite(nll).all():
        return FAIL, f"dump holds {nll.size} scores (finite: {np.isfinite(nll).all()}), the text {ours.size} targets"
    bpb = nll.sum() / math.log(2) / ours.sum()
    return (PASS if abs(bpb - base["bpb"]) <= tol else FAIL), f"{bpb:.8f} from the dump and our bytes vs printed {base['bpb']:.8f}"


def check_bytes(base: dict, ours: np.ndarray) -> tuple:
    d = base["dump"]["bytes"]
    bad = np.flatnonzero(ours != d) if d.size == ours.size else np.arange(ours.size)
    if bad.size:
        return FAIL, f"{bad.size} targets differ from the tokenizer's bytes, first at target {bad[0] + 1}"
    return PASS, f"{int(ours.sum())} bytes over {ours.size} targets"


def check_once(tag: str, n: int, run: dict) -> tuple:
    ts = run["dump"]["times_scored"]
    bad = np.flatnonzero(ts != 1)
    if ts.size != n - 1 or bad.size:
        return FAIL, f"{tag}: {ts.size} targets of {n - 1}, {bad.size} scored != 1 times"
    return PASS, f"{tag} {n - 1}"


def check_causal(base: dict, pr: dict) -> tuple:
    a, b, q, tag = base["dump"], pr["run"]["dump"], pr["q"], pr["tag"]
    for k in ("model_nll", "mixed_nll", "order", "alpha"):
        bad = np.flatnonzero(differs(a[k][:q - 1], b[k][:q - 1]))
        if bad.size:
            return FAIL, f"{tag} (q={q}): {k} differs from the base at {bad.size} targets before q, first at {bad[0] + 1}"
    ra = np.isin(a["audit_pos"], b["audit_pos"]) & (a["audit_pos"] < q)
    rb = np.isin(b["audit_pos"], a["audit_pos"]) & (b["audit_pos"] < q)
    if differs(a["audit_p"][ra], b["audit_p"][rb]).any():
        return FAIL, f"{tag} (q={q}): an audited distribution before q differs from the base's"
    if np.array_equal(a["mixed_nll"][q - 1:pr["L"] - 1], b["mixed_nll"][q - 1:]):
        return FAIL, f"{tag} (q={q}): no score from q on changed: the check is vacuous"
    return PASS, f"{q}"


def row_at(run: dict, t: int):
    d = run["dump"]
    i = np.flatnonzero(d["audit_pos"] == t)
    return d["audit_p"][i[0]] if i.size else None


def check_target(base: dict, pr: dict, tokens: np.ndarray) -> tuple:
    q, new, run, tag = pr["q"], pr["new"], pr["run"], pr["tag"]
    p = row_at(run, q)
    if p is None:
        return FAIL, f"{tag}: target {q} is not in the probe run's audit rows"
    sum_err = abs(p.sum() - 1)
    new_err = abs(math.log(p[new]) + run["dump"]["mixed_nll"][q - 1]) if p[new] > 0 else math.inf
    old_err = abs(math.log(p[tokens[q]]) + base["dump"]["mixed_nll"][q - 1]) if p[tokens[q]] > 0 else math.inf
    if not (sum_err <= 1e-9 and p.min() >= 0 and new_err <= 1e-9 and old_err <= 1e-9):
        return FAIL, (f"{tag} (q={q}, token {tokens[q]}->{new}): the probe's distribution at q: |sum - 1| {sum_err:.1e}; "
                      f"|log p[new] + the probe's score| {new_err:.1e}; |log p[original] + the base run's score| "
                      f"{old_err:.1e}: the distribution depends on the target")
    return PASS, f"{max(new_err, old_err):.1e}"


def check_weights(base: dict, pr: dict) -> tuple:
    a, b, q = base["dump"], pr["run"]["dump"], pr["q"]
    for k in ("order", "alpha"):
        if differs(a[k][q - 1:q], b[k][q - 1:q]).any():
            return FAIL, f"{pr['tag']} (q={q}): {k} {a[k][q - 1]:.6g} in the base, {b[k][q - 1]:.6g} with the new target"
    return PASS, f"{q}"


def check_normalized(tag: str, text: np.ndarray, run: dict) -> tuple:
    d = run["dump"]
    pos, p = d["audit_pos"].astype(np.int64), d["audit_p"]
    if pos.size == 0:
        return FAIL, f"{tag}: no audited rows"
    with np.errstate(divide="ignore"):
        entry = np.abs(np.log(p[np.arange(pos.size), text[pos]]) + d["mixed_nll"][pos - 1]).max()
    err = max(np.abs(p.sum(1) - 1).max(), entry)
    if not (err <= 1e-9 and p.min() >= 0):
        return FAIL, f"{tag}: max |sum p - 1| or |log p[target] + mixed_nll| {err:.1e}, min p {p.min():.1e}"
    return PASS, f"{pos.size}:{err:.1e}"


def check_ngram(tag: str, text: np.ndarray, run: dict, chunks: Chunks, V: int) -> tuple:
    d = run["dump"]
    if not {"audit_model_p", "audit_beta", "orders"} <= set(d):
        return FAIL, f"{tag}: dump has no audit_model_p / audit_beta / orders"
    orders, pos = [int(o) for o in d["orders"]], d["audit_pos"].astype(np.int64)
    upto = chunks.first[[chunks.of(int(t)) for t in pos]]
    ours = ngram_rows(text, pos, upto, orders, d["audit_model_p"], d["audit_beta"], V, context_hashes(text, max(orders + [2])),
                      [chunks.own(int(t)) for t in pos])
    rel = np.abs(ours - d["audit_p"]) / np.maximum(np.maximum(ours, d["audit_p"]), 1e-300)
    err = rel.max() if rel.size else 0.0
    if not err <= 1e-9:
        return FAIL, f"{tag}: audited target {pos[int(np.argmax(rel.max(1)))]}: our mixture differs by {err:.1e} (relative)"
    return PASS, f"{pos.size}:{err:.1e}"


def combine(results: list, summary) -> tuple:
    """The first failure, else PASS with summary(list of the pass details)."""
    failed = [r for r in results if r[0] == FAIL]
    return failed[0] if failed else (PASS, summary([r[1] for r in results]))


def rows_of(per_run: dict) -> list:
    rows_max = lambda xs: f"{sum(int(x.split(':')[0]) for x in xs)} audited rows over {len(xs)} runs, max error " \
                          f"{max(float(x.split(':')[1]) for x in xs):.1e}"
    return [("C4 once", *combine(per_run["C4 once"], lambda xs: f"{len(xs)} runs, each target scored once")),
            ("C1 causal", *combine(per_run["C1 causal"], lambda xs: f"{len(xs)} probes, targets before q bit-identical "
                                                                   f"to the base (q = {', '.join(xs)})")),
            ("C2 target", *combine(per_run["C2 target"], lambda xs: f"{len(xs)} probes: max |log p - score| "
                                   f"{max(map(float, xs)):.1e} at the new (probe) and original (base) tokens")),
            ("C2 weights", *combine(per_run["C2 weights"], lambda xs: f"{len(xs)} probes: order and alpha at q unchanged")),
            ("C2 normalized", *combine(per_run["C2 normalized"], rows_max)),
            ("n-gram recomputed", *combine(per_run["n-gram recomputed"], lambda xs: rows_max(xs) + " (relative, our counts)"))]


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------

def claimed_scores(log_path: Path | None, submission: Path | None) -> dict:
    claims = {}
    if log_path is not None:
        found = EXACT.findall(log_path.read_text(encoding="utf-8"))
        if not found:
            raise SystemExit(f"verify: --log {log_path} has no 'final_integrated_exact ... val_bpb:' line")
        claims["log"] = float(found[-1][1])
    if submission is not None:
        claims["submission.json"] = float(json.loads(submission.read_text())["val_bpb"])
    return claims


RUN_ROWS = ("score", "BPB recomputed", "bytes", "C4 once", "C1 causal", "C2 target", "C2 weights", "C2 normalized",
            "n-gram recomputed")


def verify(args, environ) -> tuple:
    """All checks: ([(name, status, detail)], what tokens were checked)."""
    given = lambda p: (Path(args.base_dir) / p).resolve() if p else None
    artifact, script, log_path, submission = given(args.artifact), given(args.script), given(args.log), \
        given(args.submission)
    for p in (artifact, script, log_path, submission):
        if p is not None and not p.is_file():
            raise SystemExit(f"verify: no such file {p}")
    if submission is not None and log_path is None:  # the log named in submission.json, next to it
        named = submission.parent / json.loads(submission.read_text()).get("log", "")
        log_path = named if named.is_file() else None
    try:
        header = artifact_header(artifact)
    except (ValueError, struct.error) as e:
        raise SystemExit(f"verify: {artifact}: {e}")
    env, plan = settings(log_path, environ, header)
    source, form = readable_source_of(script.read_bytes())
    if b"ngram_doc_local" not in source:  # a script from before the document-local cache layer: its doc mode has none
        plan["ngram_doc_local"], env["NGRAM_DOC_LOCAL"] = 0, "0"
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    tokens = validation_tokens(plan["data_path"]).astype(np.int64)
    n_all = tokens.size
    prefix = args.tokens is not None and args.tokens < tokens.size
    if args.tokens is not None:
        tokens = tokens[:max(2, args.tokens)]
    n, V = tokens.size, plan["vocab_size"]
    import sentencepiece as spm
    bos = spm.SentencePieceProcessor(model_file=plan["tokenizer_path"]).bos_id()
    scope = (f"PREFIX: the first {n} of {n_all} validation tokens (not the full score)" if prefix else
             f"all {n} validation tokens") + f" of {plan['data_path']} (sha256 {hashlib.sha256(tokens.astype('<u2').tobytes()).hexdigest()[:16]}…); seed {seed}"
    claims = claimed_scores(log_path, submission)
    rows = [("size", *check_size(artifact, script, plan["artifact_size_cap"])),
            ("code bytes", *check_code_bytes(log_path, script, form)), ("code hash", *check_code_hash(header, source)),
            ("tokenizer", *check_tokenizer(header, plan["tokenizer_path"])), ("log source", *check_log_source(log_path, source))]
    doc = str(env.get("EVAL_MODE", header.get("eval_settings", {}).get("eval_mode", ""))).lower() == "doc"
    chunks = Chunks(n, plan, tokens if doc else None, bos)
    probes = draw_probes(rng, tokens, args.probes, chunks, V, bos, doc,
                         tokenizer_bytes(plan["tokenizer_path"], np.r_[0, np.arange(V)])[:V] > 0)
    qs = {p["q"] for p in probes}
    pool = np.setdiff1d(np.arange(1, n), list(qs))
    decoys = np.sort(rng.choice(pool, min(pool.size, max(16, 4 * args.probes)), replace=False))
    passes = 1 + sum(p["L"] for p in probes) / n
    logged = re.findall(r"^eval_budget: from_first_artifact_load:([\d.]+)s", log_path.read_text(encoding="utf-8"), re.M) \
        if log_path is not None else []
    print(f"verify: seed {seed}; {len(probes)} probes at targets {sorted(qs)} of {n - 1}; cost {passes:.2f} passes "
          f"(base + probe prefixes) + {len(probes) + 1} starts" + (f", about {passes * float(logged[-1]) * n / n_all:.0f}s "
          f"of evaluation at the logged run's speed" if logged else ""), flush=True)
    per_run = {k: [] for k in ("C4 once", "C1 causal", "C2 target", "C2 weights", "C2 normalized", "n-gram recomputed")}

    def run_rows(tag: str, text: np.ndarray, run: dict) -> None:
        per_run["C4 once"].append(check_once(tag, text.size, run))
        per_run["C2 normalized"].append(check_normalized(tag, text, run))
        per_run["n-gram recomputed"].append(check_ngram(tag, text, run, chunks, V))

    with tempfile.TemporaryDirectory(prefix="verify_") as tmp:
        work = Path(tmp)
        print(f"verify: base run on {n} tokens ...", flush=True)
        base = eval_run(script, env, artifact, tokens, decoys, work, "base", args.nproc)
        if "error" in base:
            return rows + [(name, FAIL, base["error"]) for name in RUN_ROWS], scope
        print(f"verify: base run took {base['seconds']:.1f}s; the probes need {base['seconds'] * (passes - 1):.0f}s "
              f"(their share of tokens) to {base['seconds'] * len(probes):.0f}s (if starting dominates) more", flush=True)
        ours = tokenizer_bytes(plan["tokenizer_path"], tokens)
        rows += [("score", *check_score(base, claims, prefix, args.tol)), ("BPB recomputed", *check_bpb(base, ours, args.tol)),
                 ("bytes", *check_bytes(base, ours))]
        run_rows("base", tokens, base)
        for i, pr in enumerate(probes):
            audit = np.union1d(decoys[decoys < pr["L"]], [pr["q"]])
            pr["tag"] = f"probe {i + 1}"
            print(f"verify: probe {i + 1}/{len(probes)}: target {pr['q']} {tokens[pr['q']]}->{pr['new']}, "
                  f"{pr['tail']} tail, {pr['L']} tokens ...", flush=True)
            text = np.concatenate([tokens[:pr["q"]], pr["part"]])
            pr["run"] = eval_run(script, env, artifact, text, audit, work, f"probe{i + 1}", args.nproc)
            if "error" in pr["run"]:
                return rows + [(name, FAIL, pr["run"]["error"]) for name in RUN_ROWS[3:]], scope
            run_rows(pr["tag"], text, pr["run"])
            per_run["C1 causal"].append(check_causal(base, pr))
            per_run["C2 target"].append(check_target(base, pr, tokens))
            per_run["C2 weights"].append(check_weights(base, pr))
            del pr["run"], text  # a full-size dump is GBs: at most the base's and one probe's in memory
    return rows + rows_of(per_run), scope


def table(rows: list, header: list) -> str:
    width = max(len(r[0]) for r in rows)
    lines = header + [f"{name:<{width}}  {status}  {detail}" for name, status, detail in rows]
    fails = sum(r[1] == FAIL for r in rows)
    lines.append(f"verify: {'ALL PASS' if not fails else f'{fails} FAILED'} "
                 f"({sum(r[1] == PASS for r in rows)} pass, {fails} fail, {sum(r[1] == SKIP for r in rows)} skipped)")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--submission", help="submission.json whose val_bpb must be reproduced")
    p.add_argument("--log", help="the run's log: its final_integrated_exact val_bpb, config, code line and source")
    p.add_argument("--script", default=str(ROOT / "train_gpt.py"),
                   help="the file the run started from (readable or the compressed wrapper, e.g. build/train_gpt.py)")
    p.add_argument("--seed", type=int, help="seed of the probe positions and tokens (default: drawn, and printed)")
    p.add_argument("--probes", type=int, default=8, help="probes, one per K-th of the pass (about K/2 passes)")
    p.add_argument("--tokens", type=int, help="check only the first N validation tokens (a quick prefix check)")
    p.add_argument("--nproc", type=int, default=1, help="processes per EVAL_ONLY run (torchrun when > 1)")
    p.add_argument("--base-dir", default=".", help="folder the paths given here are relative to (run.sh: the caller's)")
    p.add_argument("--tol", type=float, default=1e-6, help="BPB tolerance of the score comparisons")
    args = p.parse_args(argv)
    if args.probes < 1:
        p.error("--probes must be >= 1")
    return args


def main(argv=None, environ=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, scope = verify(args, dict(os.environ if environ is None else environ))
    header = [f"verify {args.artifact} with {args.script}", f"checked: {scope}", "-" * 100]
    print(table(rows, header) + f"\nverify: {time.perf_counter() - t0:.0f}s", flush=True)
    return 1 if any(r[1] == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
