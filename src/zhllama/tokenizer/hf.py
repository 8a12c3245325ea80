"""Write a complete Hugging Face tokenizer folder from a SentencePiece BPE model.

transformers 5 converts a Llama tokenizer.model into BPE merges that disagree with sentencepiece on runs of
whitespace (Llama-2's whitespace-only pieces all score -1e9, and the converter breaks those ties by id). We
build the merges ourselves so that the fast tokenizer reproduces sentencepiece's own algorithm: the
highest-scoring mergeable pair first, ties going to the leftmost pair.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zhllama.tokenizer.spm import NORMAL, USER_DEFINED, ModelProto

HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja")


def bpe_merges(proto: ModelProto) -> list[tuple[str, str]]:
    """Every (left, right) split of every mergeable piece, in sentencepiece's priority order.

    sentencepiece merges the adjacent pair whose concatenation has the highest score, leftmost first on ties.
    The fast BPE merges by rank, so rank follows score; inside a tie, the pair with the longer left part goes
    first, which reproduces the leftmost-first growth of a tied run (Llama-2's whitespace pieces).
    """
    mergeable = {p.piece: (i, p.score) for i, p in enumerate(proto.pieces) if p.type in (NORMAL, USER_DEFINED)}
    entries = []
    for piece, (idx, score) in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                entries.append((-score, -len(left), idx, left, right))
    entries.sort()
    return [(left, right) for *_, left, right in entries]


def build_fast_tokenizer(proto: ModelProto):
    """A transformers LlamaTokenizer (tokenizers backend) equivalent to the SentencePiece model."""
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if len(vocab) != len(proto.pieces):
        raise ValueError("duplicate pieces in the SentencePiece model")
    ids = proto.trainer_spec
    name = {i: p.piece for i, p in enumerate(proto.pieces)}
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=bpe_merges(proto),
        unk_token=name.get(ids.unk_id, "<unk>"),
        bos_token=name.get(ids.bos_id, "<s>"),
        eos_token=name.get(ids.eos_id, "</s>"),
        pad_token=name[ids.pad_id] if ids.pad_id >= 0 else None,
        add_prefix_space=proto.normalizer_spec.add_dummy_prefix,
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
    )
    # sentencepiece always prepends the dummy "▁", even to text that starts with a space; the tokenizers
    # Metaspace pre-tokenizer skips it there. A normalizer reproduces sentencepiece exactly.
    steps = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    tok._tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok._tokenizer.pre_tokenizer = None
    # User-defined symbols are matched whole by sentencepiece before any merge; control pieces never come
    # from text. Register both so the fast tokenizer treats them the same way.
    extra = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if extra:
        tok.add_tokens(extra, special_tokens=False)
    return tok


def write_hf_tokenizer(proto: ModelProto, out: Path, chat_template: str | None = None) -> None:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    tok = build_fast_tokenizer(proto)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))
    # save_pretrained may have written its own copy of the vocab file; ours is the source of truth.
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        # The generic class loads tokenizer.json as written; LlamaTokenizer would rebuild its own pipeline.
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        model_max_length=cfg.get("model_max_length", 4096) if cfg.get("model_max_length", 0) < 1e9 else 4096,
    )
    cfg.pop("is_local", None)
    cfg.pop("local_files_only", None)
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, ensure_ascii=False, indent=2) + "\n")


def copy_hf_tokenizer(src: Path, out: Path) -> None:
    for name in HF_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def set_chat_template(folder: Path, jinja: str) -> None:
    """Store a chat template in a tokenizer folder where every reader looks for it.

    transformers 5 reads chat_template.jinja; older transformers and llama.cpp's converter read the
    tokenizer_config.json field. Both get the same text.
    """
    folder = Path(folder)
    (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg["chat_template"] = jinja
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
