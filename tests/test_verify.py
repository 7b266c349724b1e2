"""tools/verify.py (./run.sh verify) on a real artifact from a tiny run: every check passes on train_gpt.py on
every seed, and each deliberately broken copy of the script (made here by text substitution) fails on every seed,
naming the condition it breaks. The cheats that matter are verifier-aware: they read the target only after the
middle chunk (where the old verify, with its fixed cut and target, never looked)."""
import re
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "tools"))
import verify  # noqa: E402
import train_gpt as tg  # noqa: E402

VAL_TOKENS = 4096  # the tiny run's whole validation split: 4 chunks of 1024 targets
SEEDS = (1, 2, 3)
LATE = "c > (n_steps - 1) // 2"  # after the middle step: steps 2 and 3 of 4

# Broken copies: name -> (the row that must FAIL, [(old, new)] text substitutions on train_gpt.py). Each old text
# must occur exactly once (asserted in broken_copy: a refactor that moves it fails loudly). The patterns are single
# statements of evaluate(); each replacement is a single line, so re-indenting the code around them does not matter.
SCORE = "sc = score_windows(model, hidden_fn, tokens, mine, hp, temperature, d, audit_pos)"
MIX = "mixed, alpha = mixer.mix(sc.logp, sc.entropy, *stats)"
AUDIT = "errs, p_audit, beta_audit = ngram_audit(cache, mixer, tokens, sc, mixed)"
BROKEN = {
    # the first cheat: half of a one-hot on the true target mixed into the scored probability and into the
    # audited distributions (still normalized), late chunks only
    "target_onehot_late": ("C2 target", [
        (MIX, MIX + f"; mixed = (0.5 * mixed.exp() + 0.5).log() if {LATE} else mixed"),
        (AUDIT, AUDIT + f"; p_audit = 0.5 * p_audit + 0.5 * F.one_hot(tokens[sc.audit_pos], p_audit.size(1)).double() "
                        f"if {LATE} else p_audit")]),
    # the second cheat: each late chunk's temperature (x0.9, x1, x1.15 of the learned one) chosen by the
    # chunk's own target NLL
    "temperature_by_chunk_nll_late": ("C1 causal", [
        (SCORE, "sc = min([score_windows(model, hidden_fn, tokens, mine, hp, f * temperature, d, audit_pos) for f in "
                f"((0.9, 1.0, 1.15) if {LATE} else (1.0,))], key=lambda s: float(-s.logp.sum()))")]),
    # C1/C3: the chunk's own targets go into the n-gram cache before its statistics are read (and not after)
    "cache_before_score": ("C1 causal", [
        ("stats = ngram_stats(cache, tokens, sc.pos)",
         "stats = (cache is not None and cache.update(tokens, sc.pos), ngram_stats(cache, tokens, sc.pos))[1]"),
        ("cache.update(tokens, torch.arange(lo, hi + 1, device=d.device))", "None")]),
    # C2: the Witten-Bell escape weight looks at the target: half the escape mass where the target was seen
    "alpha_reads_target": ("C2 weights", [
        (MIX, "mixed, alpha = mixer.mix(sc.logp, sc.entropy, stats[0], stats[1], stats[2] * (1 - 0.5 * (stats[1] > 0)))")]),
    # C4: the last window of every chunk is scored twice, and the script's own target count check is gone
    "window_twice": ("C4 once", [
        ("mine = wins[k * d.rank // d.world_size:k * (d.rank + 1) // d.world_size]",
         "mine = wins[k * d.rank // d.world_size:k * (d.rank + 1) // d.world_size]; mine = torch.cat([mine, mine[-1:]])"),
        ("int(sums[3].item()) != N - 1", "False")]),
}
ALL_SEEDS = ("target_onehot_late", "temperature_by_chunk_nll_late")  # the rest: one seed (cost)
PROBES = {"target_onehot_late": 2, "temperature_by_chunk_nll_late": 4}  # 4: both tails in the late half; else 1


@pytest.fixture(scope="module")
def tiny_run(corpus, corpus_env, tmp_path_factory) -> dict:
    """A tiny main run whose validation split is the first VAL_TOKENS tokens of the embedded corpus's."""
    data = tmp_path_factory.mktemp("verify_data")
    src = corpus / "datasets" / "fineweb10B_sp1024"
    for p in src.glob("fineweb_train_*.bin"):
        (data / p.name).symlink_to(p)
    verify.write_shard(data, verify.validation_tokens(str(src))[:VAL_TOKENS])
    out = tmp_path_factory.mktemp("verify_run")
    env = {**corpus_env, "DATA_PATH": str(data), "ITERATIONS": "4"}
    r = run_script(env, out)
    assert r.returncode == 0, r.stderr[-4000:]
    return dict(out=out, env={**os.environ, **env, "OMP_NUM_THREADS": "1"})


def run_verify(tiny_run, capsys, *extra) -> tuple:
    out = tiny_run["out"]
    code = verify.main([str(out / "final_model.gptq.xz"), "--log", str(out / "logs" / "test.txt"), *extra],
                       environ=tiny_run["env"])
    text = capsys.readouterr().out
    rows = {m[0].strip(): (m[1], m[2]) for m in re.findall(r"^(\w[\w -]*?)\s+(PASS|FAIL|SKIP)  (.*)$", text, re.M)}
    return code, rows, text


def broken_copy(tmp_path: Path, name: str) -> Path:
    text = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    for old, new in BROKEN[name][1]:
        assert text.count(old) == 1, f"{name}: pattern not found once in train_gpt.py (refactored?): {old!r}"
        text = text.replace(old, new)
    path = tmp_path / "train_gpt.py"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("seed", SEEDS)
def test_verify_passes_on_a_real_artifact(tiny_run, capsys, seed):
    out = tiny_run["out"]
    code, rows, text = run_verify(tiny_run, capsys, "--submission", str(out / "submission.json"), "--seed", str(seed),
                                  "--probes", "3" if seed == SEEDS[0] else "2")
    assert f"checked: all {VAL_TOKENS} validation tokens" in text and f"seed {seed}" in text
    assert set(rows) == {"size", "code bytes", "code hash", "tokenizer", "log source", *verify.RUN_ROWS}, text
    for name, (status, detail) in rows.items():
        assert status == "PASS", (name, status, detail, text)
    assert "submission.json" in rows["score"][1] and "log" in rows["score"][1]
    assert code == 0


@pytest.mark.parametrize("name,seed", [(n, s) for n in sorted(BROKEN) for s in (SEEDS if n in ALL_SEEDS else SEEDS[:1])])
def test_verify_catches_a_broken_script(tiny_run, capsys, tmp_path, name, seed):
    condition = BROKEN[name][0]
    code, rows, text = run_verify(tiny_run, capsys, "--script", str(broken_copy(tmp_path, name)), "--seed", str(seed),
                                  "--probes", str(PROBES.get(name, 1)))
    assert code == 1
    assert " run failed (exit" not in text, text  # the copy ran (a cheat that crashes would fail vacuously)
    assert rows[condition][0] == "FAIL", text
    assert rows["log source"][0] == "FAIL" and rows["code hash"][0] == "FAIL"  # not the script that made the artifact


def test_probes_and_forms():
    """Probes: one per K-th of the targets, q's token changed, later non-BOS tokens redrawn, BOS kept, the text
    one target past q's chunk; positions from the seed only. The compressed wrapper is decoded here."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 5000)
    tokens[::97] = 1
    plan = dict(eval_seq_len=64, eval_stride=16, ttt_chunk_tokens=1024)
    chunks = verify.Chunks(tokens.size, plan)
    assert chunks.first.tolist() == [1, 1025, 2049, 3073, 4097] and chunks.last[-1] == 4999
    a = verify.draw_probes(np.random.default_rng(5), tokens, 4, chunks, 64, 1, doc=False)
    b = verify.draw_probes(np.random.default_rng(5), tokens, 4, chunks, 64, 1, doc=False)
    assert [p["q"] for p in a] == [p["q"] for p in b]
    for k, p in enumerate(a):
        q, L = p["q"], p["L"]
        text = np.concatenate([tokens[:q], p["part"]])
        assert 2 + k * 4998 / 4 <= q < 2 + (k + 1) * 4998 / 4 and tokens[q] != 1
        assert L == min(chunks.last[chunks.of(q)] + 2, 5000)
        assert (text[:q] == tokens[:q]).all() and text[q] != tokens[q] and p["new"] == text[q]
        assert ((text[q + 1:] == 1) == (tokens[q + 1:L] == 1)).all() and text.size == L
    doc = verify.draw_probes(np.random.default_rng(5), tokens, 4, chunks, 64, 1, doc=True)
    assert all(p["L"] == tokens.size or tokens[p["L"]] == 1 for p in doc)
    source = (ROOT / "train_gpt.py").read_bytes()
    packed = tg.pack_source(source)
    assert verify.readable_source_of(packed) == (source, "compressed")
    assert verify.readable_source_of(packed + b"print(1)\n")[1] == "readable"  # not exactly the wrapper: run as is


def test_ngram_rows_against_a_reference():
    """verify's Witten-Bell over its own counts against a direct loop over the text."""
    rng = np.random.default_rng(1)
    V, tokens, orders = 6, rng.integers(0, 6, 300), [4, 3, 2]
    targets, upto = np.array([150, 200, 299]), np.array([101, 180, 299])
    model = rng.random((3, V))
    model /= model.sum(1, keepdims=True)
    beta = rng.random((3, 3)) + 0.5
    ours = verify.ngram_rows(tokens, targets, upto, orders, model, beta, V, verify.context_hashes(tokens, 4))
    for i, t in enumerate(targets):
        p = model[i]
        for j in (2, 1, 0):
            n = orders[j]
            ctx = tuple(tokens[t - n + 1:t])
            follow = [tokens[s] for s in range(n - 1, upto[i]) if tuple(tokens[s - n + 1:s]) == ctx]
            if follow:
                c = np.bincount(follow, minlength=V)
                k = beta[i, j] * np.count_nonzero(c)
                p = (c + k * p) / (len(follow) + k)
        assert np.allclose(ours[i], p, rtol=1e-12, atol=0) and abs(ours[i].sum() - 1) < 1e-12


def test_verify_passes_an_honest_doc_mode_score(tiny_run, capsys):
    """EVAL_MODE=doc (per-document chunks, the document-local n-gram layer on): the honest script passes every check
    verify can make on a prefix (the logged score is the sliding one, so the score row is skipped); verify's own
    counts include the target's document's earlier chunks, as the script's do."""
    env = {**tiny_run["env"], "EVAL_MODE": "doc", "EVAL_BATCH_SEQS": "4", "DOC_CHUNK_TOKENS": "32"}
    out = tiny_run["out"]
    code = verify.main([str(out / "final_model.gptq.xz"), "--log", str(out / "logs" / "test.txt"), "--seed", "2",
                        "--probes", "2", "--tokens", str(VAL_TOKENS - 1)], environ=env)
    text = capsys.readouterr().out
    rows = {m[0].strip(): m[1] for m in re.findall(r"^(\w[\w -]*?)\s+(PASS|FAIL|SKIP)  (.*)$", text, re.M)}
    assert code == 0 and rows["n-gram recomputed"] == "PASS" and rows["C1 causal"] == "PASS", text
    assert "FAIL" not in rows.values(), text


def test_verify_catches_a_doc_mode_phase_on_unscored_documents(tiny_run, capsys, tmp_path):
    """EVAL_MODE=doc with one phase of global SGD: the broken copy's phase trains on the whole text, documents not
    yet scored included (tests/_doc_cheats.py); a probe after the phase changes later tokens, so the scores
    between the phase and q move: C1 fails."""
    from _doc_cheats import cheat_source
    path = tmp_path / "train_gpt.py"
    path.write_text(cheat_source("doc_phase_trains_on_unscored"), encoding="utf-8")
    out = tiny_run["out"]
    env = {**tiny_run["env"], "EVAL_MODE": "doc", "EVAL_BATCH_SEQS": "4", "PHASED_TTT_NUM_PHASES": "1",
           "PHASED_TTT_PREFIX_DOCS": "2", "PHASED_TTT_LR": "0.05"}
    code = verify.main([str(out / "final_model.gptq.xz"), "--log", str(out / "logs" / "test.txt"), "--script",
                        str(path), "--seed", "1", "--probes", "2"], environ=env)
    text = capsys.readouterr().out
    rows = {m[0].strip(): m[1] for m in re.findall(r"^(\w[\w -]*?)\s+(PASS|FAIL|SKIP)  (.*)$", text, re.M)}
    assert code == 1 and rows["C1 causal"] == "FAIL" and " run failed (exit" not in text, text
