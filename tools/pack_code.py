"""Write the submitted form of train_gpt.py: one self-extracting file that decodes the compressed source and
runs it (LZMA + base85, the convention the contest's top records use and its reviewers accept: PR #1285,
PR #1394). The readable train_gpt.py stays the source of truth; a run started from the packed file counts
the packed file's bytes against the cap, logs both sizes and embeds the readable source in its log.

    python3 tools/pack_code.py [--src train_gpt.py] [--out build/train_gpt.py]
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402  (importing it does nothing)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "train_gpt.py")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "train_gpt.py")
    args = ap.parse_args(argv)
    source = args.src.read_bytes()
    packed = tg.pack_source(source)
    if tg.unpack_source(packed) != source:
        raise SystemExit("pack_code: the packed file does not decode to the source")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tg.write_atomic(args.out, packed)
    print(f"pack_code: {args.src} ({len(source)} bytes) -> {args.out} ({len(packed)} bytes, "
          f"{len(packed) / len(source):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
