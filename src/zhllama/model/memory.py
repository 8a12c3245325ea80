"""Expected memory of a Llama model per precision (``zhllama model memory --model DIR|PRESET``).

Everything is computed from the config's shape, so a 7B model can be sized without downloading it. Sizes are in
decimal GB (1e9 bytes), as model hubs list file sizes. What each precision stores, per weight:

- fp32 / fp16 / bf16: 4 / 2 bytes for everything.
- int8 (bitsandbytes LLM.int8()): the decoder Linear weights 1 byte plus one fp32 scale per output row; the
  embeddings, ``lm_head`` (transformers skips it) and the norms stay fp16.
- int4 (bitsandbytes NF4 with double quantisation, as ``--quantize int4`` loads it): decoder Linear weights 0.5
  byte, plus an 8-bit absmax per block of 64 and an fp32 scale per 256 of those; the rest fp16 as for int8.
- GGUF f16 / q8_0 / q4_0, as ``zhllama export gguf`` writes them: every 2-D tensor (embeddings and output
  included) in the type, q8_0 at 34 bytes per 32 weights (32 int8 + an fp16 scale), q4_0 at 18 bytes per 32;
  1-D tensors (norms) f32; a matrix whose rows are not a multiple of 32 falls back to f16. llama.cpp's own
  quantizer keeps ``output.weight`` in q6_K for q4_0, about 35 MB more on 7B.

The KV cache is 2 (K and V) x layers x KV heads x head_dim values per token, in fp16 here. The "with 2k context"
column adds a 2,048-token fp16 cache (one sequence) to the weights; it leaves out the CUDA context (~0.3-0.5 GB),
activations and allocator slack, which depend on the runtime and the batch.
"""

from __future__ import annotations

from pathlib import Path

from zhllama.errors import ZhllamaError

GB = 1e9
PRESET_VOCAB = 32_000  # a preset alone has no tokenizer: size it with Llama-2's vocabulary
RUNTIME_CONTEXT = 2048
KV_CONTEXTS = (1024, 4096)
GGUF_BLOCK = 32
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256
PRECISIONS = ("fp32", "fp16/bf16", "int8", "int4 nf4", "gguf f16", "gguf q8_0", "gguf q4_0")


def _shape(config) -> dict:
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    return {"vocab": int(config.vocab_size), "hidden": hidden, "intermediate": int(config.intermediate_size),
            "layers": int(config.num_hidden_layers), "heads": heads,
            "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(config, "head_dim", None) or hidden // heads),
            "tied": bool(getattr(config, "tie_word_embeddings", False))}


def _matrices(s: dict) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(decoder Linear weights, embedding-like weights) as (rows, columns): columns are the input features, the
    dimension quantisation blocks run along."""
    h, q, kv, ff = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["intermediate"]
    layer = [(q, h), (kv, h), (kv, h), (h, q), (ff, h), (ff, h), (h, ff)]  # q k v o gate up down
    embeddings = [(s["vocab"], h)] + ([] if s["tied"] else [(s["vocab"], h)])  # embed_tokens, lm_head
    return layer * s["layers"], embeddings


def estimate(config) -> dict:
    """Parameter count, weight bytes per precision, KV cache bytes and weights + 2k-context totals for ``config``
    (a transformers config or anything with the same attributes)."""
    s = _shape(config)
    linears, embeddings = _matrices(s)
    n_linear = sum(r * c for r, c in linears)
    n_embed = sum(r * c for r, c in embeddings)
    n_norm = s["hidden"] * (2 * s["layers"] + 1)  # two RMSNorms per layer and the final one
    params = n_linear + n_embed + n_norm
    fp16_rest = 2 * (n_embed + n_norm)  # what bitsandbytes leaves unquantised

    def gguf(block_bytes: float) -> float:  # bytes per weight of a 32-block type, f16 where rows do not divide
        matrices = linears + embeddings
        return sum(r * c * (block_bytes / GGUF_BLOCK if c % GGUF_BLOCK == 0 else 2) for r, c in matrices) \
            + 4 * n_norm

    weights = {
        "fp32": 4 * params,
        "fp16/bf16": 2 * params,
        "int8": n_linear + 4 * sum(r for r, _ in linears) + fp16_rest,
        "int4 nf4": n_linear / 2 + n_linear / NF4_BLOCK + 4 * n_linear / (NF4_BLOCK * NF4_SCALE_BLOCK) + fp16_rest,
        "gguf f16": 2 * (n_linear + n_embed) + 4 * n_norm,
        "gguf q8_0": gguf(34),
        "gguf q4_0": gguf(18),
    }
    kv_per_token = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * 2  # K and V, fp16
    return {"shape": s, "params": params, "params_linear": n_linear, "params_embeddings": n_embed,
            "weights": weights, "kv_cache_per_token": kv_per_token,
            "kv_cache": {n: kv_per_token * n for n in KV_CONTEXTS},
            "runtime_context": RUNTIME_CONTEXT,
            "runtime": {k: v + kv_per_token * RUNTIME_CONTEXT for k, v in weights.items()}}


def training_estimate(config, batch_size: int, seq_len: int, precision: str = "fp32",
                      chunked: bool = True) -> dict:
    """Bytes a full-parameter training step adds to the loaded fp32 model, by part, for ``batch_size`` x ``seq_len``
    tokens: gradients (fp32), AdamW's two moments (fp32), the activations autograd keeps, and the logits.

    Activations: per token and layer the Llama decoder keeps its input and normed input, q/k/v (and q/k after
    RoPE), the attention output, the second residual and its norm, and gate, up, silu(gate) and their product:
    8 hidden + 4 KV + 4 intermediate values (SDPA keeps no attention matrix), in the compute precision (bf16 under
    autocast). Logits: the plain path keeps fp32 logits, their log-softmax and, in backward, their gradient, three
    [tokens, vocab] fp32 tensors at once; chunked (zhllama.linear_ce) about two chunks of those plus the head's
    fp32 gradient accumulator. Checked against measured runs (tests/model/test_memory.py)."""
    from zhllama.linear_ce import chunk_rows

    s = _shape(config)
    params = estimate(config)["params"]
    tokens = batch_size * seq_len
    kv = s["kv_heads"] * s["head_dim"]
    act_bytes = 2 if precision == "bf16" else 4
    per_token_layer = 8 * s["hidden"] + 4 * kv + 4 * s["intermediate"]
    activations = tokens * (s["layers"] * per_token_layer + 2 * s["hidden"]) * act_bytes
    if chunked:
        logits = 2 * chunk_rows(s["vocab"]) * s["vocab"] * 4 + 4 * s["vocab"] * s["hidden"]
    else:
        logits = 3 * tokens * s["vocab"] * 4
    parts = {"gradients": 4 * params, "optimizer": 8 * params, "activations": activations, "logits": logits}
    if precision == "bf16":  # autocast keeps a bf16 copy of every Linear weight for the step
        parts["bf16_weights"] = 2 * (params - s["hidden"] * (2 * s["layers"] + 1))
    return {"weights": 4 * params, **parts, "step": sum(parts.values()), "total": 4 * params + sum(parts.values())}


def load_shape_config(model_or_preset: str):
    """The config of an HF model folder, or of a preset (with its published vocabulary, else Llama-2's)."""
    from zhllama.model.presets import PRESETS, llama_config

    path = Path(model_or_preset)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ZhllamaError(f"{path} has no config.json; not a Hugging Face model folder")
        from zhllama.model.loading import load_model_config

        return load_model_config(path)
    if model_or_preset in PRESETS:
        # Llama-3 shapes come with their own 128k vocabulary; the others are sized with Llama-2's.
        return llama_config(model_or_preset, PRESETS[model_or_preset].vocab_size or PRESET_VOCAB, 1, 2)
    raise ZhllamaError(f"--model {model_or_preset!r} is neither a model folder nor a preset "
                       f"({', '.join(PRESETS)})")


def memory_report(model_or_preset: str, batch_size: int | None = None, seq_len: int = 2048) -> str:
    """The table ``zhllama model memory`` prints; with ``batch_size``, also what full training takes."""
    config = load_shape_config(model_or_preset)
    est = estimate(config)
    s = est["shape"]
    context = f"with {est['runtime_context'] // 1024}k context"
    lines = [f"{model_or_preset}: {est['params'] / 1e9:.2f}B parameters (vocab {s['vocab']:,}, hidden {s['hidden']}, "
             f"intermediate {s['intermediate']}, {s['layers']} layers, {s['heads']} heads, {s['kv_heads']} KV heads)",
             "",
             f"{'precision':<11} {'bytes/param':>11} {'weights GB':>10} {context:>18}"]
    for name in PRECISIONS:
        size = est["weights"][name]
        lines.append(f"{name:<11} {size / est['params']:>11.3f} {size / GB:>10.2f} {est['runtime'][name] / GB:>18.2f}")
    lines += ["", f"KV cache (fp16, one sequence): {est['kv_cache_per_token'] / 1024:,.0f} KiB per token"]
    lines += [f"  {n // 1024}k tokens: {size / GB:.2f} GB" for n, size in est["kv_cache"].items()]
    lines += ["", "GB = 1e9 bytes. int8/int4 = bitsandbytes on a GPU (embeddings and lm_head stay fp16); "
              "gguf = `zhllama export gguf` files.",
              f"'{context}' = weights + fp16 KV cache for {est['runtime_context']:,} tokens; the CUDA context "
              "(~0.3-0.5 GB) and activations come on top."]
    if batch_size is not None:
        lines += ["", f"Full training, AdamW, batch {batch_size} x {seq_len} tokens (GB):",
                  f"{'precision':<9} {'loss':<8} {'weights':>8} {'grads':>7} {'AdamW':>7} {'activ.':>7} {'logits':>7} "
                  f"{'total':>7}"]
        for precision in ("fp32", "bf16"):
            for chunked in (True, False):
                t = training_estimate(config, batch_size, seq_len, precision, chunked)
                lines.append(f"{precision:<9} {'chunked' if chunked else 'plain':<8} {t['weights'] / GB:>8.2f} "
                             f"{t['gradients'] / GB:>7.2f} {t['optimizer'] / GB:>7.2f} {t['activations'] / GB:>7.2f} "
                             f"{t['logits'] / GB:>7.2f} {t['total'] / GB:>7.2f}")
        lines += ["bf16 = autocast with fp32 master weights (its bf16 weight copies are in the total); the runtime "
                  "(CPU: ~0.5 GB for torch and transformers) comes on top."]
    return "\n".join(lines)
