"""Prove an artifact's score valid: one command for contest reviewers (README "Reviewers").

    ./run.sh verify ARTIFACT [--submission submission.json] [--log logs/RUN.txt] [--tokens N]
                             [--script train_gpt.py] [--nproc P] [--tol 1e-6]

It drives train_gpt.py with EVAL_ONLY and EVAL_DUMP_PATH as a subprocess (under torchrun with --nproc > 1),
so it needs only the artifact, the tokenizer and the validation shards (DATA_PATH, TOKENIZER_PATH and every
other setting from the environment; with --log, settings missing from the environment come from the log's
`config:` line, so an embedded-corpus artifact is scored with the settings it was made with). Three runs on
the same tokens:
  base    the validation tokens as they are: the score, the per-target dump;
  cut     every token from a cut point on replaced by a fixed-point-free permutation of the vocabulary;
  target  one target's token replaced by a token never seen after its context.
and one table of checks, exiting 1 if any fails:
  size            artifact + code bytes <= 16,000,000 and <= the run's ARTIFACT_SIZE_CAP (from --log's config)
  code hash       the artifact header's code_sha256 (tg.artifact_header) is the sha256 of the verified script
  log source      the source embedded in the log is the verified script (with --log)
  score           the base run's final_integrated_exact val_bpb equals the log's / submission.json's
  BPB from dump   sum(mixed_nll) / ln 2 / sum(bytes) from the dump equals the printed val_bpb
  bytes           the dump's per-target bytes equal the tokenizer's (README "Data" rule, recomputed here)
  C4 once         times_scored == 1 for every target
  C1 causal       cut run: every target before the cut is bit-identical (model_nll, mixed_nll, order,
                  alpha, and audit_p rows): scores, cache state and weights do not see the future
                  (order = the highest n-gram order whose context was seen, 0 none; alpha = the weight of the
                  Witten-Bell chain not on the model, i.e. 1 - the model's share; both as evaluate dumps them)
  C2 normalized   at the audited targets (audit_pos, audit_p) the full distribution sums to 1 and its
                  entry at the target is exp(-mixed_nll)
  C2 weights      target run: order and alpha at the changed target are unchanged (the context's counts,
                  distinct continuations and the learned mixing parameters never read the target)
  C2 distribution target run: the audited distribution at the changed target is unchanged, and its entry
                  at the new token is the new score
A full check costs three evaluations (on the real data, three times the eval time; use --nproc on GPUs).
With --tokens N every run uses the first N validation tokens (a quick check of a prefix; the table says so
and the score row is skipped: a prefix score is not the submitted one).
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAP_BYTES = 16_000_000  # the contest's cap on artifact + code (decimal)
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
EXACT = re.compile(r"^final_integrated_exact val_loss:(\d\S*) val_bpb:(\d\S*)$", re.M)
DUMP_KEYS = ("model_nll", "mixed_nll", "order", "alpha")  # scores, highest seen order, weight off the model
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


# ------------------------------------------------------------------------------------------------
# shards, settings, runs
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


def settings(log_path: Path | None, environ) -> dict:
    """The environment train_gpt.py runs with: the log's config (if any) overlaid by the environment."""
    env = {}
    if log_path is not None:
        line = next((l for l in log_path.read_text(encoding="utf-8").splitlines() if l.startswith("config: ")), None)
        if line is None:
            raise SystemExit(f"verify: --log {log_path} has no 'config:' line")
        env = {k.upper(): str(v) for k, v in json.loads(line[len("config: "):]).items()}
    env.update(environ)
    for k in ("EVAL_ONLY", "EVAL_DUMP_PATH", "OUTPUT_DIR", "RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def load_script(script: Path):
    """The verified train_gpt.py as a module (importing it does nothing, STYLE rule 5)."""
    spec = importlib.util.spec_from_file_location("verified_train_gpt", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def eval_run(script: Path, env: dict, artifact: Path, tokens: np.ndarray, work: Path, tag: str, nproc: int) -> dict:
    """One EVAL_ONLY run on `tokens`: {'bpb', 'loss', 'dump'} or {'error'}."""
    run_dir = work / tag
    data = write_shard(run_dir / "data", tokens)
    dump_path = run_dir / "dump.npz"
    env = {**env, "DATA_PATH": str(data), "EVAL_ONLY": str(artifact), "EVAL_DUMP_PATH": str(dump_path),
           "OUTPUT_DIR": str(run_dir), "RUN_ID": f"verify_{tag}"}
    cmd = [sys.executable, str(script)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    print(f"verify: {tag} run on {tokens.size} tokens ...", flush=True)
    r = subprocess.run(cmd, env=env, cwd=run_dir, capture_output=True, text=True)
    found = EXACT.findall(r.stdout)
    if r.returncode != 0 or not found or not dump_path.exists():
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"{tag} EVAL_ONLY run failed (exit {r.returncode}): {why[:200]}")
    with np.load(dump_path) as z:
        dump = {k: z[k] for k in z.files}
    return dict(loss=float(found[-1][0]), bpb=float(found[-1][1]), dump=dump)


# ------------------------------------------------------------------------------------------------
# perturbations
# ------------------------------------------------------------------------------------------------

def cut_point(n_tokens: int, chunk: int, stride: int) -> int:
    """A target position in the middle of the middle chunk and between window boundaries, so that a cache
    updated with a chunk before scoring it, or a window reading past its own targets, sees the change."""
    middle = ((n_tokens - 2) // chunk) // 2
    return int(min(max(2, middle * chunk + chunk // 2 + stride // 2 + 1), n_tokens - 1))


def permute_after(tokens: np.ndarray, cut: int, vocab: int) -> np.ndarray:
    out = tokens.copy()
    out[cut:] = (out[cut:].astype(np.int64) + vocab // 2 + 1) % vocab  # fixed-point free: every token changes
    return out


def unseen_token(tokens: np.ndarray, t: int, order: int, vocab: int) -> int:
    """A token that never followed tokens[t-order+1:t] before t (the cache cannot hold it at that context)."""
    n = min(max(1, order - 1), t)
    ctx = tokens[t - n:t]
    hit = np.ones(t - n, dtype=bool)  # candidate positions p = n..t-1 of a following token
    for k in range(n):
        hit &= tokens[k:t - n + k] == ctx[k]
    seen = set(tokens[n:t][hit].tolist()) | {int(tokens[t])}
    return next(v for v in list(range(4, vocab)) + list(range(4)) if v not in seen)


def pick_target(base: dict, n_tokens: int) -> int:
    """A target where a context was seen (order > 0) and the mix beat the model (the target was seen after
    it, so its entry came from counts): an audited one when the dump has audit arrays, else any; the one
    nearest the middle."""
    d = base["dump"]
    pos = d["audit_pos"].astype(np.int64) if "audit_pos" in d else np.arange(1, n_tokens)
    pos = pos[(pos >= 2) & (pos < n_tokens)]
    used = d["order"][pos - 1] > 0 if "order" in d else d["alpha"][pos - 1] > 0 if "alpha" in d else \
        np.ones(pos.size, dtype=bool)
    for good in (used & (d["mixed_nll"][pos - 1] < d["model_nll"][pos - 1]), used, np.ones(pos.size, dtype=bool)):
        if good.any():
            cand = pos[good]
            return int(cand[np.argmin(np.abs(cand - n_tokens // 2))])
    return n_tokens // 2


# ------------------------------------------------------------------------------------------------
# checks: each returns (status, detail)
# ------------------------------------------------------------------------------------------------

def first_diff(a: dict, b: dict, upto: int) -> str | None:
    """The first array among DUMP_KEYS that differs (bitwise) between two dumps on targets 1..upto."""
    for k in (k for k in DUMP_KEYS if k in a and k in b):
        x, y = np.ascontiguousarray(a[k][:upto]), np.ascontiguousarray(b[k][:upto])
        bad = np.flatnonzero((x.view(np.uint8) != y.view(np.uint8)).reshape(x.size, -1).any(1))
        if bad.size:
            return f"{k} differs at {bad.size} targets before the cut, first at target {bad[0] + 1}"
    return None


def check_size(artifact: Path, script: Path, run_cap: int) -> tuple:
    """Against the contest's cap and the run's own ARTIFACT_SIZE_CAP (from --log's config when given)."""
    a, c = artifact.stat().st_size, script.stat().st_size
    cap = min(CAP_BYTES, run_cap)
    return (PASS if a + c <= cap else FAIL), f"artifact {a} + code {c} = {a + c} (cap {CAP_BYTES}, the run's {run_cap})"


def check_code_hash(mod, artifact: Path, script: Path) -> tuple:
    try:
        header = mod.artifact_header(artifact) if hasattr(mod, "artifact_header") else {}
    except Exception as e:  # a corrupt or foreign artifact: say so in the table
        return FAIL, f"artifact_header failed: {e}"
    recorded = header.get("code_sha256")
    if not recorded:
        return FAIL, "artifact has no code hash"
    ours = hashlib.sha256(script.read_bytes()).hexdigest()
    return (PASS if recorded == ours else FAIL), f"artifact {recorded[:16]}… vs {script.name} {ours[:16]}…"


def check_log_source(log_path: Path | None, script: Path) -> tuple:
    if log_path is None:
        return SKIP, "no --log given"
    m = re.search(r"^=+ source: train_gpt\.py =+\n(.*?)\n={100}$", log_path.read_text(encoding="utf-8"), re.M | re.S)
    if m is None:
        return FAIL, f"{log_path} embeds no source"
    same = m[1] == script.read_text(encoding="utf-8")
    return (PASS if same else FAIL), f"{log_path.name} source {'is' if same else 'is NOT'} {script.name}"


def check_score(base: dict, claims: dict, prefix: bool, tol: float) -> tuple:
    if "error" in base:
        return FAIL, base["error"]
    if prefix:
        return SKIP, f"prefix run scored val_bpb {base['bpb']:.8f}; the full score is not reproduced"
    if not claims:
        return SKIP, f"val_bpb {base['bpb']:.8f}; nothing to compare (give --log or --submission)"
    parts = [f"{name} {v:.8f}" for name, v in claims.items()]
    ok = all(abs(v - base["bpb"]) <= tol for v in claims.values())
    return (PASS if ok else FAIL), f"reproduced {base['bpb']:.8f} vs " + ", ".join(parts) + f" (tol {tol:g})"


def check_bpb(base: dict, tol: float) -> tuple:
    d = base["dump"]
    bpb = d["mixed_nll"].sum() / math.log(2) / d["bytes"].sum()
    return (PASS if abs(bpb - base["bpb"]) <= tol else FAIL), f"dump {bpb:.8f} vs printed {base['bpb']:.8f}"


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


def check_bytes(base: dict, tokenizer_path: str, tokens: np.ndarray) -> tuple:
    ours = tokenizer_bytes(tokenizer_path, tokens)
    bad = np.flatnonzero(ours != base["dump"]["bytes"])
    if bad.size:
        return FAIL, f"{bad.size} targets differ from the tokenizer's bytes, first at target {bad[0] + 1}"
    return PASS, f"{int(ours.sum())} bytes over {ours.size} targets"


def check_once(base: dict, n_tokens: int) -> tuple:
    ts = base["dump"]["times_scored"]
    if ts.size != n_tokens - 1:
        return FAIL, f"dump covers {ts.size} targets, expected {n_tokens - 1}"
    bad = np.flatnonzero(ts != 1)
    if bad.size:
        return FAIL, f"{bad.size} targets scored != 1 times (target {bad[0] + 1}: {ts[bad[0]]:g} times)"
    return PASS, f"{ts.size} targets, each scored once"


def check_causal(base: dict, cut_run: dict, cut: int) -> tuple:
    if "error" in cut_run:
        return FAIL, cut_run["error"]
    a, b = base["dump"], cut_run["dump"]
    diff = first_diff(a, b, cut - 1)
    if diff is None and "audit_p" in a:
        early = a["audit_pos"] < cut
        if not np.array_equal(a["audit_pos"], b["audit_pos"]) or not np.array_equal(a["audit_p"][early],
                                                                                        b["audit_p"][early]):
            diff = "audit positions or audited distributions before the cut differ"
    if diff is not None:
        return FAIL, f"tokens >= {cut} permuted: {diff}"
    if np.array_equal(a["mixed_nll"][cut - 1:], b["mixed_nll"][cut - 1:]):
        return FAIL, f"tokens >= {cut} permuted but no later score changed: the check is vacuous"
    rows = f", audit_p at {int((a['audit_pos'] < cut).sum())} audited targets" if "audit_p" in a else ""
    return PASS, f"tokens >= {cut} permuted: targets 1..{cut - 1} bit-identical ({', '.join(DUMP_KEYS)}{rows})"


def audit_arrays(base: dict) -> str | None:
    if "error" in base:
        return base["error"]
    missing = [k for k in ("audit_pos", "audit_p") if k not in base["dump"]]
    return f"dump has no audit arrays ({', '.join(missing)} missing)" if missing else None


def check_normalized(base: dict, tokens: np.ndarray) -> tuple:
    why = audit_arrays(base)
    if why:
        return FAIL, why
    d = base["dump"]
    pos, p = d["audit_pos"].astype(np.int64), d["audit_p"]
    if pos.size == 0:
        return FAIL, "dump has no audited targets (NGRAM_AUDIT_POSITIONS=0?)"
    sum_err = np.abs(p.sum(1) - 1).max()
    entry_err = np.abs(np.log(p[np.arange(pos.size), tokens[pos]]) + d["mixed_nll"][pos - 1]).max()
    ok = sum_err <= 1e-6 and entry_err <= 1e-6 and p.min() >= 0
    return (PASS if ok else FAIL), (f"{pos.size} targets: max|sum p - 1| {sum_err:.1e}, "
                                    f"max|log p[target] + mixed_nll| {entry_err:.1e}, min p {p.min():.1e}")


def check_weights(base: dict, trun: dict, t: int, tokens: np.ndarray, new: int) -> tuple:
    if "error" in trun:
        return FAIL, trun["error"]
    a, b = base["dump"], trun["dump"]
    missing = [k for k in ("order", "alpha") if k not in a or k not in b]
    if missing:
        return FAIL, f"dump has no {', '.join(missing)} array"
    diff = first_diff(a, b, t - 1)
    if diff is not None:
        return FAIL, f"token {t} changed: {diff.replace('the cut', 'it')}"
    same = [k for k in ("order", "alpha") if a[k][t - 1] == b[k][t - 1]]
    detail = (f"target {t} token {tokens[t]}->{new}: order {a['order'][t - 1]:g}->{b['order'][t - 1]:g}, "
              f"alpha {a['alpha'][t - 1]:.6g}->{b['alpha'][t - 1]:.6g}")
    return (PASS if len(same) == 2 else FAIL), detail


def check_distribution(base: dict, trun: dict, t: int, new: int) -> tuple:
    why = audit_arrays(base) or trun.get("error")
    if why:
        return FAIL, why
    a, b = base["dump"], trun["dump"]
    rows = np.flatnonzero(a["audit_pos"] == t)
    if rows.size == 0 or "audit_p" not in b or not np.array_equal(a["audit_pos"], b["audit_pos"]):
        return FAIL, f"target {t} is not audited in both runs (audit positions must depend on positions only)"
    pa, pb = a["audit_p"][rows[0]], b["audit_p"][rows[0]]
    moved = np.abs(pa - pb).max()
    entry_err = abs(math.log(pa[new]) + b["mixed_nll"][t - 1])
    ok = moved == 0 and entry_err <= 1e-9
    return (PASS if ok else FAIL), (f"target {t}: max|p_before - p_after| {moved:.1e}; new score vs "
                                    f"p_before[new] {entry_err:.1e}")


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
    env = settings(log_path, environ)
    mod = load_script(script)
    hp = mod.Hyperparameters.from_env(env)
    env["TOKENIZER_PATH"] = str(Path(hp.tokenizer_path).resolve())  # the runs' working folder is a temp one
    tokens = validation_tokens(hp.data_path).astype(np.int64)
    n_all = tokens.size
    prefix = args.tokens is not None and args.tokens < tokens.size
    if args.tokens is not None:
        tokens = tokens[:max(2, args.tokens)]
    n = tokens.size
    scope = f"PREFIX: the first {n} of {n_all} validation tokens (not the full score)" if prefix else \
        f"all {n} validation tokens"
    claims = claimed_scores(log_path, submission)
    rows = [("size", *check_size(artifact, script, hp.artifact_size_cap)), ("code hash", *check_code_hash(mod, artifact, script)),
            ("log source", *check_log_source(log_path, script))]
    with tempfile.TemporaryDirectory(prefix="verify_") as tmp:
        work = Path(tmp)
        base = eval_run(script, env, artifact, tokens, work, "base", args.nproc)
        rows.append(("score", *check_score(base, claims, prefix, args.tol)))
        if "error" in base:
            return rows + [(name, FAIL, base["error"]) for name in
                           ("BPB from dump", "bytes", "C4 once", "C1 causal", "C2 normalized", "C2 weights",
                            "C2 distribution")], scope
        rows.append(("BPB from dump", *check_bpb(base, args.tol)))
        rows.append(("bytes", *check_bytes(base, hp.tokenizer_path, tokens)))
        rows.append(("C4 once", *check_once(base, n)))
        cut = cut_point(n, hp.ttt_chunk_tokens, hp.eval_stride)
        cut_run = eval_run(script, env, artifact, permute_after(tokens, cut, hp.vocab_size), work, "cut", args.nproc)
        rows.append(("C1 causal", *check_causal(base, cut_run, cut)))
        del cut_run  # a full-size dump is ~3 GB: keep at most two in memory
        rows.append(("C2 normalized", *check_normalized(base, tokens)))
        t = pick_target(base, n)
        order = int(base["dump"]["order"][t - 1]) if "order" in base["dump"] else getattr(hp, "ngram_eval_order", 9)
        new = unseen_token(tokens, t, order, hp.vocab_size)
        changed = tokens.copy()
        changed[t] = new
        trun = eval_run(script, env, artifact, changed, work, "target", args.nproc)
        rows.append(("C2 weights", *check_weights(base, trun, t, tokens, new)))
        rows.append(("C2 distribution", *check_distribution(base, trun, t, new)))
    return rows, scope


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
    p.add_argument("--log", help="the run's log: its final_integrated_exact val_bpb, config and source")
    p.add_argument("--tokens", type=int, help="check only the first N validation tokens (a quick prefix check)")
    p.add_argument("--script", default=str(ROOT / "train_gpt.py"), help="the train_gpt.py to verify")
    p.add_argument("--nproc", type=int, default=1, help="processes per EVAL_ONLY run (torchrun when > 1)")
    p.add_argument("--base-dir", default=".", help="folder the paths given here are relative to (run.sh: the caller's)")
    p.add_argument("--tol", type=float, default=1e-6, help="BPB tolerance of the score comparisons")
    return p.parse_args(argv)


def main(argv=None, environ=None) -> int:
    args = parse_args(argv)
    rows, scope = verify(args, dict(os.environ if environ is None else environ))
    header = [f"verify {args.artifact} with {args.script}", f"checked: {scope}", "-" * 100]
    print(table(rows, header), flush=True)
    return 1 if any(r[1] == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
