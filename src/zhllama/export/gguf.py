"""Export an HF Llama folder to a llama-architecture GGUF file for llama.cpp, and read one back.

The vocabulary (zhllama.export.gguf_vocab) is a SentencePiece one from tokenizer.model itself (pieces, scores,
types), so llama.cpp tokenises exactly as sentencepiece does, or a byte-level BPE one (Llama-3) from tokenizer.json
(tokens, merges, the pre-tokenizer named by its regex), so llama.cpp tokenises exactly as HF does. Extended
Chinese vocabularies are where other converters fail: the tokenizer and the embedding matrix often disagree in size
(rows padded to a multiple, or a tokenizer grown after the model), so both directions are handled here explicitly.

RoPE scaling (config.rope_parameters, the transformers 5 form):
- linear, yarn: written as rope.scaling.{type,factor,original_context_length}; llama.cpp applies both.
- llama3: llama.cpp has no scaling type for it; like llama.cpp's own converter we write the per-frequency
  factors as the `rope_freqs` tensor, which llama.cpp multiplies into the rotation.
- dynamic (NTK): no GGUF equivalent. It changes nothing up to the trained context, so the file is written
  without scaling (context length = the trained one) and a warning says so.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from zhllama.artifacts import atomic_file, check_output_path
from zhllama.errors import ZhllamaError
from zhllama.export.gguf_vocab import pad_vocab as pad_vocabulary
from zhllama.export.gguf_vocab import read_vocab, write_tokenizer
from zhllama.model.loading import require_hf_folder
from zhllama.tokenizer.gguf_vocab import is_gguf

# --type name -> (tensor type, file type); filled lazily so importing this module does not need gguf.
QTYPE_NAMES = ("f32", "f16", "q8_0", "q4_0")


def _qtypes() -> dict:
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}


def _check_inputs(model_dir: Path, out: Path, qtype: str, pad_vocab) -> None:
    if qtype not in QTYPE_NAMES:
        raise ZhllamaError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(QTYPE_NAMES)}")
    if pad_vocab is not None and (isinstance(pad_vocab, bool) or not isinstance(pad_vocab, int) or pad_vocab < 1):
        raise ZhllamaError(f"--pad-vocab must be a positive integer, got {pad_vocab!r}")
    require_hf_folder(model_dir)
    if out.is_dir():
        raise ZhllamaError(f"--out {out} is a folder; give a FILE.gguf path")
    # Overwrite only a previous GGUF (or an empty file): a mistyped --out must not destroy other data.
    if out.exists() and out.stat().st_size > 0 and not is_gguf(out):
        raise ZhllamaError(f"{out} exists and is not a GGUF file; choose another --out")
    check_output_path(out)  # before the model loads, not after the conversion


def _target_rows(n_tok: int, n_rows: int, pad_vocab: int | None, model_dir: Path) -> int:
    """How many rows (= vocabulary entries) the GGUF gets."""
    if pad_vocab is None:
        if n_tok > n_rows:
            raise ZhllamaError(
                f"{model_dir}: the tokenizer has {n_tok} tokens but the embedding has only {n_rows} rows; "
                f"ids {n_rows}..{n_tok - 1} have no weights (pass --pad-vocab N to add rows, e.g. --pad-vocab 64)")
        return n_rows
    return max(n_rows, math.ceil(n_tok / pad_vocab) * pad_vocab)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows as [first halves | second halves] per head; llama.cpp's rope wants them interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(params: dict, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 RoPE scaling, as transformers computes them."""
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_rope(writer, config, head_dim: int, theta: float) -> np.ndarray | None:
    """RoPE scaling keys; returns the llama3 rope_freqs tensor when there is one."""
    import gguf

    params = dict(getattr(config, "rope_parameters", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "yarn", "llama3", "dynamic"):
        raise ZhllamaError(f"RoPE type {kind!r} has no GGUF export here; supported: linear, yarn, llama3 "
                           f"(dynamic with a warning)")
    if kind == "dynamic":
        print(f"warning: dynamic (NTK) RoPE scaling has no GGUF equivalent; exported without scaling, exact up "
              f"to the trained context of {config.max_position_embeddings} tokens", file=sys.stderr)
        return None
    factor = float(params["factor"])
    if kind == "llama3":
        return _llama3_factors(params, head_dim, theta)
    original = params.get("original_max_position_embeddings")
    if original is None:
        # transformers' yarn falls back to max_position_embeddings; linear does not record it, and
        # `zhllama eval long --rope linear` multiplies max_position_embeddings by the factor, so divide it back.
        ctx = int(config.max_position_embeddings)
        original = ctx if kind == "yarn" else round(ctx / factor)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(factor)
    writer.add_rope_scaling_orig_ctx_len(int(original))
    if kind == "yarn":
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(float(params[key]))
    return None


def _tensor_type(name: str, arr: np.ndarray, qtype, fallbacks: list[str]):
    import gguf

    Q = gguf.GGMLQuantizationType
    if arr.ndim == 1:
        return Q.F32  # norms and rope factors: tiny, and llama.cpp expects f32
    if qtype in (Q.F32, Q.F16):
        return qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        fallbacks.append(f"{name} {tuple(arr.shape)}")
        return Q.F16
    return qtype


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16", pad_vocab: int | None = None) -> Path:
    """Write `model_dir` (an HF Llama folder) as a llama GGUF of type f32|f16|q8_0|q4_0; return the path."""
    model_dir, out = Path(model_dir), Path(out)
    qtype = (qtype or "").lower()
    _check_inputs(model_dir, out, qtype, pad_vocab)
    import gguf
    import torch

    from zhllama.model.loading import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    vocab = read_vocab(model_dir, tok)  # before the weights load: an unsupported tokenizer fails at once
    model = load_model(model_dir)
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ZhllamaError(f"{model_dir}: model type {getattr(config, 'model_type', None)!r} is not llama; "
                           f"export gguf writes llama-architecture files only")
    state = model.state_dict()
    n_rows = int(state["model.embed_tokens.weight"].shape[0])
    rows = _target_rows(len(vocab.tokens), n_rows, pad_vocab, model_dir)
    pad_vocabulary(vocab, rows)

    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", 10000.0))
    tensor_type, file_type = _qtypes()[qtype]
    tied = bool(getattr(config, "tie_word_embeddings", False))

    fallbacks: list[str] = []
    with atomic_file(out) as tmp:
        # Temp-file mode keeps converted tensors on disk, not in memory, until the file is assembled.
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], use_temp_file=True)
        try:
            writer.add_name(model_dir.resolve().name)
            writer.add_context_length(int(config.max_position_embeddings))
            writer.add_embedding_length(int(config.hidden_size))
            writer.add_block_count(int(config.num_hidden_layers))
            writer.add_feed_forward_length(int(config.intermediate_size))
            writer.add_head_count(n_head)
            writer.add_head_count_kv(n_kv)
            if head_dim != config.hidden_size // n_head:
                writer.add_key_length(head_dim)
                writer.add_value_length(head_dim)
            writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
            writer.add_rope_dimension_count(int(head_dim * float(params.get("partial_rotary_factor", 1.0))))
            writer.add_rope_freq_base(theta)
            writer.add_vocab_size(rows)
            writer.add_file_type(int(file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            rope_freqs = _write_rope(writer, config, head_dim, theta)
            write_tokenizer(writer, tok, model_dir, vocab)

            names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
            if rope_freqs is not None:
                writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs)
            for name, tensor in state.items():
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / shared with token_embd
                new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ZhllamaError(f"{model_dir}: tensor {name} has no llama GGUF name; not a plain Llama model")
                arr = tensor.detach().to(torch.float32).cpu().numpy()
                if name.endswith(("q_proj.weight", "q_proj.bias")):
                    arr = _permute(arr, n_head)
                elif name.endswith(("k_proj.weight", "k_proj.bias")):
                    arr = _permute(arr, n_kv)
                if name in ("model.embed_tokens.weight", "lm_head.weight") and rows > arr.shape[0]:
                    # New rows are the mean row: an embedding like an average token and an output logit near the
                    # average, instead of zeros that would outrank every negative logit.
                    mean = arr.mean(axis=0, keepdims=True)
                    arr = np.concatenate([arr, np.repeat(mean, rows - arr.shape[0], axis=0)])
                kind = _tensor_type(new_name, arr, tensor_type, fallbacks)
                data = gguf.quants.quantize(np.ascontiguousarray(arr), kind)
                writer.add_tensor(new_name, data, raw_dtype=kind)
            del model, state
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    if rows > n_rows:
        print(f"note: added {rows - n_rows} embedding/output rows ({n_rows} -> {rows}), initialised to the mean row",
              file=sys.stderr)
    if fallbacks:
        print(f"fell back to f16: {', '.join(fallbacks)}", file=sys.stderr)
    return out


def read_gguf_info(path: str | Path) -> dict:
    """The facts about a GGUF file that tests and users check: architecture, vocabulary, types, RoPE, template."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ZhllamaError(f"{path}: not a readable GGUF file ({exc})") from None

    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    def count(key) -> int:  # an array's length without decoding it (seconds for 280,000 merges)
        field = reader.fields.get(key)
        return 0 if field is None else len(field.data)

    arch = get("general.architecture")
    types = get("tokenizer.ggml.token_type") or []
    return {
        "arch": arch,
        "name": get("general.name"),
        "file_type": get("general.file_type"),
        "vocab_size": count("tokenizer.ggml.tokens"),
        "token_types": dict(Counter(int(t) for t in types)),
        "context_length": get(f"{arch}.context_length"),
        "tensor_count": len(reader.tensors),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "rope": {
            "freq_base": get(f"{arch}.rope.freq_base"),
            "dimension_count": get(f"{arch}.rope.dimension_count"),
            "scaling_type": get(f"{arch}.rope.scaling.type"),
            "scaling_factor": get(f"{arch}.rope.scaling.factor"),
            "original_context_length": get(f"{arch}.rope.scaling.original_context_length"),
            "has_rope_freqs": any(t.name == "rope_freqs.weight" for t in reader.tensors),
        },
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
        "merges": count("tokenizer.ggml.merges"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "eot_token_id": get("tokenizer.ggml.eot_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "chat_template": get("tokenizer.chat_template") is not None,
    }
