"""Faults that must end as README "When something goes wrong" promises (issue 19): a full disk, a second run in the
same OUTPUT_DIR, SIGINT/SIGTERM, a lost process, settings that name themselves, EVAL_ONLY scored with the
artifact's own settings, and the compressed submitted form of the script behaving exactly like the source."""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_gpt as tg
from _runs import exact_numbers, log_lines, run_bad
from conftest import ROOT, run_script

LONG = {"ITERATIONS": "100000", "TRAIN_LOG_EVERY": "1"}  # step-based, stopped by a signal long before the end


def start(env: dict, out: Path, script: Path = ROOT / "train_gpt.py", fsize: int | None = None) -> subprocess.Popen:
    """train_gpt.py in the background (optionally with a file-size limit: a disk that fills up)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update({"OUTPUT_DIR": str(out), "RUN_ID": "test", "OMP_NUM_THREADS": "1", **env})
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(script)], env=full, cwd=out, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def wait_for(out: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    log = out / "logs" / "test.txt"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists() and re.search(pattern, log.read_text(), re.M):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern!r}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {timeout}s")


def summary(out: Path) -> list:
    lines = log_lines(out)
    return lines[next(i for i, l in enumerate(lines) if " summary " in l):]


def no_tmp_files(out: Path) -> bool:
    return not list(out.rglob("*.tmp"))


# -----------------------------------------------------------------------------------------------------
# a full disk: nothing half-written, the finished training kept
# -----------------------------------------------------------------------------------------------------

def test_file_size_limit_keeps_the_artifact_when_the_checkpoint_cannot_be_written(corpus_env, tmp_path):
    """A limit between the artifact's size and the checkpoint's: the checkpoint fails (one error line naming it, no
    partial file), the artifact is still written and evaluated, submission.json is written, the exit code (3)
    says the run is incomplete."""
    p = start({**corpus_env, "ITERATIONS": "2"}, tmp_path, fsize=400_000)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 3, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: run incomplete: checkpoint not written: File too large: ") and "final_model.pt" in last
    assert not (tmp_path / "final_model.pt").exists() and no_tmp_files(tmp_path)
    assert (tmp_path / "final_model.gptq.xz").stat().st_size < 400_000
    assert json.loads((tmp_path / "submission.json").read_text())["val_bpb"] > 0
    tail = summary(tmp_path)
    assert tail[1].startswith("result: val_bpb:") and any(l.startswith("incomplete: checkpoint not written") for l in tail)


def test_file_size_limit_below_the_artifact_fails_with_one_line_and_no_partial_file(corpus_env, tmp_path):
    """Nothing fits (the log, the checkpoint, the artifact): one error line naming the artifact and the checkpoint,
    exit 2, no half-written file anywhere, no submission.json."""
    p = start({**corpus_env, "ITERATIONS": "2"}, tmp_path, fsize=20_000)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: artifact not written: File too large: ") and "final_model.gptq.xz" in last, last
    assert "checkpoint not written" in last and "warning: the run log" in err
    assert not any((tmp_path / n).exists() for n in tg.RESULT_FILES) and no_tmp_files(tmp_path)


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as e:
        tg.write_atomic(tmp_path / "missing" / "x.bin", b"new")
    assert "missing" in e.value.filename
    tg.write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and no_tmp_files(tmp_path)


# -----------------------------------------------------------------------------------------------------
# one run per OUTPUT_DIR; earlier results together in one previous/<time>/
# -----------------------------------------------------------------------------------------------------

def test_second_run_in_the_same_output_dir_refuses_naming_the_first(corpus_env, tmp_path):
    (tmp_path / "submission.json").write_text('{"val_bpb": 1.0}')
    held = tg.lock_output_dir(tmp_path, "first_run")
    try:
        msg = run_bad({**corpus_env, "ITERATIONS": "2"}, tmp_path)
    finally:
        held.close()
    assert "OUTPUT_DIR=" in msg and "in use by another run (run_id:first_run pid:" in msg
    assert json.loads((tmp_path / "submission.json").read_text()) == {"val_bpb": 1.0}  # untouched, not moved aside


def test_earlier_results_go_to_one_previous_folder(tmp_path):
    for i, name in enumerate(tg.RESULT_FILES):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (1_700_000_000 + 100 * i,) * 2)  # three different times
    tg.move_aside_previous(tmp_path, tg.RunLog(None))
    folders = list((tmp_path / "previous").iterdir())
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == sorted(tg.RESULT_FILES)


# -----------------------------------------------------------------------------------------------------
# signals
# -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_training_keeps_checkpoint_and_artifact(sig, corpus_env, tmp_path):
    """The first signal finishes the current step, keeps what is finished (weights averaged, checkpoint, artifact),
    prints the summary with INTERRUPTED and exits 128 + the signal; no submission.json (no score)."""
    p = start({**corpus_env, **LONG}, tmp_path)
    wait_for(tmp_path, r"^step:3/", p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: interrupted by {sig.name} after step ")
    assert (tmp_path / "final_model.pt").is_file() and (tmp_path / "final_model.gptq.xz").is_file()
    assert not (tmp_path / "submission.json").exists()
    lines = log_lines(tmp_path)
    assert any(l.startswith(f"training_stopped: signal_{sig.name} at step ") for l in lines)
    assert summary(tmp_path)[1].startswith("result: INTERRUPTED: interrupted by")


def test_signal_during_evaluation_gives_no_partial_score(corpus_env, tmp_path):
    p = start({**corpus_env, "ITERATIONS": "2", "TTT_CHUNK_TOKENS": "128", "EVAL_SEQ_LEN": "64"}, tmp_path)
    wait_for(tmp_path, r"^integrated_chunk:2/", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "during integrated at chunk" in err.strip().splitlines()[-1]
    assert not (tmp_path / "submission.json").exists() and (tmp_path / "final_model.gptq.xz").is_file()
    assert not any(l.startswith("final_integrated") for l in log_lines(tmp_path))


# -----------------------------------------------------------------------------------------------------
# settings that name themselves; their errors reach a run log
# -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,var,why", [({"OUTPUT_DIR": ""}, "OUTPUT_DIR", "must name a folder"),
                                         ({"LOGIT_SOFTCAP": "0"}, "LOGIT_SOFTCAP", "must be > 0"),
                                         ({"TRAIN_SEQ_LEN": "1000000"}, "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS / 8")])
def test_settings_name_the_variable(env, var, why):
    with pytest.raises(tg.GolfError, match=rf"^{var}=.*{re.escape(why)}"):
        tg.Hyperparameters.from_env(env)


def test_settings_error_reaches_the_run_log(corpus_env, tmp_path):
    msg = run_bad({**corpus_env, "LOGIT_SOFTCAP": "0"}, tmp_path)
    assert msg.startswith("error: LOGIT_SOFTCAP=0.0") and msg in (tmp_path / "logs" / "test.txt").read_text()


# -----------------------------------------------------------------------------------------------------
# EVAL_ONLY: the artifact's own settings; a summary that says only what was checked
# -----------------------------------------------------------------------------------------------------

TRAINED = {"ITERATIONS": "4", "TTT_ENABLED": "1", "TTT_LR": "0.01", "SEED": "7"}  # TTT on: its settings matter


@pytest.fixture(scope="module")
def trained(corpus_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    r = run_script({**corpus_env, **TRAINED}, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_eval_only_uses_the_artifact_settings_and_logs_overrides(trained, corpus_env, tmp_path):
    """Scored with none of the run's evaluation settings or seed in the environment, the artifact gives the run's
    own number; a setting given anyway is used and logged as an override; the summary claims no submission."""
    bare = {k: v for k, v in corpus_env.items() if k in ("DATA_PATH", "TOKENIZER_PATH")}
    art = str(trained / "final_model.gptq.xz")
    r = run_script({**bare, "EVAL_ONLY": art}, tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    assert exact_numbers(tmp_path / "a")["final_integrated"] == exact_numbers(trained)["final_integrated"]
    lines = log_lines(tmp_path / "a")
    assert not any(l.startswith("eval_override:") for l in lines)
    tail = summary(tmp_path / "a")
    assert "EVAL_ONLY: no submission.json written" in tail[1]
    assert tail[2] == "compliant: yes (evaluation budget); not checked: training budget and size cap (EVAL_ONLY)"
    r = run_script({**bare, "EVAL_ONLY": art, "TTT_LR": "0.02"}, tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval_override: TTT_LR=0.02 (the artifact's: 0.01)" in log_lines(tmp_path / "b")
    assert exact_numbers(tmp_path / "b")["final_integrated"] != exact_numbers(trained)["final_integrated"]


def test_step_based_run_says_the_training_budget_was_not_checked(trained):
    sub = json.loads((trained / "submission.json").read_text())
    assert not sub["compliant"] and "step-based run" in sub["non_compliance"][0]
    budget = next(l for l in log_lines(trained) if l.startswith("budget: "))
    assert budget.endswith("limit:none (step-based run)") and "margin" not in budget


# -----------------------------------------------------------------------------------------------------
# the compressed submitted form
# -----------------------------------------------------------------------------------------------------

def test_packed_script_runs_bit_identically_and_counts_its_own_bytes(trained, corpus_env, tmp_path):
    """tools/pack_code.py's file decodes to train_gpt.py, is less than half its size, and a run started from it
    gives the same losses, scores and artifact (the cap does not bind here) while counting its own bytes."""
    packed = tmp_path / "build" / "train_gpt.py"
    subprocess.run([sys.executable, str(ROOT / "tools" / "pack_code.py"), "--out", str(packed)], check=True)
    source = (ROOT / "train_gpt.py").read_bytes()
    assert tg.unpack_source(packed.read_bytes()) == source and packed.stat().st_size < len(source) / 2
    out = tmp_path / "run"
    p = start({**corpus_env, **TRAINED}, out, script=packed)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert exact_numbers(out) == exact_numbers(trained)
    loss = lambda o: [re.search(r"train_loss:(\S+)", l)[1] for l in log_lines(o) if l.startswith("step:")]
    assert loss(out) == loss(trained)
    assert (out / "final_model.gptq.xz").read_bytes() == (trained / "final_model.gptq.xz").read_bytes()
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == packed.stat().st_size
    code = next(l for l in log_lines(out) if l.startswith("code: "))
    assert f"bytes:{packed.stat().st_size} readable_source_bytes:{len(source)} form:compressed" in code
    text = (out / "logs" / "test.txt").read_text()
    assert source.decode() in text  # the readable source, not the wrapper, is what the log embeds


# -----------------------------------------------------------------------------------------------------
# a lost rank: one error line within about DIST_TIMEOUT_SECONDS, not a hang or a gloo traceback
# -----------------------------------------------------------------------------------------------------

def rank_pid(out: Path, rank: int) -> int:
    """The pid of the worker with RANK=rank whose OUTPUT_DIR is `out` (torchrun's child)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if env.get("OUTPUT_DIR") == str(out) and env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return int(proc.name)
    raise AssertionError(f"no rank-{rank} worker for {out}")


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="needs Linux /proc")
def test_a_stopped_rank_ends_the_run_with_one_error_line(corpus_env, tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-training: rank 0's next collective times out after DIST_TIMEOUT_SECONDS and the
    run ends with one `error:` line saying a process stopped or died, and the summary in rank 0's log."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update({**corpus_env, **LONG, "OUTPUT_DIR": str(tmp_path), "RUN_ID": "test", "OMP_NUM_THREADS": "1",
                 "DIST_TIMEOUT_SECONDS": "10"})
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt.py")], env=full, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        wait_for(tmp_path, r"^step:3/", proc)
        pid = rank_pid(tmp_path, 1)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        _, err = proc.communicate(timeout=240)
        waited = time.time() - t0
    finally:
        if pid:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    ours = [l for l in err.splitlines() if l.startswith("error: ")]
    assert ours and all("a process of this run stopped or died" in l and "DIST_TIMEOUT_SECONDS=10" in l
                        for l in ours), err[-3000:]
    assert waited < 10 * 6 + 30, waited  # a few collectives' timeouts at most, then torchrun's teardown
    tail = summary(tmp_path)
    assert tail[1].startswith("result: FAILED: a process of this run stopped or died"), tail
    assert not (tmp_path / "submission.json").exists() and no_tmp_files(tmp_path)
