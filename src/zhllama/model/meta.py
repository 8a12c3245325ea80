"""Convert Meta's original Llama checkpoint folder into a Hugging Face folder.

Meta ships a folder per model (``consolidated.00.pth``, ``consolidated.01.pth``, ... plus ``params.json``) and
``tokenizer.model`` either in that folder or in its parent. The shards are model-parallel slices of one model;
they are loaded with ``weights_only=True`` (never unpickled) and joined the way Meta's layers split them.

Meta's rotary embedding rotates interleaved pairs (0,1), (2,3), ... of each head; transformers rotates the two
halves of the head against each other (``rotate_half``). Permuting the rows of ``wq`` and ``wk`` within each head
(the same permutation transformers' own ``convert_llama_weights_to_hf.py`` applies) makes the two agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zhllama.artifacts import atomic_output_dir, check_output_path, file_sha256, write_provenance
from zhllama.errors import ZhllamaError

# params.json from Llama-2 does not name the context length; Llama-2 was trained with 4096 tokens.
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_ROPE_THETA = 10_000.0

# How each Meta tensor is split across model-parallel shards: the dimension to concatenate along,
# or None when every shard holds the same copy (the norms).
_CONCAT_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}

_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_IGNORED = {"rope.freqs"}


def permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """Meta's interleaved-pair rows of wq/wk -> transformers' half-split rows, head by head."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def unpermute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """The inverse of `permute`: transformers' rows back to Meta's."""
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def find_tokenizer(input_dir: Path) -> Path:
    """tokenizer.model next to the shards, or in the parent folder as Meta's downloads lay it out."""
    for candidate in (input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise ZhllamaError(f"{input_dir}: no tokenizer.model in the folder or its parent")


def read_params(input_dir: Path) -> dict:
    path = input_dir / "params.json"
    if not path.is_file():
        raise ZhllamaError(f"{input_dir}: no params.json (not a Meta Llama checkpoint folder)")
    try:
        params = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ZhllamaError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(params, dict):
        raise ZhllamaError(f"{path}: expected a JSON object")
    missing = [k for k in ("dim", "n_layers", "n_heads", "norm_eps") if k not in params]
    if missing:
        raise ZhllamaError(f"{path}: missing {', '.join(missing)}")
    return params


def shard_paths(input_dir: Path) -> list[Path]:
    shards = sorted(input_dir.glob("consolidated.*.pth"), key=lambda p: p.name)
    if not shards:
        raise ZhllamaError(f"{input_dir}: no consolidated.*.pth checkpoint shards")
    return shards


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors, unpickled only as plain tensors: a file that needs more is refused, never run."""
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of the very files it refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests retrying with weights_only=False, which would run whatever the file holds.
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        what = f" (it refers to {found.group(1)})" if found else ", or is not a PyTorch checkpoint at all"
        raise ZhllamaError(f"{path}: holds code or Python objects that are not weights{what}; zhllama loads only "
                           "plain tensors and will not run what this file contains") from None
    except Exception as exc:  # a damaged or foreign file
        text = str(exc).strip().splitlines()
        first = text[0].split(". ")[0] if text else type(exc).__name__
        raise ZhllamaError(f"{path}: damaged or not a PyTorch checkpoint ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ZhllamaError(f"{path}: expected a dict of tensors")
    return state


def _suffix(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'attention.wq.weight'; top-level names unchanged."""
    if name.startswith("layers."):
        return name.split(".", 2)[2]
    return name


def merge_shards(shards: list[dict[str, torch.Tensor]], n_layers: int) -> dict[str, torch.Tensor]:
    """One Meta state dict from model-parallel shards; `rope.freqs` is dropped."""
    expected = list(_TOP_NAMES) + [f"layers.{i}.{s}" for i in range(n_layers) for s in _LAYER_NAMES]
    merged: dict[str, torch.Tensor] = {}
    for name in expected:
        parts = []
        for index, shard in enumerate(shards):
            if name not in shard:
                raise ZhllamaError(f"shard {index}: missing tensor {name}")
            parts.append(shard[name])
        dim = _CONCAT_DIM[_suffix(name)]
        merged[name] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    known = set(expected) | _IGNORED
    for index, shard in enumerate(shards):
        extra = sorted(set(shard) - known)
        if extra:
            raise ZhllamaError(f"shard {index}: unexpected tensor {extra[0]}"
                               + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return merged


def to_hf_state_dict(meta: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int,
                     dim: int) -> dict[str, torch.Tensor]:
    head_dim = dim // n_heads
    out = {hf: meta[name] for name, hf in _TOP_NAMES.items()}
    for i in range(n_layers):
        for suffix, hf in _LAYER_NAMES.items():
            w = meta[f"layers.{i}.{suffix}"]
            if suffix in ("attention.wq.weight", "attention.wk.weight"):
                heads = n_heads if suffix == "attention.wq.weight" else n_kv_heads
                rows = heads * head_dim
                if tuple(w.shape) != (rows, dim):
                    raise ZhllamaError(f"layers.{i}.{suffix}: shape {tuple(w.shape)} does not match "
                                       f"params.json, expected {(rows, dim)}")
                w = permute(w, heads, rows, dim)
            out[f"model.layers.{i}.{hf}"] = w.contiguous()
    return out


def convert_meta(input_dir: str | Path, out: str | Path) -> Path:
    """Meta's consolidated.*.pth + params.json + tokenizer.model -> an HF Llama folder at `out`.

    The weights keep the checkpoint's dtype (Meta ships bfloat16). Returns `out`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.tokenizer.hf import write_hf_tokenizer
    from zhllama.tokenizer.spm import load_proto

    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ZhllamaError(f"{input_dir} is not a folder")
    params = read_params(input_dir)
    shards = shard_paths(input_dir)
    check_output_path(out)  # before gigabytes of shards are read
    tokenizer_path = find_tokenizer(input_dir)
    proto = load_proto(tokenizer_path)
    pieces = len(proto.pieces)

    dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)
    if dim <= 0 or n_heads <= 0 or dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise ZhllamaError(f"params.json: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} "
                           "do not give a whole, even head size shared by whole groups")
    vocab_size = int(params.get("vocab_size", -1))
    if vocab_size <= 0:
        vocab_size = pieces
    elif vocab_size != pieces:
        raise ZhllamaError(f"params.json vocab_size {vocab_size} differs from the {pieces} pieces "
                           f"of {tokenizer_path}")
    rope_theta = float(params.get("rope_theta") or DEFAULT_ROPE_THETA)
    max_seq_len = int(params.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN)

    meta = merge_shards([load_shard(p) for p in shards], n_layers)
    state = to_hf_state_dict(meta, n_layers, n_heads, n_kv_heads, dim)
    del meta
    dtype = state["model.embed_tokens.weight"].dtype
    intermediate = state["model.layers.0.mlp.gate_proj.weight"].shape[0]

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=float(params["norm_eps"]),
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype=str(dtype).removeprefix("torch."),
    )
    # Built on the meta device: no memory and no random init for weights that are replaced right away.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    wanted = model.state_dict()
    for name, target in wanted.items():
        if name not in state:
            raise ZhllamaError(f"converted checkpoint lacks {name}")
        if tuple(state[name].shape) != tuple(target.shape):
            raise ZhllamaError(f"{name}: converted shape {tuple(state[name].shape)} differs from the "
                               f"shape {tuple(target.shape)} params.json implies")
    extra = sorted(set(state) - set(wanted))
    if extra:
        raise ZhllamaError(f"converted checkpoint has unexpected tensor {extra[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2

    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        write_hf_tokenizer(proto, tmp)
        write_provenance(tmp, "convert meta", {"input": input_dir, "shards": [p.name for p in shards]},
                         {"params": file_sha256(input_dir / "params.json"),
                          "tokenizer": file_sha256(tokenizer_path)},
                         parameters=sum(t.numel() for t in state.values()), vocab_size=vocab_size)
    return Path(out)
