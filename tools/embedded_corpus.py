"""Build a small "embedded smoke corpus" from English text that ships with CPython.

Lets the training script run end to end on a machine with no dataset: the text is
pydoc's topic help plus standard-library docstrings, tokenized with a SentencePiece
BPE model trained on the train split, and written as shards in the official format.

    python3 tools/embedded_corpus.py --out data/embedded [--vocab-size 1024] [--force]
"""
import argparse, contextlib, hashlib, importlib, inspect, io, json, os, sys, sysconfig
import time, warnings

import numpy as np
import sentencepiece as spm

MAX_TEXT_BYTES = 2_000_000  # stop adding modules once the corpus reaches ~2 MB
# Modules with import side effects (browser, printing, GUI, cache files; also turtle*),
# modules whose content depends on what else is installed (distutils may be setuptools'
# copy), and repetitive or already-used text (codec boilerplate, pydoc_data = topics).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "lib2to3", "distutils", "encodings",
        "ensurepip", "pydoc_data"}
SHARD_MAGIC, SHARD_VERSION = 20240520, 1


def stdlib_module_names():
    """Sorted dotted names of the pure-Python stdlib modules (top level and packages)."""
    root, names = sysconfig.get_paths()["stdlib"], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        # Only descend into real packages; this also excludes site-packages, lib-dynload.
        if parts and not os.path.isfile(os.path.join(dirpath, "__init__.py")):
            dirnames.clear()
            continue
        for f in filenames:
            if f.endswith(".py"):
                mod = parts + ([] if f == "__init__.py" else [f[:-3]])
                if mod and not any(p.startswith(("_", "test")) or p in SKIP for p in mod) \
                        and not mod[0].startswith("turtle"):
                    names.append(".".join(mod))
    return sorted(names)


def module_document(name):
    """Module docstring + docstrings of its public classes, functions and methods."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(name)
        except (Exception, SystemExit):  # missing C extension, wrong platform, ...
            return ""
    docs = [inspect.getdoc(mod)]
    for key, obj in sorted(vars(mod).items()):
        # Only objects defined here, so re-exports are not repeated in every importer.
        if key.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            docs += [inspect.getdoc(m) for k, m in sorted(vars(obj).items())
                     if not k.startswith("_") and inspect.isroutine(m)]
    # getdoc inherits base-class docstrings; keep each distinct text once per document.
    unique = dict.fromkeys(d.strip() for d in docs if d and d.strip())
    return "\n\n".join(unique).strip()


def collect_documents():
    """[(title, text)] in a fixed order: all pydoc topics, then modules up to the cap."""
    from pydoc_data.topics import topics
    docs = [(f"topic:{k}", topics[k].strip()) for k in sorted(topics) if topics[k].strip()]
    total = sum(len(t.encode()) for _, t in docs)
    for name in stdlib_module_names():
        if total >= MAX_TEXT_BYTES:
            break
        text = module_document(name)
        if text:
            docs.append((f"module:{name}", text))
            total += len(text.encode())
    return docs


def split_documents(docs):
    """Every 10th document in sha256(title) order goes to val; top up val to >= 5% of text."""
    order = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    is_val = [i % 10 == 0 for i in range(len(order))]
    size = [len(t.encode()) for _, t in order]
    for i in range(len(order)):  # only matters if the 10% of docs happen to be short
        if sum(s for s, v in zip(size, is_val) if v) >= 0.05 * sum(size):
            break
        is_val[i] = True
    return ([d for d, v in zip(order, is_val) if not v], [d for d, v in zip(order, is_val) if v])


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


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    write_atomic(path, header.tobytes() + tokens.astype("<u2").tobytes())


def is_up_to_date(out, vocab_size):
    try:
        with open(os.path.join(out, "MANIFEST.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return (m.get("python_version") == sys.version and m.get("vocab_size") == vocab_size
            and all(os.path.isfile(os.path.join(out, p)) for p in m.get("files", [])))


def build(out, vocab_size):
    t0 = time.time()
    data_dir, tok = f"datasets/fineweb10B_sp{vocab_size}", f"tokenizers/fineweb_{vocab_size}_bpe"
    for d in (data_dir, "tokenizers"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    # The manifest marks completeness, so drop any old one before touching other files.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "MANIFEST.json"))

    train_docs, val_docs = split_documents(collect_documents())
    sp, model = train_tokenizer(train_docs, vocab_size)
    write_atomic(os.path.join(out, tok + ".model"), model)
    write_atomic(os.path.join(out, tok + ".vocab"), vocab_text(sp).encode())

    # Two train shards (split at a document boundary) to exercise multi-shard reading.
    train_ids, val_ids, half = encode(sp, train_docs), encode(sp, val_docs), len(train_docs) // 2
    shards = {f"{data_dir}/fineweb_train_000000.bin": np.concatenate(train_ids[:half]),
              f"{data_dir}/fineweb_train_000001.bin": np.concatenate(train_ids[half:]),
              f"{data_dir}/fineweb_val_000000.bin": np.concatenate(val_ids)}
    for path, tokens in shards.items():
        write_shard(os.path.join(out, path), tokens)

    stats = {name: {"documents": len(docs), "tokens": sum(map(len, ids)),
                    "text_bytes": sum(len(t.encode()) for _, t in docs),
                    "text_sha256": hashlib.sha256("\0".join(t for _, t in docs).encode()).hexdigest()}
             for name, docs, ids in (("train", train_docs, train_ids), ("val", val_docs, val_ids))}
    manifest = {"python_version": sys.version, "vocab_size": vocab_size, "splits": stats,
                "files": list(shards) + [tok + ".model", tok + ".vocab"]}
    write_atomic(os.path.join(out, "MANIFEST.json"), json.dumps(manifest, indent=2).encode())
    for name, s in stats.items():
        print(f"embedded corpus: {name}: {s['documents']} docs, {s['tokens']:,} tokens, "
              f"{s['text_bytes']:,} text bytes")
    print(f"embedded corpus: written to {out} in {time.time() - t0:.1f}s")


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
