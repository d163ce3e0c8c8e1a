"""Build the demo model's corpus: public-domain English prose, a sentencepiece tokenizer,
and uint16 token files.

Sources (offline, from Debian; both texts are in the public domain):
  * Jane Austen's six novels, from the R data package of r-cran-janeaustenr
    (Emma, Mansfield Park, Northanger Abbey, Persuasion, Pride and Prejudice,
    Sense and Sensibility). Its lazy-load database data/Rdata.{rdx,rdb} is read with the
    PyPI package `rdata` (no R needed at run time).
  * The King James Bible, from bible-kjv-text, dumped as text by the `bible` program of
    bible-kjv.

Getting them (Debian 12):
    apt-get update && apt-get install --no-install-recommends r-cran-janeaustenr bible-kjv
    python3 -m venv /tmp/dataprep && /tmp/dataprep/bin/pip install rdata sentencepiece numpy
    /tmp/dataprep/bin/python scripts/prepare_demo_data.py            # -> .demo_data/
(Without R installed, `apt-get download r-cran-janeaustenr && dpkg -x <deb> /tmp/ja` and
pass --janeaustenr /tmp/ja/usr/lib/R/site-library/janeaustenr.)

Cleaning. A *document* is one chapter; its text is a heading line ("Chapter 12",
"Genesis 3") followed by one line per paragraph (Austen) or per verse (KJV):
  * Austen: hard-wrapped lines are joined into paragraphs; front matter, volume headings,
    scene-break asterisks, bracketed editorial notes ("[End volume one of this edition...")
    and the modern "A NOTE ON THE TEXT" appendix are dropped; the _underscore_ italics
    markers are removed; chapters are renumbered 1..n per novel (the source mixes roman
    numerals, arabic numerals and per-volume restarts).
  * KJV: verse numbers are dropped (the verse boundary survives as the line break);
    wrapped lines are joined.
  * Everywhere: runs of spaces collapse to one; no other normalisation (the text is kept
    byte-exact, curly quotes and '--' dashes included).

Split. Chapters are listed in a fixed order (the six novels alphabetically, then the Bible
in canonical order, 269 + 1189 chapters); every 20th one (index % 20 == 19) is validation,
so validation is whole chapters from all books. tests/data/demo_heldout.txt is the start
of the first Austen and the first KJV validation chapter (about 4 KB).

Tokenizer. sentencepiece BPE, 8192 pieces, trained on the training chapters only:
byte_fallback (every UTF-8 string round-trips), identity normalisation, no dummy prefix and
no whitespace squeezing (so decode(encode(s)) == s), '\\n' as its own piece, digits split;
ids: <unk> 0, <s> (bos) 1, </s> (eos) 2, no pad.

Token files. Each chapter becomes [bos] + encode(text) + [eos]; the chapters are
concatenated into train.bin / val.bin (uint16, little-endian, no header).
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm

REPO = Path(__file__).resolve().parent.parent
JANEAUSTENR = Path("/usr/lib/R/site-library/janeaustenr")
VAL_EVERY = 20          # chapter i is validation iff i % VAL_EVERY == VAL_EVERY - 1
VOCAB_SIZE = 8192
BOS_ID, EOS_ID = 1, 2

CHAPTER_RE = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
VOLUME_RE = re.compile(r"^\s*volume\s+[ivxlc\d]+\s*$", re.IGNORECASE)
STARS_RE = re.compile(r"^[\s*]+$")
SPACES_RE = re.compile(r"[ \t]+")


# ----------------------------------------------------------------------------- Austen

def read_rdata_lazyload(pkg_dir: Path) -> dict[str, list[str]]:
    """R lazy-load data (data/Rdata.rdx index + Rdata.rdb blobs) -> {name: character vector}.

    The .rdx is a gzipped serialised list whose `variables` maps each object name to
    (offset, length) in the .rdb; each blob is a 4-byte big-endian size + zlib stream of a
    serialised R object.
    """
    import rdata  # only data preparation needs it

    def unserialize(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw))

    data = pkg_dir / "data"
    index = unserialize(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    blob = (data / "Rdata.rdb").read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        chunk = blob[off:off + length]
        raw = zlib.decompress(chunk[4:])
        assert len(raw) == int.from_bytes(chunk[:4], "big"), name
        out[str(name)] = [str(s) for s in unserialize(raw)]
    return out


def austen_chapters(lines: list[str]) -> list[list[str]]:
    """A novel's lines -> chapters, each a list of cleaned paragraphs (heading excluded)."""
    chapters: list[list[str]] = []
    para: list[str] = []

    def flush():
        text = SPACES_RE.sub(" ", " ".join(para)).strip().replace("_", "")
        para.clear()
        if not chapters or not text or STARS_RE.match(text):
            return                    # front matter, blank, scene break
        if text.startswith("[") and text.endswith("]"):
            return                    # editorial note
        chapters[-1].append(text)

    for line in lines:
        if line.strip() == "A NOTE ON THE TEXT":      # modern appendix (Northanger Abbey)
            break
        if CHAPTER_RE.match(line):
            flush()
            chapters.append([])
        elif not line.strip() or VOLUME_RE.match(line):
            flush()
        elif line.startswith("*Vide"):               # a footnote's text
            continue
        else:
            para.append(line.strip())
    flush()
    return [c for c in chapters if c]


# ----------------------------------------------------------------------------- KJV

def kjv_chapters(bible_cmd: str = "bible") -> list[tuple[str, list[str]]]:
    """The whole KJV via bible-kjv's `bible` program -> [(heading, verses)].

    Its output: a blank line, a heading "Book N", then verses "  <n> text" hard-wrapped
    at 79 columns with unindented continuation lines.
    """
    out = subprocess.run([bible_cmd, "-l79", "Gen1:1-Rev22:21"], check=True,
                         capture_output=True, text=True).stdout
    chapters: list[tuple[str, list[str]]] = []
    prev_blank = True
    for line in out.splitlines():
        verse = re.match(r"^\s+(\d+) (.*)$", line)
        if not line.strip():
            prev_blank = True
            continue
        if prev_blank and not verse:
            chapters.append((line.strip(), []))
        elif verse:
            chapters[-1][1].append(verse.group(2).strip())
        else:
            chapters[-1][1][-1] += " " + line.strip()
        prev_blank = False
    assert len(chapters) == 1189, f"expected 1189 KJV chapters, parsed {len(chapters)}"
    return [(h, [SPACES_RE.sub(" ", v) for v in vs]) for h, vs in chapters]


# ----------------------------------------------------------------------------- main

def build_documents(janeaustenr: Path, bible_cmd: str) -> list[tuple[str, str]]:
    """-> [(source, chapter text)] in the fixed order the split is defined on."""
    docs = []
    for novel, lines in sorted(read_rdata_lazyload(janeaustenr).items()):
        for i, paras in enumerate(austen_chapters(lines), 1):
            docs.append((novel, "\n".join([f"Chapter {i}", *paras])))
    for heading, verses in kjv_chapters(bible_cmd):
        docs.append(("kjv", "\n".join([heading, *verses])))
    return docs


def train_tokenizer(train_docs: list[str], out_prefix: Path) -> spm.SentencePieceProcessor:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
        for d in train_docs:
            f.write(d + "\n")        # one paragraph / verse / heading per line
        f.flush()
        spm.SentencePieceTrainer.train(
            input=f.name, model_prefix=str(out_prefix), vocab_size=VOCAB_SIZE,
            model_type="bpe", byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=["\n"],
            unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{out_prefix}.model")


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids += [BOS_ID, *sp.encode(d), EOS_ID]
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / ".demo_data")
    ap.add_argument("--janeaustenr", type=Path, default=JANEAUSTENR)
    ap.add_argument("--bible", default="bible", help="bible-kjv's program")
    ap.add_argument("--heldout", type=Path, default=REPO / "tests/data/demo_heldout.txt")
    ap.add_argument("--heldout-chars", type=int, default=2048, help="per source")
    args = ap.parse_args()

    docs = build_documents(args.janeaustenr, args.bible)
    is_val = [i % VAL_EVERY == VAL_EVERY - 1 for i in range(len(docs))]
    train = [t for (_, t), v in zip(docs, is_val) if not v]
    val = [(s, t) for (s, t), v in zip(docs, is_val) if v]

    args.out.mkdir(parents=True, exist_ok=True)
    sp = train_tokenizer(train, args.out / "tokenizer")
    assert sp.get_piece_size() <= 1 << 16
    train_ids, val_ids = encode_docs(sp, train), encode_docs(sp, [t for _, t in val])
    train_ids.tofile(args.out / "train.bin")
    val_ids.tofile(args.out / "val.bin")

    # Held-out slice for the perplexity test: whole paragraphs from the start of the first
    # Austen and the first KJV validation chapter, about heldout_chars of each.
    parts = []
    for want in ("austen", "kjv"):
        text = next(t for s, t in val if (s == "kjv") == (want == "kjv"))
        keep, n = [], 0
        for para in text.split("\n"):
            if n >= args.heldout_chars:
                break
            keep.append(para)
            n += len(para) + 1
        parts.append("\n".join(keep))
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.write_text("\n\n".join(parts) + "\n", encoding="utf-8")

    meta = {
        "documents": len(docs), "train_documents": len(train), "val_documents": len(val),
        "val_rule": f"chapter index % {VAL_EVERY} == {VAL_EVERY - 1}",
        "train_tokens": int(train_ids.size), "val_tokens": int(val_ids.size),
        "train_chars": sum(map(len, train)), "vocab_size": sp.get_piece_size(),
        "bos_id": BOS_ID, "eos_id": EOS_ID, "dtype": "uint16"}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
