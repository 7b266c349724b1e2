"""End-to-end runs of train_gpt.py as a subprocess on the embedded corpus with the tiny configuration:
the log grammar and submission.json (README "Reviewers"), determinism, 2-process (gloo) training, and clear
failures on bad input."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _runs import assert_ok, exact_numbers, log_lines, run_bad
from conftest import ROOT, run_script

TRAIN = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) ", re.M)


def train_losses(out: Path) -> dict:
    return {int(m[0]): float(m[2]) for m in TRAIN.findall("\n".join(log_lines(out)))}


@pytest.fixture(scope="module")
def main_run(corpus_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("main_run")
    r = run_script({**corpus_env, "ITERATIONS": "6"}, out)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


# ------------------------------------------------------------------------------------------------
# the main job: log grammar and submission.json
# ------------------------------------------------------------------------------------------------

def test_main_job_log_in_order(main_run):
    lines = log_lines(main_run)
    patterns = [
        r"^config: \{",
        r"^versions: python:\S+ torch:\S+",
        r"^hardware: device:cpu ",
        r"^step:2/6 train_loss:\d+\.\d+ train_time:\d+ms step_avg:\S+ms",
        r"^step:6/6 train_loss:\d+\.\d+ ",
        r"^final_weights val_loss:\S+ val_bpb:\S+",
        r"^gptq: ",
        r"^Code size: \d+ bytes",
        r"^Total submission size: \d+ bytes",
        r"^final_quant_roundtrip_contiguous val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4}",
        r"^final_quant_roundtrip_contiguous_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
        r"^ngram_audit: ",
        r"^final_integrated val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4}",
        r"^final_integrated_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
    ]
    at = -1
    for pat in patterns:
        hits = [i for i, l in enumerate(lines) if re.search(pat, l)]
        later = [i for i in hits if i > at]
        assert later, f"no line matching {pat!r} after line {at}"
        at = later[0]
    assert len([l for l in lines if l.startswith("gptq: ")]) == 4 * 6 + 1  # 6 block matrices per layer, and the tied embedding
    assert sorted(train_losses(main_run)) == [2, 4, 6]
    config = json.loads(next(l for l in lines if l.startswith("config: "))[len("config: "):])
    assert config["iterations"] == 6 and config["num_layers"] == 4
    audit = next(l for l in lines if l.startswith("ngram_audit: "))
    assert audit.endswith("count_mismatches:0")


def test_submission_json(main_run):
    sub = json.loads((main_run / "submission.json").read_text())
    for key in ("name", "author", "github_id", "date", "val_bpb", "val_loss", "bytes_total", "bytes_code", "blurb",
                "seed", "hardware", "world_size", "steps", "train_seconds", "eval_seconds", "components"):
        assert key in sub, key
    loss, bpb = exact_numbers(main_run)["final_integrated"]
    assert sub["val_bpb"] == bpb and sub["val_loss"] == loss
    lines = log_lines(main_run)
    code = int(re.search(r"^Code size: (\d+) bytes", "\n".join(lines), re.M)[1])
    total = int(re.search(r"^Total submission size: (\d+) bytes", "\n".join(lines), re.M)[1])
    assert sub["bytes_code"] == code == len((ROOT / "train_gpt.py").read_bytes())
    assert sub["bytes_total"] == total == code + (main_run / "final_model.gptq.xz").stat().st_size
    assert sub["seed"] == 1337 and sub["world_size"] == 1 and sub["steps"] == 6
    assert sub["train_seconds"] >= 0 and sub["eval_seconds"] > 0
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", sub["date"])
    assert isinstance(sub["blurb"], str) and sub["blurb"] and isinstance(sub["name"], str) and sub["name"]
    assert "CPU" in sub["hardware"]
    comp = sub["components"]
    assert isinstance(comp, dict)
    assert comp.get("integrated_bpb") == bpb
    assert comp.get("quant_roundtrip_contiguous_val_bpb") == exact_numbers(main_run)["final_quant_roundtrip_contiguous"][1]


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------

def test_same_seed_identical_different_seed_differs(main_run, corpus_env, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    same.mkdir()
    other.mkdir()
    r = run_script({**corpus_env, "ITERATIONS": "6"}, same)
    assert r.returncode == 0, r.stderr[-4000:]
    r = run_script({**corpus_env, "ITERATIONS": "6", "SEED": "7"}, other)
    assert r.returncode == 0, r.stderr[-4000:]
    base = exact_numbers(main_run)
    assert set(base) >= {"final_quant_roundtrip_contiguous", "final_integrated"}
    assert exact_numbers(same) == base
    assert train_losses(same) == train_losses(main_run)
    assert (same / "final_model.gptq.xz").read_bytes() == (main_run / "final_model.gptq.xz").read_bytes()
    diff = exact_numbers(other)
    assert diff["final_integrated"] != base["final_integrated"]
    assert diff["final_quant_roundtrip_contiguous"] != base["final_quant_roundtrip_contiguous"]
    assert (other / "final_model.gptq.xz").read_bytes() != (main_run / "final_model.gptq.xz").read_bytes()
    assert json.loads((other / "submission.json").read_text())["seed"] == 7


# ------------------------------------------------------------------------------------------------
# 2 processes (gloo)
# ------------------------------------------------------------------------------------------------

def test_two_process_training_matches_one(main_run, corpus_env, tmp_path):
    """The global batch is identical (every rank reads the same stream and takes its slice; grad
    accumulation 8/WORLD_SIZE), so only float summation order differs: the loss average over ranks, the
    reduce-scattered (averaged) bank gradients and the all-reduced small-parameter gradients. Muon's
    bf16 Newton-Schulz can amplify a last-bit difference, but over 6 steps the logged train_loss agrees
    to ~1e-4 relative (measured ~5e-5); 1e-3 relative leaves room while a wrong slice (different data)
    or a missing gradient average changes the loss by percent."""
    r = run_script({**corpus_env, "ITERATIONS": "6"}, tmp_path, nproc=2)
    assert_ok(r, tmp_path, nproc=2)
    one, two = train_losses(main_run), train_losses(tmp_path)
    assert sorted(two) == sorted(one) == [2, 4, 6]
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-3 * abs(one[step]), (step, one[step], two[step])
    assert re.search(r"^hardware: .*world_size:2 ", "\n".join(log_lines(tmp_path)), re.M)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub["world_size"] == 2 and sub["steps"] == 6
    assert abs(sub["val_bpb"] - exact_numbers(main_run)["final_integrated"][1]) < 1e-3


def test_four_ranks_with_a_zero_row_rank_stop_together_on_the_budget(corpus_env, tmp_path):
    """The whole job on 4 gloo ranks with 3 layers (the last rank owns no Muon row, like ranks 6-7 of 11 layers on
    8 GPUs) under a wall-clock budget: the shared clock stops every rank at the same step (the run checks and
    logs it), then export and evaluation complete and the submission says so."""
    r = run_script({**corpus_env, "NUM_LAYERS": "3", "XSA_LAST_N": "1", "VE_LAST_N": "1", "ITERATIONS": "100000",
                    "MAX_WALLCLOCK_SECONDS": "25", "EXPORT_RESERVE_SECONDS": "5"}, tmp_path, nproc=4)
    assert_ok(r, tmp_path, nproc=4)
    lines = log_lines(tmp_path)
    stop = next(l for l in lines if l.startswith("stop: "))
    assert re.fullmatch(r"stop: predicted_budget at step \d+ on every rank \(world_size 4\)", stop), stop
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub["world_size"] == 4 and sub["steps"] == int(stop.split()[4])
    assert "compliant: yes" in "\n".join(lines)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_two_process_teardown_leaves_no_gloo_threads(corpus_env, tmp_path):
    """Deterministic check of an exit-time abort seen once (gloo threads kept alive past
    destroy_process_group when torch._dynamo is first imported after init_process_group): after main()
    and destroy_process_group() no gloo thread may remain in either rank (see tests/_gloo_teardown.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(corpus_env, ITERATIONS="2", OUTPUT_DIR=str(tmp_path), RUN_ID="test", OMP_NUM_THREADS="1",
               TEARDOWN_OUT=str(tmp_path / "threads"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "_gloo_teardown.py")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        names = json.loads((tmp_path / f"threads.{rank}.json").read_text())
        assert not [n for n in names if "gloo" in n], names


# ------------------------------------------------------------------------------------------------
# bad input -> clear message, non-zero exit, no submission.json
# ------------------------------------------------------------------------------------------------

def copy_data(corpus_env, dst: Path) -> Path:
    shutil.copytree(corpus_env["DATA_PATH"], dst)
    return dst


def test_bad_data_path_empty_dir(corpus_env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = run_bad({**corpus_env, "DATA_PATH": str(empty)}, tmp_path / "out")
    assert "DATA_PATH" in msg and str(empty) in msg


def test_bad_vocab_size(corpus_env, tmp_path):
    msg = run_bad({**corpus_env, "VOCAB_SIZE": "512"}, tmp_path / "out")
    assert "VOCAB_SIZE" in msg and "512" in msg


def test_bad_unparsable_setting(corpus_env, tmp_path):
    msg = run_bad({**corpus_env, "NUM_LAYERS": "abc"}, tmp_path / "out")
    assert "NUM_LAYERS" in msg and "abc" in msg


@pytest.mark.parametrize("split", ["val", "train"])
def test_bad_truncated_shard(split, corpus_env, tmp_path):
    data = copy_data(corpus_env, tmp_path / "data")
    shard = sorted(data.glob(f"fineweb_{split}_*.bin"))[0]  # the first one: read at the start of the run
    blob = shard.read_bytes()
    shard.write_bytes(blob[:len(blob) - 101])
    msg = run_bad({**corpus_env, "DATA_PATH": str(data)}, tmp_path / "out")
    assert str(shard) in msg


@pytest.mark.parametrize("var", ["EMBED_LR", "MATRIX_LR_ENCODER"])
def test_bad_divergence(var, corpus_env, tmp_path):
    out = tmp_path / "out"
    msg = run_bad({**corpus_env, var: "1e30"}, out)
    assert "train_loss is nan" in msg and "diverged" in msg
    assert not (out / "final_model.gptq.xz").exists()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "missing"])
def test_bad_eval_only_artifact(kind, main_run, corpus_env, tmp_path):
    art = tmp_path / "broken.gptq.xz"
    if kind == "truncated":
        blob = (main_run / "final_model.gptq.xz").read_bytes()
        art.write_bytes(blob[:len(blob) // 2])
    elif kind == "garbage":
        art.write_bytes(os.urandom(5000))
    msg = run_bad({**corpus_env, "EVAL_ONLY": str(art)}, tmp_path / "out")
    assert str(art) in msg
