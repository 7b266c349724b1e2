"""Helpers shared by tests/test_end_to_end.py and tests/test_eval_validity.py for reading run outputs."""
import re
from pathlib import Path

from conftest import ROOT, run_script

EXACT = re.compile(r"^(\w+)_exact val_loss:(\S+) val_bpb:(\S+)$", re.M)


def log_lines(out: Path) -> list:
    """The run's log (logs/test.txt) without the embedded copy of the source code."""
    lines = (out / "logs" / "test.txt").read_text(encoding="utf-8").splitlines()
    try:
        a = next(i for i, l in enumerate(lines) if re.match(r"^=+ source: train_gpt\.py =+$", l))
        b = next(i for i in range(a + 1, len(lines)) if re.fullmatch(r"=+", lines[i]) and len(lines[i]) >= 50)
        lines = lines[:a] + lines[b + 1:]
    except StopIteration:
        pass
    return lines


def exact_numbers(out: Path) -> dict:
    """{label: (val_loss, val_bpb)} from the `<label>_exact` lines."""
    return {m[0]: (float(m[1]), float(m[2])) for m in EXACT.findall("\n".join(log_lines(out)))}


def assert_ok(r, out: Path, nproc: int = 1) -> None:
    """The run exited 0 (also under torchrun with several gloo processes)."""
    if r.returncode != 0:
        raise AssertionError(f"exit {r.returncode} with {nproc} process(es)\n{r.stderr[-4000:]}")


def run_bad(env: dict, out: Path) -> str:
    """A bad input: non-zero exit, no traceback, no new submission, one last `error:` line, which also ends up
    in the run log when there is one. Returns that line."""
    out.mkdir(parents=True, exist_ok=True)
    sub = out / "submission.json"
    before = sub.read_bytes() if sub.exists() else None
    r = run_script(env, out)
    assert r.returncode != 0, "a bad input must fail"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    assert (sub.read_bytes() if sub.exists() else None) == before, "no submission written (an earlier one stays)"
    log = out / "logs" / "test.txt"
    if log.exists():
        assert last in log.read_text(), "every error: line also goes into the run log"
    return last
