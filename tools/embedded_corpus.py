"""Build the "embedded corpus": English technical text that every install of this project already carries.

Lets the training script run end to end on a machine with no dataset. Sources, in a fixed order: pydoc's
topic help, then the docstrings of the standard library and of the installed requirements numpy, torch
and matplotlib, read from their source files with `ast` (no imports: fast, no side effects, and the text
depends only on the installed versions). One document per topic or source file; every docstring is kept
once (exact duplicates removed, first occurrence wins); documents are never cut.

Splits (by a hash of each document's text, not by its position, so adding a package moves no other
document): ~2% of the documents are the validation split, the rest train. Within each split the documents
are ordered by a second hash of their text (fixed, the same for every build from the same sources), so that
every prefix of the training stream samples every source, as FineWeb's pre-shuffled stream does; in source
order a run shorter than an epoch would never see the later sources that the validation split holds. matplotlib is held out
entirely: a hash-chosen sample of its documents is a second held-out text ("heldout2", another package
that neither the model nor the tokenizer ever sees), for checking that conclusions drawn on the
validation split carry over. The SentencePiece BPE tokenizer is trained on the train split only.

    python3 tools/embedded_corpus.py --out data/embedded [--vocab-size 1024] [--force]

Writes, atomically (built in a temporary directory next to --out, then renamed into place):
  datasets/fineweb10B_sp{V}/fineweb_train_00000{0,1}.bin, fineweb_val_000000.bin
  datasets/heldout2/fineweb_val_000000.bin       (score it with DATA_PATH=<that dir> EVAL_ONLY=...)
  tokenizers/fineweb_{V}_bpe.model, .vocab; MANIFEST.json (sources, versions, split statistics)
"""
import argparse, ast, contextlib, hashlib, importlib.util, io, json, os, shutil, sys, sysconfig
import tempfile, time, warnings

import numpy as np
import sentencepiece as spm

PACKAGES = ("numpy", "torch")        # requirements whose docstrings are training/validation text
HELDOUT_PACKAGE = "matplotlib"      # held out entirely; a sample of it is the second held-out text
VAL_PER_MILLE = 20                  # share of documents (by text hash) in the validation split
HELDOUT2_PER_MILLE = 90            # share of the held-out package's documents written as heldout2
# Standard-library parts that are not prose about Python (codec tables, vendored tools, GUI demos, the
# test suite) or whose text is already used (pydoc_data = the topics).
STDLIB_SKIP = {"idlelib", "tkinter", "lib2to3", "distutils", "encodings", "ensurepip", "pydoc_data",
               "turtledemo", "site-packages", "dist-packages", "lib-dynload", "venv"}
SHARD_MAGIC, SHARD_VERSION = 20240520, 1


def source_files(root, skip=()):
    """Sorted .py files under root, leaving out test suites and the names in skip."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place so the walk order (and with it first-occurrence deduplication) is fixed.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "test")) and d != "__pycache__" and d not in skip)
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.endswith(".py") and not f.startswith("test") and f[:-3] not in skip]
    return found


def file_docstrings(path):
    """Docstrings of the module and of every class and function in it, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(open(path, "rb").read())
    except (SyntaxError, ValueError):
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = [ast.get_docstring(n) for n in [tree] + sorted(nodes, key=lambda n: n.lineno)]
    return [d.strip() for d in docs if d and d.strip()]


def collect_documents():
    """[(source, title, [docstrings])] in a fixed order: topics, stdlib, PACKAGES, HELDOUT_PACKAGE."""
    from pydoc_data.topics import topics
    docs = [("pydoc", f"topic:{k}", [topics[k].strip()]) for k in sorted(topics) if topics[k].strip()]
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in source_files(stdlib, STDLIB_SKIP):
        docs.append(("stdlib", os.path.relpath(path, stdlib), file_docstrings(path)))
    for package in PACKAGES + (HELDOUT_PACKAGE,):
        root = os.path.dirname(importlib.util.find_spec(package).origin)
        for path in source_files(root):
            docs.append((package, f"{package}:{os.path.relpath(path, root)}", file_docstrings(path)))
    return docs


def deduplicate(docs):
    """Keep each docstring at its first occurrence; drop documents left empty. -> [(source, title, text)]"""
    seen, out = set(), []
    for source, title, parts in docs:
        kept = [p for p in parts if p not in seen]
        seen.update(kept)
        if kept:
            out.append((source, title, "\n\n".join(kept)))
    return out


def bucket(text):
    """A per-mille bucket from the sha256 of the document's text: the split does not depend on order."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 1000


def shuffle_key(text):
    """The document's place in its split: a hash of its text independent of `bucket` (salted)."""
    return hashlib.sha256(b"order\0" + text.encode()).digest()


def split_documents(docs):
    """-> {"train", "val", "heldout2"}: lists of (title, text), each in `shuffle_key` order."""
    splits = {"train": [], "val": [], "heldout2": []}
    for source, title, text in docs:
        if source == HELDOUT_PACKAGE:
            if bucket(text) < HELDOUT2_PER_MILLE:
                splits["heldout2"].append((title, text))
        else:
            splits["val" if bucket(text) < VAL_PER_MILLE else "train"].append((title, text))
    return {name: sorted(docs, key=lambda doc: shuffle_key(doc[1])) for name, docs in splits.items()}


def train_tokenizer(train_docs, vocab_size):
    """Train the BPE model with the contest's settings; ensure "▁" is a piece of its own.

    Returns (processor, model bytes). The model is trained into memory because a
    model_prefix would be recorded in the model file and make its bytes path dependent.
    """
    def lines():
        for _, text in train_docs:
            yield from (line for line in text.splitlines() if line.strip())

    def train(**extra):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1,
            eos_id=2, unk_id=3, character_coverage=0.9995, num_threads=2,
            input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2, **extra)
        return spm.SentencePieceProcessor(model_proto=model.getvalue()), model.getvalue()

    sp, model = train()
    if sp.piece_to_id("▁") != sp.unk_id():
        print('tokenizer: "▁" is naturally a piece')
        return sp, model
    print('tokenizer: "▁" missing; retraining with user_defined_symbols=["▁"]')
    return train(user_defined_symbols=["▁"])


def vocab_text(sp):
    """The .vocab file spm_train writes: "piece<TAB>score" per line (C++ %g formatting)."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(len(sp)))


def encode(sp, docs):
    """Each document becomes [BOS] + tokens (no EOS); documents are concatenated."""
    ids = sp.encode([text for _, text in docs])
    return [np.array([sp.bos_id()] + x, dtype="<u2") for x in ids]


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes() + tokens.astype("<u2").tobytes())


def versions():
    """What the corpus depends on: this builder's code and the Python and package versions it reads."""
    from importlib.metadata import version
    with open(__file__, "rb") as f:
        builder = hashlib.sha256(f.read()).hexdigest()
    return {"builder_sha256": builder, "python": sys.version,
            **{p: version(p) for p in PACKAGES + (HELDOUT_PACKAGE,)}}


def is_up_to_date(out, vocab_size):
    try:
        with open(os.path.join(out, "MANIFEST.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return (m.get("versions") == versions() and m.get("vocab_size") == vocab_size
            and all(os.path.isfile(os.path.join(out, p)) for p in m.get("files", [])))


def write_corpus(tmp, vocab_size, splits):
    """Tokenizer, shards and manifest into the directory tmp; returns the manifest."""
    data_dir, tok = f"datasets/fineweb10B_sp{vocab_size}", f"tokenizers/fineweb_{vocab_size}_bpe"
    with contextlib.redirect_stdout(io.StringIO()) as said:
        sp, model = train_tokenizer(splits["train"], vocab_size)
    os.makedirs(os.path.join(tmp, "tokenizers"))
    for path, data in ((tok + ".model", model), (tok + ".vocab", vocab_text(sp).encode())):
        with open(os.path.join(tmp, path), "wb") as f:
            f.write(data)
    ids = {name: encode(sp, docs) for name, docs in splits.items()}
    # Two train shards (split at a document boundary) to exercise multi-shard reading.
    half = len(ids["train"]) // 2
    shards = {f"{data_dir}/fineweb_train_000000.bin": ids["train"][:half],
              f"{data_dir}/fineweb_train_000001.bin": ids["train"][half:],
              f"{data_dir}/fineweb_val_000000.bin": ids["val"],
              "datasets/heldout2/fineweb_val_000000.bin": ids["heldout2"]}
    for path, parts in shards.items():
        write_shard(os.path.join(tmp, path), np.concatenate(parts))
    stats = {name: {"documents": len(docs), "tokens": sum(map(len, ids[name])),
                    "text_bytes": sum(len(t.encode()) for _, t in docs),
                    "text_sha256": hashlib.sha256("\0".join(t for _, t in docs).encode()).hexdigest()}
             for name, docs in splits.items()}
    return {"versions": versions(), "vocab_size": vocab_size, "tokenizer": said.getvalue().strip(),
            "sources": {"train_val": ["pydoc_data.topics", "stdlib", *PACKAGES], "heldout2": HELDOUT_PACKAGE},
            "val_per_mille": VAL_PER_MILLE, "heldout2_per_mille": HELDOUT2_PER_MILLE, "splits": stats,
            "files": list(shards) + [tok + ".model", tok + ".vocab"]}


def build(out, vocab_size):
    t0 = time.time()
    docs = deduplicate(collect_documents())
    t_read = time.time() - t0
    splits = split_documents(docs)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".embedded_tmp_", dir=os.path.dirname(out))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the corpus is ordinary data
    try:
        manifest = write_corpus(tmp, vocab_size, splits)
        with open(os.path.join(tmp, "MANIFEST.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        # The old corpus is moved aside, not deleted first, so a reader never sees a half-written one.
        old = tmp + ".old"
        if os.path.exists(out):
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"embedded corpus: {manifest['tokenizer']}")
    for name, s in manifest["splits"].items():
        print(f"embedded corpus: {name}: {s['documents']} docs, {s['tokens']:,} tokens, "
              f"{s['text_bytes']:,} text bytes")
    print(f"embedded corpus: written to {out} in {time.time() - t0:.1f}s (reading sources {t_read:.1f}s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/embedded")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args()
    if args.vocab_size > 65536:
        ap.error("token ids are stored as uint16; --vocab-size must be <= 65536")
    if not args.force and is_up_to_date(args.out, args.vocab_size):
        print("embedded corpus: up to date")
        return
    build(args.out, args.vocab_size)


if __name__ == "__main__":
    main()
