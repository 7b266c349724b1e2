"""Data and BPB accounting (README "Data"): byte look-up tables, bits per byte, the shard format, tokenizer
checks and the distributed train loader."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg

V = 1024

# Documents covering every way text turns into pieces: ASCII words, accented Latin (often byte-fallback),
# CJK and emoji (byte-fallback), digits (split_digits), whitespace runs and tabs/newlines (normalized),
# leading/trailing whitespace, NFKC-changed text (ligatures, full width, NBSP, combining marks) and
# documents that normalize to nothing.
DOCUMENTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n",
    "café naïve résumé Ångström façade jalapeño",
    "Zürich, Kraków, São Paulo, İstanbul",
    "日本語のテキスト",
    "中文文本，还有标点。",
    "鬱 龘 𠀀",
    "😀🎉 emoji 👩\u200d💻 and flags 🇫🇷",
    "a 鬱",
    "12345 67.89 3.14159e-10 -42 0x1F",
    "2024-05-20: 1,000,000 tokens",
    "a  b   c    d",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\n\nline five",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n  both  \t\n",
    "   ",
    " ",
    "\n",
    "",
    "x",
    "ﬁ ligature ﬂ",
    "Ｆｕｌｌ ｗｉｄｔｈ",
    "\u00a0non-breaking\u00a0space",
    "e\u0301 combining acute",
    "mixed: Hello, 世界! 👋 1 2 3 — “quotes” … ",
    "▁ a literal lower one eighth block ▁▁",
    "<s> </s> <unk> <pad> look like control pieces",
]


def doc_ids(sp, text: str) -> list:
    return [tg.BOS_ID] + sp.encode(text)


def stream_bytes(ids: list, luts) -> int:
    t = torch.tensor(ids, dtype=torch.int64)
    return int(tg.target_bytes(t[:-1], t[1:], luts).sum())


@pytest.fixture(scope="module")
def luts(sp):
    return tg.build_byte_luts(sp, V)


# ----------------------------------------------------------------------------------------------------
# BPB byte accounting
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", DOCUMENTS, ids=[repr(t)[:30] for t in DOCUMENTS])
def test_target_bytes_equals_decoded_utf8_length(sp, luts, text):
    ids = doc_ids(sp, text)
    decoded = sp.decode(ids[1:])
    assert stream_bytes(ids, luts) == len(decoded.encode("utf-8"))


def test_documents_exercise_byte_fallback_and_leading_space(sp, luts):
    """The document list really covers byte-fallback pieces, "▁" pieces after non-boundaries, digits."""
    all_ids = [i for t in DOCUMENTS for i in sp.encode(t)]
    assert any(sp.is_byte(i) for i in all_ids)
    assert any(bool(luts.has_leading_space[i]) for i in all_ids)
    assert sp.piece_to_id("\u2581") in all_ids  # a bare "▁" (e.g. before a split digit)
    assert any(sp.id_to_piece(i) in "0123456789" for i in all_ids)


def test_multi_document_stream(sp, luts):
    """A stream of several BOS-started documents counts the sum of each document's decoded bytes:
    the leading "▁" of a document's first piece is never charged after BOS."""
    stream, expected = [], 0
    for text in DOCUMENTS:
        ids = doc_ids(sp, text)
        stream += ids
        expected += len(sp.decode(ids[1:]).encode("utf-8"))
    assert expected > 500
    assert stream_bytes(stream, luts) == expected


def test_stream_of_real_documents(sp, luts, corpus):
    """The validation shard of the embedded corpus: per-document decoded lengths sum to the LUT count."""
    tokens = tg.load_data_shard(next((corpus / "datasets" / "fineweb10B_sp1024").glob("fineweb_val_*.bin")))
    tokens = tokens[:20000].tolist()
    bos = [i for i, t in enumerate(tokens) if t == tg.BOS_ID] + [len(tokens)]
    assert bos[0] == 0 and len(bos) >= 3
    expected = sum(len(sp.decode(tokens[a + 1:b]).encode("utf-8")) for a, b in zip(bos, bos[1:]))
    assert stream_bytes(tokens, luts) == expected


def test_leading_space_piece_after_bos_counts_no_space(sp, luts):
    """Hand-built: BOS then "▁the" decodes to "the" (no space); mid-document "▁the" adds " the"."""
    the, a = sp.piece_to_id("\u2581the"), sp.piece_to_id("a")
    assert the != sp.unk_id() and a != sp.unk_id()
    assert stream_bytes([tg.BOS_ID, the], luts) == len(sp.decode([the]).encode()) == 3
    assert stream_bytes([tg.BOS_ID, a, the], luts) == len(sp.decode([a, the]).encode()) == 5


def test_lut_byte_fallback_and_control_pieces(sp, luts):
    n_byte = 0
    for i in range(V):
        if sp.is_byte(i):
            n_byte += 1
            assert int(luts.base_bytes[i]) == 1 and not luts.has_leading_space[i] and not luts.is_boundary[i]
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            assert int(luts.base_bytes[i]) == 0 and luts.is_boundary[i] and not luts.has_leading_space[i]
    assert n_byte == 256
    for special in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert int(luts.base_bytes[special]) == 0 and bool(luts.is_boundary[special])
    assert int(luts.base_bytes[tg.BOS_ID]) == 0


def test_lut_normal_pieces(sp, luts):
    for i in range(V):
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        lead = piece.startswith("\u2581")
        assert bool(luts.has_leading_space[i]) == lead
        assert not luts.is_boundary[i]
        assert int(luts.base_bytes[i]) == len((piece[1:] if lead else piece).encode("utf-8"))
    space = sp.piece_to_id("\u2581")
    assert int(luts.base_bytes[space]) == 0 and bool(luts.has_leading_space[space])


def test_target_bytes_rule_on_synthetic_luts():
    luts = tg.ByteLUTs(base_bytes=torch.tensor([0, 3, 2, 1], dtype=torch.int16),
                       has_leading_space=torch.tensor([False, True, False, True]),
                       is_boundary=torch.tensor([True, False, False, False]))
    prev = torch.tensor([0, 2, 0, 3, 1, 2])
    tgt = torch.tensor([1, 1, 3, 3, 2, 0])
    assert tg.target_bytes(prev, tgt, luts).tolist() == [3, 4, 1, 2, 2, 0]
    assert tg.target_bytes(prev, tgt, luts).dtype == torch.int64


def test_bits_per_byte_formula():
    assert tg.bits_per_byte(math.log(2.0) * 10, 10) == pytest.approx(1.0, rel=1e-15)
    assert math.isnan(tg.bits_per_byte(1.0, 0))  # a chunk whose targets are all BOS: no bytes, no rate
    assert tg.bits_per_byte(123.456, 78.9) == pytest.approx(123.456 / math.log(2) / 78.9, rel=1e-15)
    # Uniform over 256 byte values: 8 bits per byte.
    n = 1000
    assert tg.bits_per_byte(n * math.log(256.0), n) == pytest.approx(8.0, rel=1e-12)


def test_tokenizer_has_space_piece(sp):
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    assert sp.vocab_size() == V and sp.bos_id() == tg.BOS_ID


# ----------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------

def write_shard(path: Path, tokens, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, n=None, extra=b""):
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = magic, version
    header[2] = len(tokens) if n is None else n
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + extra)
    return path


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 0, 65535, 1023, 7, 300, 1, 2], dtype=np.uint16)
    p = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert p.stat().st_size == 1024 + 2 * len(tokens)
    out = tg.load_data_shard(p)
    assert out.dtype == torch.int32
    assert out.tolist() == tokens.astype(np.int64).tolist()


def test_shard_header_is_little_endian(tmp_path):
    """Write the header bytes explicitly little-endian with struct; big-endian must be rejected."""
    import struct
    toks = [5, 6, 7]
    good = struct.pack("<256i", tg.SHARD_MAGIC, 1, 3, *([0] * 253)) + struct.pack("<3H", *toks)
    (tmp_path / "le.bin").write_bytes(good)
    assert tg.load_data_shard(tmp_path / "le.bin").tolist() == toks
    bad = struct.pack(">256i", tg.SHARD_MAGIC, 1, 3, *([0] * 253)) + struct.pack(">3H", *toks)
    (tmp_path / "be.bin").write_bytes(bad)
    with pytest.raises(tg.GolfError, match="be.bin"):
        tg.load_data_shard(tmp_path / "be.bin")


def test_empty_shard(tmp_path):
    p = write_shard(tmp_path / "empty.bin", [])
    assert tg.load_data_shard(p).numel() == 0


@pytest.mark.parametrize("case", ["magic", "version", "truncated", "short_header", "trailing", "empty_file"])
def test_bad_shard_rejected_naming_file(tmp_path, case):
    tokens = list(range(100))
    p = tmp_path / f"bad_{case}.bin"
    if case == "magic":
        write_shard(p, tokens, magic=20240521)
    elif case == "version":
        write_shard(p, tokens, version=2)
    elif case == "truncated":
        write_shard(p, tokens, n=101)
    elif case == "short_header":
        p.write_bytes(np.array([tg.SHARD_MAGIC, 1, 0], dtype="<i4").tobytes())
    elif case == "trailing":
        write_shard(p, tokens, extra=b"\x00\x01")
    else:
        p.write_bytes(b"")
    with pytest.raises(tg.GolfError) as e:
        tg.load_data_shard(p)
    assert str(p) in str(e.value)


def test_shard_files_sorted_and_missing(tmp_path):
    for name in ("fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin",
                 "fineweb_val_000000.bin"):
        write_shard(tmp_path / name, [1, 2])
    files = tg.shard_files(str(tmp_path), "train")
    assert [f.name for f in files] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                       "fineweb_train_000002.bin"]
    assert [f.name for f in tg.shard_files(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(tg.GolfError, match="DATA_PATH"):
        tg.shard_files(str(empty), "train")
    with pytest.raises(tg.GolfError, match="DATA_PATH"):
        tg.shard_files(str(tmp_path / "does_not_exist"), "val")


def test_check_token_range():
    tg.check_token_range(torch.tensor([0, 5, 1023]), V, "x")
    with pytest.raises(tg.GolfError, match=r"VOCAB_SIZE") as e:
        tg.check_token_range(torch.tensor([0, 1024, 3]), V, "train shards")
    assert "1024" in str(e.value)


def test_validation_tokens_out_of_range(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3, 2000])
    with pytest.raises(tg.GolfError, match="VOCAB_SIZE"):
        tg.load_validation_tokens(str(tmp_path), V)
    assert tg.load_validation_tokens(str(tmp_path), 4096).tolist() == [1, 2, 3, 2000]


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

def test_load_tokenizer_errors(corpus, tmp_path):
    model = str(corpus / "tokenizers" / "fineweb_1024_bpe.model")
    with pytest.raises(tg.GolfError, match="VOCAB_SIZE"):
        tg.load_tokenizer(model, 512)
    with pytest.raises(tg.GolfError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), V)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model\n" * 20)
    with pytest.raises(tg.GolfError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(garbage), V)
    with pytest.raises(tg.GolfError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path), V)  # a directory


# ----------------------------------------------------------------------------------------------------
# Train loader
# ----------------------------------------------------------------------------------------------------

SHARD_LENGTHS = (1000, 37, 2500)  # uneven, one shorter than a micro-batch: takes cross shard boundaries


@pytest.fixture
def train_dir(tmp_path):
    rng = np.random.default_rng(0)
    stream = []
    for i, n in enumerate(SHARD_LENGTHS):
        toks = rng.integers(0, V, size=n)
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", toks)
        stream.append(toks)
    return tmp_path, np.concatenate(stream)


def test_token_stream_reads_in_order_and_wraps(train_dir):
    path, stream = train_dir
    ts = tg.TokenStream(str(path))
    total = len(stream)
    got = torch.cat([ts.take(n) for n in (10, 990, 1, 36, 100, 2400, 500, 3000)]).numpy()
    expected = np.concatenate([stream, stream, stream])[:len(got)]
    assert len(got) == 10 + 990 + 1 + 36 + 100 + 2400 + 500 + 3000 > total
    np.testing.assert_array_equal(got, expected)


def global_step_batches(path, world_size, batch_tokens, seq_len, steps):
    """What every rank sees over `steps` optimizer steps, as Trainer.step drives the loader."""
    accum = 8 // world_size
    loaders = [tg.DistributedTokenLoader(str(path), tg.Dist(rank=r, world_size=world_size))
               for r in range(world_size)]
    seqs, raw = [], []
    for _ in range(steps * accum):
        micro = batch_tokens // accum
        outs = [ld.next_batch(micro, seq_len) for ld in loaders]
        tokens0 = outs[0][2]
        assert tokens0.shape == (micro + 1,)  # the micro-batch plus the token after it
        n = micro // world_size
        for r, (x, y, tokens) in enumerate(outs):
            assert torch.equal(tokens, tokens0)  # every rank reads the same global micro-batch
            assert x.dtype == torch.int64 and y.dtype == torch.int64
            assert x.shape == y.shape == (batch_tokens // 8 // seq_len, seq_len)
            assert torch.equal(x.reshape(-1), tokens[r * n:(r + 1) * n])  # rank slices are contiguous
            assert torch.equal(y.reshape(-1), tokens[r * n + 1:(r + 1) * n + 1])  # y is x shifted by one
            seqs += [(xi, yi) for xi, yi in zip(x, y)]
        raw.append(tokens0[:-1])
    return seqs, torch.cat(raw)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_loader_rank_slices_partition_the_stream(train_dir, world_size):
    path, stream = train_dir
    seqs, raw = global_step_batches(path, world_size, batch_tokens=8 * 16 * 2, seq_len=16, steps=3)
    # The inputs of consecutive micro-batches tile the stream with no gap and no overlap.
    expected = np.concatenate([stream] * 3)[:raw.numel()]
    np.testing.assert_array_equal(raw.numpy(), expected)


def test_global_batch_independent_of_world_size(train_dir):
    path, _ = train_dir
    ref, ref_raw = global_step_batches(path, 1, batch_tokens=8 * 16 * 2, seq_len=16, steps=3)
    for w in (2, 4, 8):
        seqs, raw = global_step_batches(path, w, batch_tokens=8 * 16 * 2, seq_len=16, steps=3)
        assert torch.equal(raw, ref_raw)
        assert len(seqs) == len(ref) == 3 * 8 * 2
        for (x, y), (rx, ry) in zip(seqs, ref):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_startup_check_rejects_out_of_range_tokens_naming_the_shard(tmp_path):
    """Every train shard's ids are checked once, at start-up (check_train_shards), the later ones included; the
    loader does not scan them again."""
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3] * 100)
    write_shard(tmp_path / "fineweb_train_000001.bin", [4] * 50 + [1500])
    assert tg.check_train_shards(str(tmp_path), 1501, tg.Dist()) == 351
    with pytest.raises(tg.GolfError, match="VOCAB_SIZE") as err:
        tg.check_train_shards(str(tmp_path), V, tg.Dist())
    assert "fineweb_train_000001.bin" in str(err.value) and "1500" in str(err.value)


def test_token_stream_single_short_shard_wraps_within_one_take(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", list(range(37)))
    ts = tg.TokenStream(str(tmp_path))
    assert ts.take(100).tolist() == (list(range(37)) * 3)[:100]
    assert ts.take(5).tolist() == [26, 27, 28, 29, 30]


def test_next_shard_is_read_in_the_background_and_the_stream_is_unchanged(train_dir, monkeypatch):
    """Only the first shard is read on the caller's thread; every later one is read (and checked) by the
    prefetch thread while the previous one is consumed. The tokens are exactly the shards in order."""
    import threading
    path, stream = train_dir
    readers = []
    load = tg.TokenStream._load

    def spy(self, i):
        readers.append((i, threading.current_thread() is threading.main_thread()))
        return load(self, i)
    monkeypatch.setattr(tg.TokenStream, "_load", spy)
    ts = tg.TokenStream(str(path))
    got = torch.cat([ts.take(n) for n in (999, 2, 36, 2500, 1, 3000)]).numpy()
    np.testing.assert_array_equal(got, np.concatenate([stream] * 3)[:len(got)])
    assert readers[0] == (0, True) and len(readers) >= 5
    assert all(not main for _, main in readers[1:])
    assert [i for i, _ in readers[:6]] == [0, 1, 2, 0, 1, 2]  # in order, wrapping around


# ----------------------------------------------------------------------------------------------------
# Embedded corpus (tools/embedded_corpus.py): sizes are ranges, since the text varies with the installed
# Python and package versions
# ----------------------------------------------------------------------------------------------------

def embedded_corpus_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("embedded_corpus", Path(tg.__file__).parent / "tools" / "embedded_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_corpus_manifest_and_shards(corpus):
    """Sizes in range (a CPU run of ~4-5M tokens reads the train split about once), shards match the
    manifest, every split is whole BOS-started documents, and heldout2 is a DATA_PATH of its own."""
    import json
    m = json.loads((corpus / "MANIFEST.json").read_text())
    s = m["splits"]
    assert 2_000_000 <= s["train"]["tokens"] <= 20_000_000
    assert 5_000_000 <= s["train"]["text_bytes"] + s["val"]["text_bytes"] <= 20_000_000
    assert 20_000 <= s["val"]["tokens"] <= 0.05 * s["train"]["tokens"] and s["val"]["documents"] >= 10
    assert 20_000 <= s["heldout2"]["tokens"] and s["heldout2"]["documents"] >= 5
    assert len({split["text_sha256"] for split in s.values()}) == 3
    data = corpus / "datasets" / "fineweb10B_sp1024"
    counts = {"train": sum(tg.check_shard(p) for p in tg.shard_files(str(data), "train")),
              "val": tg.check_shard(data / "fineweb_val_000000.bin"),
              "heldout2": tg.check_shard(corpus / "datasets" / "heldout2" / "fineweb_val_000000.bin")}
    assert counts == {name: split["tokens"] for name, split in s.items()}
    for name, path in (("val", data), ("heldout2", corpus / "datasets" / "heldout2")):
        tokens = tg.load_validation_tokens(str(path), V)
        assert tokens[0] == tg.BOS_ID and int((tokens == tg.BOS_ID).sum()) == s[name]["documents"]
    assert not list((corpus / "datasets" / "heldout2").glob("fineweb_train_*"))  # EVAL_ONLY use only


def test_embedded_corpus_dedup_and_split_by_content():
    """Each docstring is kept once (first occurrence); the split depends on a document's text, not on its
    position; the held-out package never reaches train or val."""
    ec = embedded_corpus_module()
    docs = ec.deduplicate([("stdlib", "a", ["x", "y"]), ("numpy", "b", ["y", "x"]), ("torch", "c", ["z", "x"])])
    assert docs == [("stdlib", "a", "x\n\ny"), ("torch", "c", "z")]
    many = [("stdlib" if i % 3 else ec.HELDOUT_PACKAGE, f"t{i}", f"document number {i}") for i in range(3000)]
    splits = ec.split_documents(many)
    reverse = ec.split_documents(many[::-1])
    assert {k: sorted(v) for k, v in splits.items()} == {k: sorted(v) for k, v in reverse.items()}
    assert len(splits["val"]) > 0 and len(splits["heldout2"]) > 0
    held = {title for source, title, _ in many if source == ec.HELDOUT_PACKAGE}
    assert len(held) == 1000 and not held & {title for title, _ in splits["train"] + splits["val"]}
    assert {title for title, _ in splits["heldout2"]} <= held
    assert 0.01 < len(splits["val"]) / 2000 < 0.03  # VAL_PER_MILLE = 20 of the non-held-out documents
