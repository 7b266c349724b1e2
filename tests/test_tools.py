"""The reviewer tools around train_gpt.py: gpu-check's CPU path, the seeds command with its Welch test,
and the run report."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import report  # noqa: E402
import seeds  # noqa: E402


def test_gpu_check_cpu_path(tmp_path):
    """Without CUDA it says so, runs every step at a reduced size and exits 0 with a summary table."""
    out = tmp_path / "gpu_check.txt"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--steps", "1", "--variants",
                        "tree,sdpa_flash", "--eval-tokens", "8192", "--log", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "no CUDA device here" in text and "REDUCED size" in text
    for row in ("attention kernel chosen", "attention fwd+bwd, one layer", "train tree", "train sdpa_flash",
                "GPTQ all matrices", "width allocation + write", "eval phase score", "eval phase ngram",
                "eval phase learn_mix", "n-gram audit", "projected eval", "gpu-check wall time"):
        assert re.search(rf"^{re.escape(row)}", text, re.M), row
    assert "FAILED" not in text and "SKIPPED" not in text
    assert re.search(r"^train tree .*attention sdpa_\w+, .*recompiles 0,", text, re.M)
    assert re.search(r"^train sdpa_flash .*attention sdpa_\w+, ", text, re.M)


def t_sf_by_integration(t: float, df: float) -> float:
    """P(T > t) by Simpson integration of the Student t density: an independent hand computation."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    lo, hi, n = t, t + 400.0, 200_000
    h = (hi - lo) / n
    s = pdf(lo) + pdf(hi) + sum((4 if i % 2 else 2) * pdf(lo + i * h) for i in range(1, n))
    return s * h / 3


@pytest.mark.parametrize("t,df", [(2.0, 10.0), (0.7, 3.4), (-1.2, 6.0), (4.5, 2.2)])
def test_t_survival_function(t, df):
    assert seeds.t_sf(t, df) == pytest.approx(t_sf_by_integration(t, df) if t > 0 else 1 - t_sf_by_integration(-t, df),
                                             abs=2e-6)


def test_welch_by_hand():
    ours, ref = [2.001, 1.995, 1.998], (2.012, 0.003, 3)
    m = sum(ours) / 3
    s2 = sum((x - m) ** 2 for x in ours) / 2
    va, vb = s2 / 3, ref[1] ** 2 / ref[2]
    t = (ref[0] - m - 0.005) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    got = seeds.welch_improvement_p(ours, *ref, 0.005)
    assert got["t"] == pytest.approx(t) and got["df"] == pytest.approx(df)
    assert got["p_value"] == pytest.approx(t_sf_by_integration(t, df), abs=2e-6)


def test_seeds_command_tiny(corpus_env, tmp_path):
    """Two tiny step-based runs: per-seed entries, mean, std and the p-value, all from the runs' own files."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(corpus_env, ITERATIONS="4", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "seeds.py"), "1337", "42", "--out", str(tmp_path),
                        "--ref-mean", "6.5", "--ref-std", "0.01", "--ref-n", "3"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sub = json.loads((tmp_path / "submission.json").read_text())
    per_seed = {s["seed"]: s for s in sub["seeds"]}
    assert set(per_seed) == {1337, 42} and sub["n_seeds"] == 2
    for seed, entry in per_seed.items():
        own = json.loads((tmp_path / f"seed_{seed}" / "submission.json").read_text())
        assert entry["val_bpb"] == own["val_bpb"] and entry["val_loss"] == own["val_loss"]
        assert (tmp_path / "logs" / f"seed_{seed}.txt").is_file()
    bpbs, losses = [s["val_bpb"] for s in sub["seeds"]], [s["val_loss"] for s in sub["seeds"]]
    assert bpbs[0] != bpbs[1]  # different seeds, different runs
    assert sub["val_bpb"] == pytest.approx(sum(bpbs) / 2, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(abs(bpbs[0] - bpbs[1]) / math.sqrt(2), abs=1e-8)
    m = sum(losses) / 2
    va = (abs(losses[0] - losses[1]) / math.sqrt(2)) ** 2 / 2
    vb = 0.01 ** 2 / 3
    t = (6.5 - m - 0.005) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 + vb ** 2 / 2)
    assert sub["significance"]["p_value"] == pytest.approx(
        t_sf_by_integration(t, df) if t > 0 else 1 - t_sf_by_integration(-t, df), abs=1e-5)


def committed_run_log() -> Path:
    """The committed embedded-corpus main-job log (./run.sh names it run_<time>.txt)."""
    logs = [p for p in sorted((ROOT / "logs").glob("run_*.txt")) if not p.stem.endswith("_no_ttt")]
    assert logs, "the embedded-corpus run log must be committed under logs/"
    return logs[-1]


def test_report_draws_png_from_committed_log(tmp_path):
    pytest.importorskip("matplotlib")
    log = committed_run_log()
    text = log.read_text(encoding="utf-8")
    series = report.parse_log(text)
    body = text.split("=" * 100)[-1]  # after the embedded source listing
    train_lines = re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+) ", body, re.M)
    assert [(s[0], s[1]) for s in series["train"]] == [(int(a), float(b)) for a, b in train_lines]
    assert len(series["val"]) == len(re.findall(r"^step:\d+/\d+ val_loss:", body, re.M))
    assert len(series["chunks"]) == len(re.findall(r"^integrated_chunk:", body, re.M)) > 0
    final = re.search(r"^final_integrated val_loss:([\d.]+) val_bpb:([\d.]+)", body, re.M)
    assert series["final"]["final_integrated"] == (float(final[1]), float(final[2]))
    out = tmp_path / "report.png"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(log), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
