"""Tokenize documents and store them as fixed-length blocks in flat, memory-mapped shards.

Format "zhllama-packed-v1" (one folder per `zhllama data pack`):
  meta.json              tokenizer hash (zhllama.model.loading.tokenizer_sha256), BOS/EOS ids, seq_len, dtype
                         and per-split shard lists and counts.
  train-00000.bin, ...   the split's token stream, raw little-endian uint16 (uint32 if the vocabulary has more
                         than 65,536 entries), at most `shard_tokens` tokens per shard.
  val-00000.bin, ...     the same for the validation split, when there is one.
  train.doc_starts.npy   with --doc-boundaries: int64 stream offsets of every document's BOS (same for val).
  zhllama.json           provenance.

A split's stream is the concatenation of `[bos] + ids(text) + [eos]` over its documents, with no padding.
Block i is stream[i*seq_len : (i+1)*seq_len]; the tail shorter than seq_len is kept (so unpacking is lossless)
but is not a block. Blocks may span two shards; PackedData hides that.

Validation split: a document goes to val when crc32(f"{file_index}:{doc_index}") % 10_000 < val_fraction *
10_000, where doc_index counts the documents read from that file (blank lines and skipped rows do not count).
If val_fraction > 0 and no document lands in val, the last document goes there so that eval has something.
"""

from __future__ import annotations

import itertools
import json
import sys
import zlib
from array import array
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zhllama.artifacts import atomic_output_dir, write_provenance
from zhllama.chat.control import encode_plain
from zhllama.data.readers import ReadReport, iter_texts
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_tokenizer, tokenizer_sha256

FORMAT = "zhllama-packed-v1"
META = "meta.json"
BATCH_DOCS = 1000  # the Rust tokenizer parallelises within a batch; 1000 docs keeps all cores busy
VAL_MODULUS = 10_000


class _SplitWriter:
    """Appends token arrays to <split>-NNNNN.bin shards and keeps the split's counts."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = 0
        self.doc_starts = array("q")  # compact: one int64 per document, not one Python int object
        self.fh = None

    def add(self, docs: list[np.ndarray]) -> None:
        for doc in docs:
            self.doc_starts.append(self.tokens)
            self.tokens += len(doc)
        if docs:
            self._write(np.concatenate(docs))

    def _write(self, arr: np.ndarray) -> None:
        while len(arr):
            if self.fh is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            n = min(len(arr), self.shard_tokens - self.shards[-1]["tokens"])
            arr[:n].tofile(self.fh)
            self.shards[-1]["tokens"] += n
            arr = arr[n:]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.fh = open(self.folder / name, "wb")  # noqa: SIM115 - stays open across add() calls; close() ends it
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def summary(self, seq_len: int) -> dict:
        return {"shards": self.shards, "tokens": self.tokens, "documents": len(self.doc_starts),
                "blocks": self.tokens // seq_len}


def pack(tokenizer_dir: str | Path, inputs: list[str | Path], seq_len: int, out: str | Path,
         val_fraction: float = 0.0, doc_boundaries: bool = False, shard_tokens: int = 2**26) -> Path:
    """Tokenize every document of `inputs` and write a packed folder at `out` (whole, or not at all)."""
    if seq_len < 2:
        raise ZhllamaError(f"--seq-len {seq_len} is too small (at least 2)")
    if not 0.0 <= val_fraction < 1.0:
        raise ZhllamaError(f"--val-fraction {val_fraction} must be at least 0 and below 1")
    if shard_tokens < 1:
        raise ZhllamaError(f"shard_tokens {shard_tokens} must be positive")
    if not inputs:
        raise ZhllamaError("no input files given")
    # strict: the ids go to disk, so a tokenizer without BOS/EOS or a bare tokenizer.model (no "▁" prefix
    # handling) is refused here rather than found out in training.
    tok = load_tokenizer(tokenizer_dir, strict=True)
    sha = tokenizer_sha256(tokenizer_dir)  # of tokenizer.model for SentencePiece, else of tokenizer.json
    bos, eos = tok.bos_token_id, tok.eos_token_id
    dtype = np.dtype("<u2") if len(tok) <= 65536 else np.dtype("<u4")
    report = ReadReport()
    threshold = val_fraction * VAL_MODULUS

    def documents():
        for file_index, path in enumerate(inputs):
            for doc_index, text in enumerate(iter_texts([path], report)):
                yield zlib.crc32(f"{file_index}:{doc_index}".encode()) % VAL_MODULUS < threshold, text

    with atomic_output_dir(out) as tmp:
        writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        # The latest train document is written one batch late, so that it can still become the val
        # document if no other one lands there.
        held = None
        try:
            with tqdm(desc="tokenizing", unit="doc", disable=None) as bar:
                docs_iter = documents()
                while batch := list(itertools.islice(docs_iter, BATCH_DOCS)):
                    # A literal "<s>" in the text must not become a BOS id, or it would look like a document
                    # boundary: documents are plain text, as message content is (zhllama.chat.control).
                    ids = encode_plain(tok, [text for _, text in batch])
                    docs = {"train": [], "val": []}
                    for (is_val, _), doc in zip(batch, ids, strict=True):
                        docs["val" if is_val else "train"].append(np.array([bos, *doc, eos], dtype=dtype))
                    if held is not None:
                        docs["train"].insert(0, held)
                    held = docs["train"].pop() if docs["train"] else None
                    writers["train"].add(docs["train"])
                    writers["val"].add(docs["val"])
                    bar.update(len(batch))
            if held is not None:
                no_val = val_fraction > 0 and not writers["val"].doc_starts
                writers["val" if no_val else "train"].add([held])
        finally:
            for w in writers.values():
                w.close()

        names = ", ".join(str(p) for p in inputs)
        train, val = writers["train"], writers["val"]
        if not train.doc_starts and not val.doc_starts:
            raise ZhllamaError(f"no documents in {names}")
        if not train.doc_starts:
            raise ZhllamaError(f"every document of {names} went to val; lower --val-fraction or add data")
        if train.tokens < seq_len:
            raise ZhllamaError(f"train has {train.tokens} tokens, fewer than --seq-len {seq_len}")
        if val.doc_starts and val.tokens < seq_len:
            print(f"warning: val has {val.tokens} tokens, fewer than --seq-len {seq_len}: no val blocks",
                  file=sys.stderr)

        splits = {}
        for name, w in writers.items():
            if w.doc_starts:
                splits[name] = w.summary(seq_len)
                if doc_boundaries:
                    np.save(tmp / f"{name}.doc_starts.npy", np.frombuffer(w.doc_starts, dtype=np.int64))
        meta = {"format": FORMAT, "tokenizer_sha256": sha, "tokenizer_vocab_size": len(tok),
                "bos_id": bos, "eos_id": eos, "seq_len": seq_len, "dtype": dtype.name,
                "doc_boundaries": doc_boundaries, "splits": splits, "inputs": [str(p) for p in inputs],
                "skipped_rows": len(report.skipped)}
        (tmp / META).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
        args = {"tokenizer": str(tokenizer_dir), "input": [str(p) for p in inputs], "seq_len": seq_len,
                "out": str(out), "val_fraction": val_fraction, "doc_boundaries": doc_boundaries,
                "shard_tokens": shard_tokens}
        write_provenance(tmp, "data pack", args, {"tokenizer": sha})
    return Path(out)


class PackedData:
    """One split of a packed folder: full blocks of seq_len tokens, read from memory-mapped shards.

    Usable directly as a map-style dataset (len() and [i]). Pickling drops the memory maps, which are
    reopened in the receiving process, so DataLoader workers do not copy the data.
    """

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder, self.split = Path(folder), split
        meta_path = self.folder / META
        if not self.folder.is_dir():
            raise ZhllamaError(f"{self.folder}: no such packed-data folder")
        if not meta_path.is_file():
            raise ZhllamaError(f"{meta_path}: missing; is this a folder written by `zhllama data pack`?")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ZhllamaError(f"{meta_path}: not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ZhllamaError(f"{meta_path}: unknown format {found!r} (expected {FORMAT})")
        required = ("seq_len", "tokenizer_sha256", "bos_id", "eos_id", "dtype", "doc_boundaries", "splits")
        missing = [k for k in required if k not in meta]
        if missing:
            raise ZhllamaError(f"{meta_path}: damaged, no {', '.join(missing)}; re-pack the data")
        if split not in meta["splits"]:
            raise ZhllamaError(f"{meta_path}: no {split!r} split (has {', '.join(meta['splits'])})")
        self.meta = meta
        self.seq_len: int = meta["seq_len"]
        self.tokenizer_sha256: str = meta["tokenizer_sha256"]
        self.bos_id: int = meta["bos_id"]
        self.eos_id: int = meta["eos_id"]
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        info = meta["splits"][split]
        self._files = [self.folder / s["file"] for s in info["shards"]]
        for path, shard in zip(self._files, info["shards"], strict=True):
            want = shard["tokens"] * self.dtype.itemsize
            if not path.is_file():
                raise ZhllamaError(f"{path}: shard missing; re-pack the data")
            if path.stat().st_size != want:
                raise ZhllamaError(f"{path}: {path.stat().st_size} bytes, expected {want} "
                                   f"({shard['tokens']} tokens); re-pack the data")
        self._offsets = np.cumsum([0] + [s["tokens"] for s in info["shards"]])
        self.tokens = int(self._offsets[-1])
        if self.tokens != info["tokens"]:
            raise ZhllamaError(f"{meta_path}: {split} shards hold {self.tokens} tokens, "
                               f"meta says {info['tokens']}; re-pack the data")
        self._maps = None
        self._doc_starts = None

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return self.tokens // self.seq_len

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self._files]
        parts = []
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop:
            base = int(self._offsets[k])
            end = min(stop, int(self._offsets[k + 1]))
            parts.append(self._maps[k][start - base:end - base])
            start, k = end, k + 1
        return np.concatenate(parts, dtype=np.int64) if parts else np.empty(0, dtype=np.int64)

    def block(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range (0..{len(self) - 1})")
        return self._read(i * self.seq_len, (i + 1) * self.seq_len)

    __getitem__ = block

    def stream(self) -> np.ndarray:
        return self._read(0, self.tokens)

    def doc_starts(self) -> np.ndarray | None:
        if not self.meta["doc_boundaries"]:
            return None
        if self._doc_starts is None:
            path = self.folder / f"{self.split}.doc_starts.npy"
            if not path.is_file():
                raise ZhllamaError(f"{path}: missing; re-pack the data")
            self._doc_starts = np.load(path).astype(np.int64, copy=False)
        return self._doc_starts

    def position_ids(self, i: int) -> np.ndarray:
        """Positions that restart at 0 at every document start in block i (and at the block's first token)."""
        block = self.block(i)
        starts = self.doc_starts()
        if starts is None:
            local = np.flatnonzero(block == self.bos_id)
        else:
            lo, hi = i * self.seq_len, (i + 1) * self.seq_len
            local = starts[np.searchsorted(starts, lo):np.searchsorted(starts, hi)] - lo
        idx = np.arange(self.seq_len)
        reset = np.zeros(self.seq_len, dtype=bool)
        reset[0] = True
        reset[local] = True
        return idx - np.maximum.accumulate(np.where(reset, idx, 0))


def check_tokenizer(packed: PackedData, tokenizer_dir: str | Path) -> None:
    """Refuse to train on data packed with another tokenizer: its ids would mean other pieces."""
    sha = tokenizer_sha256(tokenizer_dir)
    if sha == packed.tokenizer_sha256:
        return
    vocab = len(load_tokenizer(tokenizer_dir))
    raise ZhllamaError(
        f"data in {packed.folder} was packed with tokenizer {packed.tokenizer_sha256[:12]} "
        f"(vocab {packed.meta['tokenizer_vocab_size']}) but the model's tokenizer is {sha[:12]} "
        f"(vocab {vocab}); re-pack with the model's tokenizer")


def unpack_documents(packed: PackedData) -> list[list[int]]:
    """The split's documents as id lists, without their BOS and EOS: the inverse of packing."""
    stream = packed.stream()
    starts = packed.doc_starts()
    if starts is None:
        starts = np.flatnonzero(stream == packed.bos_id)
    ends = np.append(starts[1:], len(stream))
    if len(stream) and (len(starts) == 0 or starts[0] != 0):
        raise ZhllamaError(f"{packed.folder}: {packed.split} stream does not start with BOS")
    if len(ends) and (np.any(stream[starts] != packed.bos_id) or np.any(stream[ends - 1] != packed.eos_id)):
        raise ZhllamaError(f"{packed.folder}: {packed.split} stream is not made of BOS ... EOS documents")
    return [stream[s + 1:e - 1].tolist() for s, e in zip(starts, ends, strict=True)]
