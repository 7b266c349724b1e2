"""tools/verify.py (./run.sh verify) on a real artifact from a tiny run: every check passes on train_gpt.py,
and each deliberately broken copy of the script (made here by text substitution) fails, naming the
condition it breaks."""
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "tools"))
import verify  # noqa: E402

VAL_TOKENS = 4096  # the tiny run's whole validation split (so the score row compares with its log)
PREFIX = 3000      # the broken copies are checked on a prefix (cheaper; exercises --tokens)

# Broken copies: name -> (the row that must FAIL, [(old, new)] text substitutions on train_gpt.py). Each old
# text must occur exactly once (asserted in broken_copy: a refactor that moves it fails loudly). The patterns
# are single statements of evaluate() and each replacement is a single line, so re-indenting or re-wrapping
# the code around them does not matter; to re-target, copy the current statement here.
BROKEN = {
    # C1/C3: the chunk's own targets go into the n-gram cache before its statistics are read (and not after).
    "cache_before_score": ("C1 causal", [
        ("stats = ngram_stats(cache, tokens, sc.pos)",
         "stats = (cache is not None and cache.update(tokens, sc.pos), ngram_stats(cache, tokens, sc.pos))[1]"),
        ("cache.update(tokens, torch.arange(lo, hi + 1, device=d.device))", "None")]),
    # C2: the Witten-Bell escape weight looks at the target: half the escape mass where the target was seen.
    "alpha_reads_target": ("C2 weights", [
        ("mixed, alpha = mixer.mix(sc.logp, sc.entropy, *stats)",
         "mixed, alpha = mixer.mix(sc.logp, sc.entropy, stats[0], stats[1], stats[2] * (1 - 0.5 * (stats[1] > 0)))")]),
    # C4: the last window of every chunk is scored twice, and the script's own target count check is gone.
    "window_twice": ("C4 once", [
        ("mine = wins[k * d.rank // d.world_size:k * (d.rank + 1) // d.world_size]",
         "mine = wins[k * d.rank // d.world_size:k * (d.rank + 1) // d.world_size]; mine = torch.cat([mine, mine[-1:]])"),
        ("int(sums[3].item()) != N - 1", "False")]),
}


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
    rows = {m[0].strip(): (m[1], m[2]) for m in re.findall(r"^(\w[\w ]*?)\s+(PASS|FAIL|SKIP)  (.*)$", text, re.M)}
    return code, rows, text


def broken_copy(tmp_path: Path, name: str) -> Path:
    text = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    for old, new in BROKEN[name][1]:
        assert text.count(old) == 1, f"{name}: pattern not found once in train_gpt.py (refactored?): {old!r}"
        text = text.replace(old, new)
    path = tmp_path / "train_gpt.py"
    path.write_text(text, encoding="utf-8")
    return path


def test_verify_passes_on_a_real_artifact(tiny_run, capsys):
    out = tiny_run["out"]
    code, rows, text = run_verify(tiny_run, capsys, "--submission", str(out / "submission.json"))
    assert "checked: all 4096 validation tokens" in text
    assert set(rows) == {"size", "code hash", "log source", "score", "BPB from dump", "bytes", "C4 once",
                         "C1 causal", "C2 normalized", "C2 weights", "C2 distribution"}, text
    for name, (status, detail) in rows.items():
        assert status == "PASS", (name, status, detail)
    assert "submission.json" in rows["score"][1] and "log" in rows["score"][1]
    assert code == 0


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_verify_catches_a_broken_script(tiny_run, capsys, tmp_path, name):
    condition = BROKEN[name][0]
    code, rows, text = run_verify(tiny_run, capsys, "--script", str(broken_copy(tmp_path, name)),
                                  "--tokens", str(PREFIX))
    assert f"PREFIX: the first {PREFIX} of {VAL_TOKENS}" in text and rows["score"][0] == "SKIP"
    assert code == 1
    assert rows[condition][0] == "FAIL", text
    assert rows["log source"][0] == "FAIL"  # the log was written by the real script, not this copy


def test_perturbation_helpers():
    tokens = np.array([1, 5, 6, 4, 5, 6, 7, 5, 6, 9], dtype=np.int64)
    assert verify.unseen_token(tokens, 9, 3, 16) == 5  # context (5, 6) was followed by 4 and 7; target 9
    assert verify.unseen_token(np.array([1, 4, 4, 5, 4, 6, 4, 7]), 7, 2, 16) == 8  # 4 was followed by 4, 5, 6
    p = verify.permute_after(tokens, 3, 16)
    assert (p[:3] == tokens[:3]).all() and (p[3:] != tokens[3:]).all() and p.max() < 16
    cut = verify.cut_point(4096, 1024, 16)
    assert 1024 < cut < 2048 and cut % 16 != 0


def fake_dump(rng, n: int, V: int = 8, audit=(3, 6)) -> tuple:
    """A self-consistent dump over n tokens: audited rows are normalized and hold exp(-mixed_nll) at the target."""
    tokens = rng.integers(0, V, n)
    pos = np.array(audit)
    p = rng.random((len(pos), V))
    p /= p.sum(1, keepdims=True)
    mixed = rng.random(n - 1) + 0.5
    mixed[pos - 1] = -np.log(p[np.arange(len(pos)), tokens[pos]])
    d = dict(model_nll=mixed + 0.1, mixed_nll=mixed, order=np.full(n - 1, 3.0), alpha=np.full(n - 1, 0.2),
             bytes=np.ones(n - 1), times_scored=np.ones(n - 1), audit_pos=pos, audit_p=p)
    return tokens, d


def test_audit_checks_on_synthetic_dumps():
    """The rows that need the eval branch's audit arrays, checked on hand-made dumps (pass and fail)."""
    rng = np.random.default_rng(0)
    tokens, d = fake_dump(rng, 10)
    base = dict(dump=d, bpb=0.0)
    assert verify.check_normalized(base, tokens)[0] == "PASS"
    bad = dict(d, audit_p=d["audit_p"] * 1.01)
    assert verify.check_normalized(dict(dump=bad), tokens)[0] == "FAIL"
    # changing target 6's token: same distribution, new score = its entry at the new token -> PASS
    new = (tokens[6] + 1) % 8
    after = dict(d, mixed_nll=d["mixed_nll"].copy())
    after["mixed_nll"][5] = -np.log(d["audit_p"][1, new])
    assert verify.check_distribution(base, dict(dump=after), 6, new)[0] == "PASS"
    assert verify.check_weights(base, dict(dump=after), 6, tokens, new)[0] == "PASS"
    moved = dict(after, audit_p=d["audit_p"].copy())
    moved["audit_p"][1] = np.roll(moved["audit_p"][1], 1)
    assert verify.check_distribution(base, dict(dump=moved), 6, new)[0] == "FAIL"
    reweighted = dict(after, alpha=d["alpha"].copy())
    reweighted["alpha"][5] = 0.0
    assert verify.check_weights(base, dict(dump=reweighted), 6, tokens, new)[0] == "FAIL"
    # C1: a change before the cut fails, a change only after it passes
    later = dict(d, mixed_nll=d["mixed_nll"] + np.r_[np.zeros(6), np.ones(3)])
    assert verify.check_causal(base, dict(dump=later), 7)[0] == "PASS"
    assert verify.check_causal(base, dict(dump=later), 8)[0] == "FAIL"
    assert verify.check_causal(base, dict(dump=d), 7)[0] == "FAIL"  # nothing changed after the cut: vacuous
    assert verify.check_once(dict(dump=dict(d, times_scored=np.r_[np.ones(8), 2.0])), 10)[0] == "FAIL"
