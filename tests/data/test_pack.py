import json
import shutil
import zlib

import numpy as np
import pytest
from transformers import AutoTokenizer

from zhllama.artifacts import file_sha256, read_provenance
from zhllama.data.pack import PackedData, check_tokenizer, pack, unpack_documents
from zhllama.errors import ZhllamaError

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tok(extended_dir):
    return AutoTokenizer.from_pretrained(str(extended_dir))


@pytest.fixture(scope="module")
def texts(zh_train_file):
    return [json.loads(line)["text"] for line in zh_train_file.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, texts):
    """200 documents, with a literal "<s>" that must stay text, not become a document boundary."""
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    docs = texts[:199] + ["前文 <s> 和 </s> 后文"]
    rows = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs)
    path.write_text(rows, encoding="utf-8")
    return path, docs


@pytest.fixture(scope="module")
def packed_full(tmp_path_factory, extended_dir, zh_train_file):
    out = tmp_path_factory.mktemp("packs") / "full"
    return pack(extended_dir, [zh_train_file], SEQ_LEN, out, val_fraction=0.1, doc_boundaries=True)


@pytest.fixture(scope="module")
def packed_small(tmp_path_factory, extended_dir, small_file):
    out = tmp_path_factory.mktemp("packs") / "small"
    return pack(extended_dir, [small_file[0]], SEQ_LEN, out, doc_boundaries=True, shard_tokens=1000)


def expected_split(file_index, doc_index, fraction):
    return "val" if zlib.crc32(f"{file_index}:{doc_index}".encode()) % 10_000 < fraction * 10_000 else "train"


def test_packing_is_lossless(packed_full, tok, texts):
    # One document at a time, so that the batched path in pack() is checked against it.
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    splits = [expected_split(0, i, 0.1) for i in range(len(texts))]
    for split in ("train", "val"):
        data = PackedData(packed_full, split)
        mine = [d for d, s in zip(ids, splits, strict=True) if s == split]
        assert unpack_documents(data) == mine
        flat = [t for d in mine for t in [tok.bos_token_id, *d, tok.eos_token_id]]
        assert data.stream().tolist() == flat
    train = unpack_documents(PackedData(packed_full))
    assert tok.decode(train[0]) == texts[splits.index("train")]


def test_meta_counts_and_provenance(packed_full, extended_dir, tok, texts):
    meta = json.loads((packed_full / "meta.json").read_text())
    sha = file_sha256(extended_dir / "tokenizer.model")
    assert meta["format"] == "zhllama-packed-v1" and meta["tokenizer_sha256"] == sha
    assert meta["tokenizer_vocab_size"] == len(tok) == 34_000 and meta["dtype"] == "uint16"
    assert (meta["bos_id"], meta["eos_id"], meta["seq_len"]) == (1, 2, SEQ_LEN)
    assert meta["doc_boundaries"] is True and meta["skipped_rows"] == 0
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(texts)
    for split, info in meta["splits"].items():
        data = PackedData(packed_full, split)
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) == len(data.stream())
        assert info["blocks"] == info["tokens"] // SEQ_LEN == len(data)
        assert sum((packed_full / s["file"]).stat().st_size for s in info["shards"]) == 2 * info["tokens"]
    assert read_provenance(packed_full)["inputs"] == {"tokenizer": sha}


def test_blocks_are_stream_slices_across_shard_boundaries(packed_small):
    data = PackedData(packed_small)
    shards = data.meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1])
    stream = data.stream()
    assert len(data) == len(stream) // SEQ_LEN and len(stream) % SEQ_LEN  # a tail exists and is not a block
    spanning = [i for i in range(len(data)) if (i * SEQ_LEN) // 1000 != ((i + 1) * SEQ_LEN - 1) // 1000]
    assert spanning
    for i in range(len(data)):
        block = data.block(i)
        assert block.dtype == np.int64 and block.tolist() == stream[i * SEQ_LEN:(i + 1) * SEQ_LEN].tolist()
    with pytest.raises(IndexError):
        data.block(len(data))


def test_literal_special_tokens_stay_text(packed_small, tok, small_file):
    _, docs = small_file
    unpacked = unpack_documents(PackedData(packed_small))
    assert len(unpacked) == len(docs) and tok.decode(unpacked[-1]) == docs[-1]


def test_val_split_is_deterministic_and_disjoint(tmp_path, packed_full, extended_dir, zh_train_file):
    again = pack(extended_dir, [zh_train_file], SEQ_LEN, tmp_path / "again", val_fraction=0.1,
                 doc_boundaries=True)
    meta, meta2 = (json.loads((p / "meta.json").read_text())["splits"] for p in (packed_full, again))
    assert meta == meta2
    for info in meta.values():
        for s in info["shards"]:
            assert file_sha256(packed_full / s["file"]) == file_sha256(again / s["file"])
    n = meta["train"]["documents"] + meta["val"]["documents"]
    assert meta["val"]["documents"] == sum(expected_split(0, i, 0.1) == "val" for i in range(n))
    assert 0.07 < meta["val"]["documents"] / n < 0.13


def test_last_document_goes_to_val_when_none_lands_there(tmp_path, extended_dir):
    path = tmp_path / "three.txt"
    path.write_text("第一篇文章。\n第二篇文章。\n第三篇文章。\n", encoding="utf-8")
    assert all(expected_split(0, i, 1e-4) == "train" for i in range(3))
    out = pack(extended_dir, [path], 4, tmp_path / "out", val_fraction=1e-4)
    tok = AutoTokenizer.from_pretrained(str(extended_dir))
    assert [tok.decode(d) for d in unpack_documents(PackedData(out, "val"))] == ["第三篇文章。"]
    assert [tok.decode(d) for d in unpack_documents(PackedData(out))] == ["第一篇文章。", "第二篇文章。"]


def test_doc_starts_point_at_bos_and_positions_reset_there(packed_small, tmp_path, extended_dir, small_file):
    data = PackedData(packed_small)
    starts, stream = data.doc_starts(), data.stream()
    assert starts.dtype == np.int64 and len(starts) == len(small_file[1])
    assert np.array_equal(starts, np.flatnonzero(stream == data.bos_id))
    plain = PackedData(pack(extended_dir, [small_file[0]], SEQ_LEN, tmp_path / "plain", shard_tokens=1000))
    assert plain.doc_starts() is None and not (tmp_path / "plain" / "train.doc_starts.npy").exists()
    for i in range(len(data)):
        pos = data.position_ids(i)
        assert np.array_equal(pos, plain.position_ids(i))
        zeros = set(np.flatnonzero(pos == 0).tolist())
        assert zeros == {0} | set((starts[(starts >= i * SEQ_LEN) & (starts < (i + 1) * SEQ_LEN)]
                                   - i * SEQ_LEN).tolist())


def write_packed(folder, stream, seq_len, doc_starts=None, shard_tokens=5):
    """A packed folder written by hand from the format description, independent of pack()."""
    folder.mkdir()
    shards = []
    for k in range(0, len(stream), shard_tokens):
        name = f"train-{len(shards):05d}.bin"
        np.array(stream[k:k + shard_tokens], dtype="<u2").tofile(folder / name)
        shards.append({"file": name, "tokens": len(stream[k:k + shard_tokens])})
    if doc_starts is not None:
        np.save(folder / "train.doc_starts.npy", np.array(doc_starts, dtype=np.int64))
    meta = {"format": "zhllama-packed-v1", "tokenizer_sha256": "0" * 64, "tokenizer_vocab_size": 32000,
            "bos_id": 1, "eos_id": 2, "seq_len": seq_len, "dtype": "uint16",
            "doc_boundaries": doc_starts is not None, "inputs": [], "skipped_rows": 0,
            "splits": {"train": {"shards": shards, "tokens": len(stream), "documents": 4,
                                 "blocks": len(stream) // seq_len}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_position_ids_hand_built(tmp_path):
    stream = [1, 5, 6, 2, 1, 7, 2, 1, 8, 2, 1, 9, 2]  # documents start at 0, 4, 7 and 10
    expected = [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]  # block 2 starts inside the third document
    for starts in ([0, 4, 7, 10], None):
        data = PackedData(write_packed(tmp_path / f"hand-{starts is None}", stream, 4, starts))
        assert len(data) == 3 and data.block(2).tolist() == [8, 2, 1, 9]
        assert [data.position_ids(i).tolist() for i in range(3)] == expected
        assert unpack_documents(data) == [[5, 6], [7], [8], [9]]


def test_check_tokenizer(packed_full, extended_dir, llama2_dir):
    data = PackedData(packed_full)
    check_tokenizer(data, extended_dir)
    ours, theirs = (file_sha256(d / "tokenizer.model")[:12] for d in (extended_dir, llama2_dir))
    with pytest.raises(ZhllamaError) as err:
        check_tokenizer(data, llama2_dir)
    message = str(err.value)
    assert ours in message and theirs in message and "vocab 34000" in message and "vocab 32000" in message
    assert "\n" not in message


def test_empty_input_writes_nothing(tmp_path, extended_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"text": 5}\n{oops\n', encoding="utf-8")
    with pytest.raises(ZhllamaError, match="no documents in"):
        pack(extended_dir, [empty], SEQ_LEN, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_bad_arguments_are_refused(tmp_path, extended_dir, small_file):
    with pytest.raises(ZhllamaError, match="seq-len"):
        pack(extended_dir, [small_file[0]], 1, tmp_path / "out")
    with pytest.raises(ZhllamaError, match="tokenizer.model"):
        pack(tmp_path, [small_file[0]], SEQ_LEN, tmp_path / "out")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(extended_dir / "tokenizer.model", bare)
    with pytest.raises(ZhllamaError, match="tokenizer_config.json"):
        pack(bare, [small_file[0]], SEQ_LEN, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_rows_are_skipped_and_counted(tmp_path, extended_dir, tok):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "你好，世界。"}\n{broken\n{"text": "再见。"}\n', encoding="utf-8")
    out = pack(extended_dir, [path], 2, tmp_path / "out")
    data = PackedData(out)
    assert data.meta["skipped_rows"] == 1 and data.meta["splits"]["train"]["documents"] == 2
    assert [tok.decode(d) for d in unpack_documents(data)] == ["你好，世界。", "再见。"]


def test_damaged_folders_are_refused_with_one_line(tmp_path, packed_small):
    def refused(folder, split="train", match=None):
        with pytest.raises(ZhllamaError, match=match) as err:
            PackedData(folder, split)
        assert "\n" not in str(err.value)

    refused(tmp_path / "nowhere", match="no such packed-data folder")
    (tmp_path / "bare").mkdir()
    refused(tmp_path / "bare", match="meta.json: missing")
    copy = shutil.copytree(packed_small, tmp_path / "copy")
    refused(copy, "val", match="no 'val' split")
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "format": "other"}))
    refused(copy, match="unknown format 'other'")
    (copy / "meta.json").write_text(json.dumps(meta))
    with open(copy / "train-00001.bin", "r+b") as fh:
        fh.truncate(10)
    refused(copy, match="train-00001.bin: 10 bytes, expected 2000")
