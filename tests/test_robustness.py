"""A run never ends with nothing (issue 9): the predicted stop and the budget record, an overrun kept and
marked non-compliant, and bad inputs that fail before training with one line naming the setting or file,
leaving an earlier run's results where they can be found."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from _runs import log_lines, run_bad
from conftest import ROOT, run_script, tiny_hp


def write_shard(path: Path, tokens) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = [tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)]
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


# -----------------------------------------------------------------------------------------------------
# the budget: predicted stop, prediction vs actual in the log
# -----------------------------------------------------------------------------------------------------

def test_shared_clock_reads_one_step_late():
    clock = tg.SharedClock(tg.Dist())
    clock.post([1.0, 0.5, 1.0])
    assert clock.read() is None
    clock.post([2.0, 0.6, 2.0])
    assert clock.read() == [1.0, 0.5, 1.0]
    clock.post([3.0, 0.7, 3.0])
    assert clock.read() == [2.0, 0.6, 2.0]


def test_budget_plan_stops_before_the_predicted_end():
    plan = tg.BudgetPlan(limit=100.0, export_estimate=10.0)
    assert plan.train_share() == 90.0
    # one unseen step has run since the shared clock's reading, and the next would run before stopping
    assert plan.predicted_end(70.0, 5.0) == 70.0 + 2 * 5.0 + 10.0
    assert plan.predicted_end(79.0, 5.0) < 100.0 < plan.predicted_end(81.0, 5.0)


def test_budget_covers_training_calibration_and_export(corpus_env, tmp_path):
    """The predicted stop keeps training + calibration + export inside MAX_WALLCLOCK_SECONDS: the run is compliant
    (a budget with room for a loaded machine: the probe exports weights at trained scale, 1.5x its time reserved)."""
    proc = run_script({**corpus_env, "MAX_WALLCLOCK_SECONDS": "30", "EXPORT_RESERVE_SECONDS": "1",
                       "ITERATIONS": "100000", "TTT_CHUNK_TOKENS": "4096", "EVAL_SEQ_LEN": "128",
                       "EVAL_STRIDE": "64"}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = "\n".join(log_lines(tmp_path))
    plan = re.search(r"^budget_plan: export_probe:([\d.]+)s probe_zero_frac:([\d.]+) \(initial weights ([\d.]+)\) "
                     r"export_estimate:([\d.]+)s", log, re.M)
    pred = re.search(r"^budget_prediction: stop:predicted_budget step:\d+/100000 train_time:([\d.]+)s "
                     r"step_estimate:([\d.]+)s export_estimate:([\d.]+)s predicted_total:([\d.]+)s limit:30s", log, re.M)
    m = re.search(r"^budget: train_time:([\d.]+)s calibration_time:([\d.]+)s export_time:([\d.]+)s "
                  r"total:([\d.]+)s predicted_export:([\d.]+)s actual_export:([\d.]+)s limit:(\d+)s margin:", log, re.M)
    assert plan and pred and m, log[-3000:]
    probe, zero_probe, zero_init, estimate = map(float, plan.groups())
    assert zero_probe == 0.0 and zero_init > 0.3  # the probe's matrices are at trained scale, not the zero init
    assert estimate >= max(1.0, 1.5 * (probe - 0.05)) - 0.05  # both printed to 0.1 s
    train, calib, export, total = map(float, m.groups()[:4])
    assert abs(train + calib + export - total) <= 0.15  # each rounded to 0.1 s
    assert 0 < train <= 30 - estimate + 0.5  # stopped where the prediction said, not at the limit
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert total <= 30 and sub["compliant"] and sub["non_compliance"] == [], sub
    assert re.search(r"^train_data: tokens_read:\d+ train_tokens:\d+ epochs:[\d.]+$", log, re.M)


def test_overrun_is_kept_and_marked_not_compliant(tmp_path, corpus_env):
    """An over-budget export keeps and returns the artifact with the reason; the record says so."""
    hp = tiny_hp(data_path=corpus_env["DATA_PATH"], tokenizer_path=corpus_env["TOKENIZER_PATH"],
                 max_wallclock_seconds=5.0, export_reserve_seconds=1.0)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    exp = tg.export(model, hp, tg.Dist(), tg.RunLog(None), tmp_path, tg.TrainResult(3, 6.0, 1.0))
    assert (tmp_path / "final_model.gptq.xz").is_file() and (tmp_path / "final_model.pt").is_file()
    assert len(exp["problems"]) == 1 and "overrun" in exp["problems"][0]
    log = tg.RunLog(tmp_path / "logs" / "s.txt")
    tg.log_summary(log, dict(out=tmp_path, log="x", val_bpb=1.5, problems=exp["problems"], cap=hp.artifact_size_cap,
                             **{k: exp[k] for k in ("artifact_bytes", "code_bytes", "total_bytes")}))
    text = (tmp_path / "logs" / "s.txt").read_text()
    assert "compliant: NO: training budget overrun" in text and "result: val_bpb:1.50000000" in text


def test_summary_block_ends_the_main_job(corpus_env, tmp_path):
    r = run_script({**corpus_env, "ITERATIONS": "2"}, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = log_lines(tmp_path)
    i = next(i for i, l in enumerate(lines) if " summary " in l)
    tail = lines[i:]
    assert tail[1].startswith("result: val_bpb:") and tail[2].startswith("compliant: ")
    assert tail[3].startswith("bytes: artifact:") and tail[-1].startswith("files: log:")
    assert "submission.json" in tail[-1] and "final_model.gptq.xz" in tail[-1]


# -----------------------------------------------------------------------------------------------------
# failures that keep the work
# -----------------------------------------------------------------------------------------------------

def plant_previous(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {"submission.json": b'{"val_bpb": 1.0}', "final_model.gptq.xz": b"old artifact"}
    for name, blob in files.items():
        (out / name).write_bytes(blob)
    return files


def test_previous_results_moved_aside_not_deleted(corpus_env, tmp_path):
    out = tmp_path / "out"
    files = plant_previous(out)
    r = run_script({**corpus_env, "ITERATIONS": "2"}, out)
    assert r.returncode == 0, r.stderr[-3000:]
    moved = {p.name: p.read_bytes() for p in (out / "previous").rglob("*") if p.is_file()}
    assert moved == files
    assert json.loads((out / "submission.json").read_text())["val_bpb"] != 1.0


def test_startup_failure_leaves_previous_results_in_place(corpus_env, tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    files = plant_previous(out)
    shutil.copytree(corpus_env["DATA_PATH"], data)
    write_shard(data / "fineweb_train_000009.bin", [1, 2, 3, 5000, 4])  # a bad id in a later shard
    msg = run_bad({**corpus_env, "DATA_PATH": str(data)}, out)
    assert "fineweb_train_000009.bin" in msg and "5000" in msg and "VOCAB_SIZE" in msg
    assert {n: (out / n).read_bytes() for n in files} == files
    assert not any(l.startswith("step:") for l in log_lines(out)), "rejected before training"


def test_unwritable_output_dir_fails_at_start(corpus_env, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "out"  # a folder below a file: cannot be created, even as root
    r = run_script({**corpus_env, "OUTPUT_DIR": str(bad)}, tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: OUTPUT_DIR=") and str(bad) in last


def test_validation_shorter_than_one_sequence(corpus_env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus_env["DATA_PATH"], data)
    for p in data.glob("fineweb_val_*.bin"):
        p.unlink()
    write_shard(data / "fineweb_val_000000.bin", [1, 5, 6, 7])
    msg = run_bad({**corpus_env, "DATA_PATH": str(data)}, tmp_path / "out")
    assert "validation split has 4 tokens" in msg and "TRAIN_SEQ_LEN" in msg


def test_os_error_is_one_line_naming_the_path():
    e = PermissionError(13, "Permission denied", "/some/where/final_model.pt")
    assert tg.error_line(e) == "Permission denied: /some/where/final_model.pt"


@pytest.mark.parametrize("env,var", [({"COMPLEMENT_ALPHA": "2"}, "COMPLEMENT_ALPHA"),
                                     ({"NGRAM_EVAL_ORDER": "1"}, "NGRAM_EVAL_ORDER"),
                                     ({"LATE_QAT_FRAC": "1.5"}, "LATE_QAT_FRAC"),
                                     ({"DIST_TIMEOUT_SECONDS": "0"}, "DIST_TIMEOUT_SECONDS"),
                                     ({"EVAL_BUDGET_SECONDS": "0"}, "EVAL_BUDGET_SECONDS")])
def test_range_checks_name_the_variable(env, var):
    with pytest.raises(tg.GolfError, match=rf"^{var}="):
        tg.Hyperparameters.from_env(env)


def test_process_group_has_a_timeout(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(tg.dist, "init_process_group", lambda backend, timeout: seen.update(timeout=timeout))
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: False)
    tg.init_distributed(42.0)
    assert seen["timeout"].total_seconds() == 42.0


def test_run_sh_sets_cpu_threads():
    text = (ROOT / "run.sh").read_text()
    assert re.search(r'export OMP_NUM_THREADS="\$\{OMP_NUM_THREADS:-', text)
