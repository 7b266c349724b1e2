"""Settings (Hyperparameters.from_env): parsing, validation naming the variable, every setting used, and the
documentation (README.md, run.sh) naming only real settings."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
SOURCE = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
FIELDS = {f.name: f for f in dataclasses.fields(tg.Hyperparameters)}


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------

def test_empty_env_gives_defaults():
    assert tg.Hyperparameters.from_env({}) == tg.Hyperparameters()
    # Unrelated variables are ignored; lower-case names are not settings.
    assert tg.Hyperparameters.from_env({"PATH": "/bin", "num_layers": "3", "HOME": "/x"}) == tg.Hyperparameters()


def test_parse_types():
    hp = tg.Hyperparameters.from_env({
        "NUM_LAYERS": "9", "TRAIN_BATCH_TOKENS": "524_288", "ARTIFACT_SIZE_CAP": "15_999_999",
        "SEED": "-7", "MATRIX_LR_ENCODER": "0.0125", "ADAM_EPS": "1e-9", "MAX_WALLCLOCK_SECONDS": "300",
        "TTT_ENABLED": "0", "RUN_ID": "my_run", "DATA_PATH": "/data/x", "GPTQ_CLIP_LEVELS": "1.0,0.9",
        "NGRAM_EVAL_ORDER": "4", "TTT_STEPS": "3",
    })
    assert hp.num_layers == 9 and isinstance(hp.num_layers, int)
    assert hp.train_batch_tokens == 524288 and hp.artifact_size_cap == 15_999_999
    assert hp.seed == -7
    assert hp.matrix_lr_encoder == 0.0125 and isinstance(hp.matrix_lr_encoder, float)
    assert hp.adam_eps == 1e-9
    assert hp.max_wallclock_seconds == 300.0 and isinstance(hp.max_wallclock_seconds, float)
    assert hp.ttt_enabled is False
    assert hp.run_id == "my_run" and hp.data_path == "/data/x"
    assert hp.clip_levels() == (1.0, 0.9)
    assert hp.ngram_eval_order == 4 and hp.ttt_steps == 3


@pytest.mark.parametrize("text,value", [("0", False), ("1", True), ("true", True), ("false", False),
                                        ("True", True), ("FALSE", False), (" 1 ", True)])
def test_parse_bool(text, value):
    assert tg.Hyperparameters.from_env({"TTT_ENABLED": text}).ttt_enabled is value


@pytest.mark.parametrize("var,text", [
    ("NUM_LAYERS", "abc"), ("NUM_LAYERS", "1.5"), ("NUM_LAYERS", ""), ("ITERATIONS", "1e3"),
    ("EMBED_LR", "fast"), ("TTT_ENABLED", "maybe"), ("TTT_ENABLED", "2"), ("SEED", "0x"),
])
def test_unparsable_value_names_variable(var, text):
    with pytest.raises(tg.GolfError, match=rf"\b{var}\b"):
        tg.Hyperparameters.from_env({var: text})


@pytest.mark.parametrize("env,var", [
    ({"NUM_HEADS": "7"}, "NUM_HEADS"),
    ({"NUM_HEADS": "0"}, "NUM_HEADS"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS"),
    ({"ROPE_DIMS": "128"}, "ROPE_DIMS"),
    ({"TRAIN_BATCH_TOKENS": "786433"}, "TRAIN_BATCH_TOKENS"),
    ({"TRAIN_BATCH_TOKENS": "2048"}, "TRAIN_BATCH_TOKENS"),
    ({"TRAIN_BATCH_TOKENS": "0"}, "TRAIN_BATCH_TOKENS"),
    ({"EVAL_STRIDE": "100"}, "EVAL_STRIDE"),
    ({"EVAL_STRIDE": "0"}, "EVAL_STRIDE"),
    ({"MATRIX_LR_ENCODER": "-0.01"}, "MATRIX_LR_ENCODER"),
    ({"EMBED_LR": "-1"}, "EMBED_LR"),
    ({"TTT_LR": "nan"}, "TTT_LR"),
    ({"SCALAR_LR": "inf"}, "SCALAR_LR"),
    ({"NUM_LAYERS": "-3"}, "NUM_LAYERS"),
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N"),
    ({"VE_LAST_N": "12"}, "VE_LAST_N"),
    ({"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE"),
    ({"GPTQ_CLIP_LEVELS": "2.0"}, "GPTQ_CLIP_LEVELS"),
    ({"GPTQ_CLIP_LEVELS": "1.0,0"}, "GPTQ_CLIP_LEVELS"),
    ({"GPTQ_CLIP_LEVELS": "a,b"}, "GPTQ_CLIP_LEVELS"),
    ({"GPTQ_CLIP_LEVELS": ""}, "GPTQ_CLIP_LEVELS"),
    ({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS"),
    ({"WARMDOWN_FRAC": "0"}, "WARMDOWN_FRAC"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY"),
    ({"QUANT_BITS": "4,6"}, "QUANT_BITS"),
    ({"QUANT_BITS": "5,9"}, "QUANT_BITS"),
    ({"QUANT_BITS": "5,x"}, "QUANT_BITS"),
    ({"GPTQ_CLIP_LEVELS": "0.9,0.8"}, "GPTQ_CLIP_LEVELS"),
    ({"SIZE_MARGIN_BYTES": "16000000"}, "SIZE_MARGIN_BYTES"),
    ({"TTT_TEMPERATURE": "0"}, "TTT_TEMPERATURE"),
    ({"EXPORT_RESERVE_SECONDS": "600"}, "EXPORT_RESERVE_SECONDS"),
    ({"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "0"}, "ITERATIONS"),
    ({"NGRAM_EVAL_MIN_ORDER": "1"}, "NGRAM_EVAL_MIN_ORDER"),
    ({"TTT_STEPS": "0"}, "TTT_STEPS"),
])
def test_out_of_range_names_variable(env, var):
    with pytest.raises(tg.GolfError, match=rf"\b{var}\b"):
        tg.Hyperparameters.from_env(env)


def test_validation_accepts_boundaries():
    tg.Hyperparameters.from_env({"XSA_LAST_N": "11", "VE_LAST_N": "11", "TTT_LAST_N": "11"})
    tg.Hyperparameters.from_env({"XSA_LAST_N": "0", "EVAL_STRIDE": "2048", "QUANT_BITS": "5",
                                 "GPTQ_CLIP_LEVELS": "1", "MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "5"})


def test_every_field_has_a_parseable_type():
    for name, f in FIELDS.items():
        assert f.type in (int, float, bool, str), name
        value = getattr(tg.Hyperparameters(), name)
        env = {name.upper(): str(value).lower() if f.type is bool else str(value)}
        assert getattr(tg.Hyperparameters.from_env(env), name) == value, name


# ----------------------------------------------------------------------------------------------------
# Every setting is read (static check)
# ----------------------------------------------------------------------------------------------------

def _names_used(node) -> set:
    """Attribute names and string constants appearing under an AST node (how a setting or a helper of the
    class can be reached: hp.x, getattr(hp, "x"), MODEL_FIELDS strings). Bare names are not reads."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.add(n.value)
    return out


def settings_usage():
    """For each field: is it read by code outside the Hyperparameters class, directly (hp.x, getattr by
    string, MODEL_FIELDS) or through a property/method of the class that is itself used outside it?
    Reads inside validate()/from_env() alone do not count: a knob that is only validated is dead."""
    tree = ast.parse(SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    outside = set()
    for n in tree.body:
        if n is not cls:
            outside |= _names_used(n)
    helpers = {}
    for n in cls.body:
        if isinstance(n, ast.FunctionDef) and n.name not in ("validate", "from_env"):
            helpers[n.name] = _names_used(n)
    used_helpers = {h for h in helpers if h in outside}
    # Helpers may use other helpers (e.g. kv_dim -> head_dim).
    changed = True
    while changed:
        changed = False
        for h in list(used_helpers):
            for other in helpers:
                if other not in used_helpers and other in helpers[h]:
                    used_helpers.add(other)
                    changed = True
    reachable = set().union(outside, *(helpers[h] for h in used_helpers))
    return {name: name in reachable for name in FIELDS}


def test_every_setting_is_read():
    usage = settings_usage()
    dead = sorted(name.upper() for name, used in usage.items() if not used)
    assert not dead, f"settings never read outside Hyperparameters validation: {dead}"


def test_every_setting_appears_outside_its_declaration():
    """The weaker textual form of the check above: each name appears somewhere besides its field line."""
    lines = SOURCE.splitlines()
    for name in FIELDS:
        decl = re.compile(rf"^\s+{name}\s*:\s*\w+\s*=")
        hits = [ln for ln in lines if re.search(rf"\b{name}\b", ln) and not decl.match(ln)]
        assert hits, name


def test_static_check_detects_a_dead_setting():
    """The checker itself: a field read only by validate() is reported dead."""
    global SOURCE
    saved = SOURCE
    try:
        SOURCE = saved.replace("    ngram_audit_positions: int = 64\n",
                               "    ngram_audit_positions: int = 64\n    dead_knob: int = 3\n")
        SOURCE = SOURCE.replace("    def validate(self) -> None:\n",
                                "    def validate(self) -> None:\n        assert self.dead_knob >= 0\n")
        FIELDS["dead_knob"] = None
        usage = settings_usage()
        assert usage["dead_knob"] is False
        assert usage["ngram_audit_positions"] is True
    finally:
        SOURCE = saved
        FIELDS.pop("dead_knob", None)


# ----------------------------------------------------------------------------------------------------
# Documentation names only real settings
# ----------------------------------------------------------------------------------------------------

# Environment variables that are not settings of train_gpt.py but legitimately appear in commands.
NON_SETTINGS = {"PYTHONUNBUFFERED", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NPROC", "NPROC_PER_NODE",
                "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "PATH",
                "PYTHON", "HF_HOME", "HF_TOKEN", "TORCHINDUCTOR_CACHE_DIR", "NCCL_DEBUG",
                "MATCHED_FINEWEB_REPO_ID"}  # the contest downloader's, in README "Data"
ASSIGN = re.compile(r"(?<![\w$-])([A-Z][A-Z0-9_]+)=")


def script_env_reads() -> set:
    """Variables train_gpt.py reads from the environment directly (RANK, WORLD_SIZE, ...)."""
    return set(re.findall(r"os\.environ(?:\.get)?[\[(]\s*[\"']([A-Z0-9_]+)[\"']", SOURCE))


def shell_locals(text: str) -> set:
    """Variables run.sh itself assigns (VAR=..., export/local/readonly VAR=..., for VAR in) and reads with $."""
    assigned = set(re.findall(r"(?:^|[;&|]\s*|\b(?:export|local|readonly|declare)\s+)([A-Za-z_][A-Za-z0-9_]*)=",
                              text, re.M))
    assigned |= set(re.findall(r"\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b", text))
    assigned |= set(re.findall(r"\bread\s+(?:-\w+\s+)*([A-Za-z_][A-Za-z0-9_]*)", text))
    read = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    return assigned & read | (read - set(n.upper() for n in FIELDS))


def doc_files():
    files = [ROOT / "README.md", ROOT / "run.sh"]
    present = [f for f in files if f.is_file()]
    if not present:
        pytest.skip("README.md and run.sh do not exist yet")
    return present


def test_documented_variables_are_settings():
    settings = {n.upper() for n in FIELDS}
    run_sh = ROOT / "run.sh"
    allowed = settings | NON_SETTINGS | script_env_reads()
    if run_sh.is_file():
        allowed |= shell_locals(run_sh.read_text(encoding="utf-8"))
    bad = {}
    for f in doc_files():
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            for var in ASSIGN.findall(line):
                if var not in allowed:
                    bad.setdefault(f"{f.name}:{lineno}", []).append(var)
    assert not bad, f"VAR= names that are not Hyperparameters fields or known non-settings: {bad}"


def test_documented_settings_have_valid_values():
    """Every SETTING=value written in README.md / run.sh (literal values) parses and validates on its own."""
    settings = {n.upper() for n in FIELDS}
    pat = re.compile(r"(?<![\w$-])([A-Z][A-Z0-9_]+)=([^\s$`\"'|;&)]+)(?=[\s;&|)]|$)")
    for f in doc_files():
        for var, value in pat.findall(f.read_text(encoding="utf-8")):
            if var in settings and not value.startswith(("<", "...", "{", "[")):
                try:
                    tg._parse_setting(var, value, FIELDS[var.lower()].type)
                except tg.GolfError as e:
                    pytest.fail(f"{f.name}: {e}")
