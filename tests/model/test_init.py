import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from zhllama.artifacts import file_sha256, read_provenance
from zhllama.model.memory import estimate
from zhllama.errors import ZhllamaError
from zhllama.model import PRESETS, init_model, llama_config


def expected_params(preset, vocab: int) -> int:
    h, i, kv = preset.hidden_size, preset.intermediate_size, preset.num_key_value_heads * preset.head_dim
    attention = 2 * h * h + 2 * h * kv  # q, o full width; k, v shrink with grouped-query attention
    layer = attention + 3 * h * i + 2 * h  # gate, up, down; two RMSNorm weights
    return 2 * vocab * h + preset.num_hidden_layers * layer + h  # untied embed and lm_head; final norm


def test_presets_have_the_promised_shapes():
    assert list(PRESETS) == ["tiny", "small", "1b", "7b", "llama3-1b", "llama3-8b"]
    tiny, small, tinyllama, llama2, *_ = PRESETS.values()
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.num_hidden_layers, tiny.head_dim) == (256, 768, 4, 64)
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (512, 1536, 8)
    assert (tinyllama.hidden_size, tinyllama.intermediate_size, tinyllama.num_hidden_layers,
            tinyllama.num_attention_heads, tinyllama.num_key_value_heads) == (2048, 5632, 22, 32, 4)
    assert (llama2.hidden_size, llama2.intermediate_size, llama2.num_hidden_layers,
            llama2.max_position_embeddings) == (4096, 11008, 32, 4096)
    # The published parameter counts, as a check on the formula the tiny test relies on.
    assert expected_params(llama2, 32000) == 6_738_415_616
    assert expected_params(tinyllama, 32000) == 1_100_048_384


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_width_fits_gguf_quant_blocks(name):
    preset = PRESETS[name]
    assert preset.hidden_size % 256 == 0 and preset.intermediate_size % 256 == 0
    assert preset.hidden_size % preset.num_attention_heads == 0
    assert preset.num_attention_heads % preset.num_key_value_heads == 0


@pytest.mark.parametrize("name", list(PRESETS))
def test_llama_config_fields(name):
    preset = PRESETS[name]
    config = llama_config(name, 35008, 1, 2, pad_id=0)
    assert config.vocab_size == 35008
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.hidden_size == preset.hidden_size and config.intermediate_size == preset.intermediate_size
    assert config.num_key_value_heads == preset.num_key_value_heads
    assert config.max_position_embeddings == preset.max_position_embeddings
    if preset.rope_scaling is None:
        assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings is preset.tie_word_embeddings
    assert config.head_dim == preset.head_dim


def test_unknown_preset_names_the_choices(llama2_dir, tmp_path):
    with pytest.raises(ZhllamaError, match="tiny, small, 1b, 7b"):
        llama_config("13b", 32000, 1, 2)
    with pytest.raises(ZhllamaError, match="unknown model preset"):
        init_model("13b", llama2_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(ZhllamaError) as err:
        init_model("tiny", tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_loads_with_exact_shape(tiny_base, llama2_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == expected_params(PRESETS["tiny"], 32000) == 19_794_176
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        32000, 256, 4, 4)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.tie_word_embeddings is False
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert (tiny_base / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    assert len(tok) == 32000 and tok("你好")["input_ids"][0] == 1
    record = read_provenance(tiny_base)
    assert record["command"] == "model init" and record["args"]["preset"] == "tiny"
    assert record["inputs"]["tokenizer"] == file_sha256(llama2_dir / "tokenizer.model")
    assert record["parameters"] == 19_794_176


def test_seed_decides_the_weights(tiny_base, llama2_dir, tmp_path):
    again = load_file(init_model("tiny", llama2_dir, tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(init_model("tiny", llama2_dir, tmp_path / "other", seed=1) / "model.safetensors")
    first = load_file(tiny_base / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # Norm weights start at one whatever the seed; every matrix must differ.
    assert all(not torch.equal(first[k], other[k]) for k in first if first[k].dim() == 2)


def test_init_leaves_the_callers_random_state_alone(llama2_dir, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_model("tiny", llama2_dir, tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(("name", "factor", "tied", "params"), [
    ("llama3-1b", 32.0, True, 1_235_814_400),  # Llama-3.2-1B's published 1.24B
    ("llama3-8b", 8.0, False, 8_030_261_248),  # Llama-3.1-8B's published 8.03B
])
def test_llama3_presets_have_the_published_shapes(name, factor, tied, params):
    config = llama_config(name, 128_256, 128000, 128001)
    assert config.rope_parameters == {**LLAMA3_ROPE, "factor": factor}
    assert config.max_position_embeddings == 131_072 and config.tie_word_embeddings is tied
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert config.head_dim == config.hidden_size // 32
    assert estimate(config)["params"] == params
    # The meta device builds the module tree without memory: the count transformers itself gives agrees.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params


def test_llama3_preset_rotary_frequencies():
    """Llama 3.1 scaling on a real (small) build: wavelengths over 8192 tokens divided by the factor, under 2048
    kept, the band between interpolated."""
    config = llama_config("llama3-1b", 64, 1, 2)  # the preset's RoPE and tying on a 1-layer, 256-wide body
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 256, 1
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    model = LlamaForCausalLM(config)
    inv_freq = model.model.rotary_emb.inv_freq
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    wavelength = 2 * torch.pi / base
    assert torch.allclose(inv_freq[wavelength < 2048], base[wavelength < 2048])
    assert torch.allclose(inv_freq[wavelength > 8192], base[wavelength > 8192] / 32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_tiny_model_with_llama3_vocabulary(tiny_llama3, llama3_hf):
    """The tiny preset at 128k tokens: the embedding and output matrices are 65M of its 69M parameters (263 MB in
    fp32), which a CPU initialises and saves in seconds."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3))
    vocab = len(AutoTokenizer.from_pretrained(str(llama3_hf)))
    assert model.config.vocab_size == vocab and vocab > 65536
    assert model.get_input_embeddings().weight.shape == (vocab, 256)
    assert sum(p.numel() for p in model.parameters()) == expected_params(PRESETS["tiny"], vocab)
    assert read_provenance(tiny_llama3)["inputs"]["tokenizer"] == file_sha256(llama3_hf / "tokenizer.json")
    ids = AutoTokenizer.from_pretrained(str(tiny_llama3))("中国人工智能", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], vocab)
