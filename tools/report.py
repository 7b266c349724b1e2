"""Turn a train_gpt.py run log into a PNG: train loss and val BPB against time, step time, and the
evaluation's per-chunk model-only vs integrated BPB.

    python3 tools/report.py logs/<run>.txt [-o out.png]
    python3 tools/report.py --latest          (the newest run log in logs/)

matplotlib is only needed to draw; `parse_log` works without it.
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+) train_time:(\d+)ms step_avg:([\d.]+)ms")
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:([\d.]+) val_bpb:([\d.]+) train_time:(\d+)ms")
CHUNK = re.compile(r"^integrated_chunk:(\d+)/\d+ model_bpb:([\d.]+) mixed_bpb:([\d.]+)")
FINAL = re.compile(r"^(final_\w+?)(?:_exact)? val_loss:([\d.]+) val_bpb:([\d.]+)")


def parse_log(text: str) -> dict:
    """Series from the log's key:value lines (the source listing embedded in the log is skipped)."""
    out = dict(train=[], val=[], chunks=[], final={}, run_id=None, result="", compliant="")
    in_source = False
    for line in text.splitlines():
        if line.startswith("=" * 40) and "source:" in line:
            in_source = True
            continue
        if in_source:
            in_source = line != "=" * 100
            continue
        if line.startswith("run_id:"):
            out["run_id"] = line.split(":", 1)[1].strip()
        elif line.startswith(("result: ", "compliant: ")):  # the run's summary block (also on a failed run)
            key, _, value = line.partition(": ")
            out[key] = value
        elif m := TRAIN.match(line):
            out["train"].append((int(m[1]), float(m[2]), int(m[3]) / 1000, float(m[4])))
        elif m := VAL.match(line):
            out["val"].append((int(m[1]), float(m[2]), float(m[3]), int(m[4]) / 1000))
        elif m := CHUNK.match(line):
            out["chunks"].append((int(m[1]), float(m[2]), float(m[3])))
        elif (m := FINAL.match(line)) and "_exact" not in line.split()[0]:
            out["final"][m[1]] = (float(m[2]), float(m[3]))
    return out


def draw(series: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    t = [s[2] for s in series["train"]]
    ax[0, 0].plot(t, [s[1] for s in series["train"]], label="train loss")
    ax[0, 0].set(xlabel="train time (s)", ylabel="loss (nats)", title="train loss")
    if series["val"]:
        ax[0, 1].plot([v[3] for v in series["val"]], [v[2] for v in series["val"]], "o-", label="val BPB (live weights)")
    for name, (_, bpb) in series["final"].items():
        ax[0, 1].axhline(bpb, ls="--", lw=1, color={"final_quant_roundtrip": "C1", "final_int5_roundtrip": "C1", "final_integrated": "C2"}.get(name, "C3"),
                         label=f"{name} {bpb:.4f}")
    ax[0, 1].set(xlabel="train time (s)", ylabel="bits per byte", title="validation BPB")
    if ax[0, 1].get_legend_handles_labels()[0]:
        ax[0, 1].legend(fontsize=8)
    ax[1, 0].plot(t, [s[3] for s in series["train"]])
    ax[1, 0].set(xlabel="train time (s)", ylabel="ms / step (running average)", title="step time")
    c = series["chunks"]
    ax[1, 1].plot([x[0] for x in c], [x[1] for x in c], label="model only (LoRA TTT)")
    ax[1, 1].plot([x[0] for x in c], [x[2] for x in c], label="integrated (n-gram mixed)")
    ax[1, 1].set(xlabel="eval chunk", ylabel="bits per byte", title="evaluation per chunk")
    if c:
        ax[1, 1].legend(fontsize=8)
    status = "  |  ".join(x for x in (series["result"], series["compliant"] and "compliant: " + series["compliant"]) if x)
    fig.suptitle(f"run {series['run_id']}" + (f"\n{status}" if status else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latest_log() -> Path:
    logs = [p for p in (ROOT / "logs").glob("*.txt") if p.read_text(errors="replace").startswith("run_id:")]
    if not logs:
        sys.exit("report: no run log in logs/")
    return max(logs, key=lambda p: p.stat().st_mtime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log", nargs="?", type=Path)
    ap.add_argument("--latest", action="store_true")
    ap.add_argument("-o", "--out", type=Path)
    args = ap.parse_args()
    log = latest_log() if args.latest or args.log is None else args.log
    series = parse_log(log.read_text(encoding="utf-8", errors="replace"))
    out = args.out or log.with_suffix(".png")
    draw(series, out)
    print(f"report: {out} ({len(series['train'])} train points, {len(series['val'])} val points, "
          f"{len(series['chunks'])} eval chunks)")


if __name__ == "__main__":
    main()
