"""RoPE scaling: stretch a model's context by setting ``config.rope_parameters`` before the weights load.

transformers 5 reads RoPE settings only from ``config.rope_parameters`` (``rope_theta`` moved in there and
``rope_scaling`` is a deprecated alias), so this is the one place that writes it. Setting it on the config, not on
a loaded model, matters: the rotary embedding computes its frequencies when the model is built, and the config is
what ``save_pretrained`` writes, so a model trained with scaling keeps it.

- linear: positions divided by the factor (position interpolation); the context grows by the factor.
- dynamic: NTK-aware base change that starts only once a sequence passes ``max_position_embeddings``, so that
  stays the trained context (it is the threshold dynamic scaling measures against).
- yarn: NTK-by-parts interpolation plus an attention temperature; needs the trained context as
  ``original_max_position_embeddings``.
- llama3: Llama 3.1's wavelength-banded interpolation (high frequencies kept, low ones divided by the factor);
  needs ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``.
"""

from __future__ import annotations

from zhllama.errors import ZhllamaError

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
# Llama 3.1's published values: wavelengths shorter than context/4 are untouched, longer than context/1 scaled.
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0


def scale_rope(config, rope: str | None, factor: float | None):
    """``config`` with RoPE scaling set the transformers 5 way (in place, and returned); no rope is a no-op."""
    if rope is None and factor is None:
        return config
    if rope is None or factor is None:
        raise ZhllamaError("--rope and --rope-factor go together (e.g. --rope linear --rope-factor 2)")
    if rope not in ROPE_TYPES:
        raise ZhllamaError(f"--rope must be one of {', '.join(ROPE_TYPES)}, got {rope!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ZhllamaError(f"a RoPE factor of 1 or less does not extend the context: --rope-factor must be "
                           f"greater than 1, got {factor}")
    current = dict(getattr(config, "rope_parameters", None) or {})
    if current.get("rope_type", "default") != "default":
        raise ZhllamaError(f"the model already uses {current['rope_type']} RoPE scaling (factor "
                           f"{current.get('factor', '?')}); --rope would stack on it")
    theta = current.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    trained = int(config.max_position_embeddings)
    parameters = {"rope_type": rope, "factor": float(factor), "rope_theta": theta}
    if rope in ("yarn", "llama3"):
        parameters["original_max_position_embeddings"] = trained
    if rope == "llama3":
        parameters["low_freq_factor"] = LLAMA3_LOW_FREQ_FACTOR
        parameters["high_freq_factor"] = LLAMA3_HIGH_FREQ_FACTOR
    if "partial_rotary_factor" in current:
        parameters["partial_rotary_factor"] = current["partial_rotary_factor"]
    config.rope_parameters = parameters
    if rope != "dynamic":
        config.max_position_embeddings = int(trained * factor)
    return config



def scaled_config(model_dir, rope: str | None, factor: float | None):
    """The model's config with RoPE scaling applied, to pass as ``config=`` when loading; None without scaling.

    The rotary embedding takes its frequencies from the config when the model is built, so scaling must come
    before the weights load.
    """
    if rope is None and factor is None:
        return None
    from zhllama.model.loading import load_model_config

    return scale_rope(load_model_config(model_dir), rope, factor)
