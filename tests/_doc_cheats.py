"""Cheating copies of train_gpt.py for doc mode (the lead wires them into tools/verify.py's broken copies)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASE_ANCHOR = "phased_sgd(model, tokens, hi, hp, d, luts)"


def phase_trains_on_unscored(source: str) -> str:
    """Phased global TTT trains on the whole text, documents not yet scored included (breaks C1/C3)."""
    assert source.count(PHASE_ANCHOR) == 1, "the phase's call site changed: update the cheat"
    return source.replace(PHASE_ANCHOR, "phased_sgd(model, tokens, tokens.numel() - 1, hp, d, luts)")


CHEATS = {"doc_phase_trains_on_unscored": phase_trains_on_unscored}


def cheat_source(name: str) -> str:
    return CHEATS[name]((ROOT / "train_gpt.py").read_text())
