"""convert_meta: a tiny HF model written out in Meta's format (one shard and two) converts back exactly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from zhllama.artifacts import read_provenance
from zhllama.errors import ZhllamaError
from zhllama.model.meta import convert_meta, permute, unpermute

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 256, 2, 4, 2, 512, 32_000
HEAD_DIM = HIDDEN // HEADS
THETA, EPS = 10_000.0, 1e-5
SEQUENCES = [[1, 15043, 3186], [1, 450, 4996, 17354, 1701, 29916, 432, 17204], [1, 2, 3, 29871, 31999]]


@pytest.fixture(scope="module")
def hf_model():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": THETA}, rms_norm_eps=EPS,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
        # Norm weights start at 1; make them random so a mix-up between norms would show.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    return model.eval()


def meta_state(model) -> dict[str, torch.Tensor]:
    """The HF model's weights under Meta's names, with wq/wk rows back in Meta's interleaved order."""
    sd = model.state_dict()
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
        "rope.freqs": torch.ones(HEAD_DIM // 2),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = unpermute(sd[p + "self_attn.q_proj.weight"], HEADS, HIDDEN, HIDDEN)
        out[f"layers.{i}.attention.wk.weight"] = unpermute(sd[p + "self_attn.k_proj.weight"], KV_HEADS,
                                                           KV_HEADS * HEAD_DIM, HIDDEN)
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def split(name: str, w: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Meta's model-parallel layout."""
    if name.endswith(("norm.weight",)) or name == "rope.freqs":
        return [w.clone() for _ in range(n)]
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        dim = 1
    else:
        dim = 0
    return [c.clone().contiguous() for c in torch.chunk(w, n, dim=dim)]


def write_meta(folder, state, n_shards, llama2_dir, vocab_size=-1, tokenizer_in_parent=False):
    folder.mkdir(parents=True)
    for s in range(n_shards):
        shard = {k: split(k, v, n_shards)[s] for k, v in state.items()}
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
              "vocab_size": vocab_size, "multiple_of": 256, "norm_eps": EPS, "rope_theta": THETA}
    (folder / "params.json").write_text(json.dumps(params))
    tok_dest = (folder.parent if tokenizer_in_parent else folder) / "tokenizer.model"
    shutil.copy(llama2_dir / "tokenizer.model", tok_dest)
    return folder


@pytest.fixture(scope="module")
def meta_dirs(tmp_path_factory, hf_model, llama2_dir):
    root = tmp_path_factory.mktemp("meta")
    state = meta_state(hf_model)
    one = write_meta(root / "one" / "7B", state, 1, llama2_dir, tokenizer_in_parent=True)
    two = write_meta(root / "two", state, 2, llama2_dir, vocab_size=VOCAB)
    return one, two, state


@pytest.fixture(scope="module")
def converted(tmp_path_factory, meta_dirs):
    one, two, _ = meta_dirs
    root = tmp_path_factory.mktemp("converted")
    return convert_meta(one, root / "hf-one"), convert_meta(two, root / "hf-two")


def test_permutation_inverse_is_identity():
    for heads, rows in ((HEADS, HIDDEN), (KV_HEADS, KV_HEADS * HEAD_DIM)):
        w = torch.randn(rows, HIDDEN)
        assert torch.equal(permute(unpermute(w, heads, rows, HIDDEN), heads, rows, HIDDEN), w)
        assert torch.equal(unpermute(permute(w, heads, rows, HIDDEN), heads, rows, HIDDEN), w)
        assert not torch.equal(permute(w, heads, rows, HIDDEN), w)


def test_shards_concatenate_to_the_whole(meta_dirs):
    _, two, state = meta_dirs
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(two.glob("*.pth"))]
    assert len(shards) == 2
    assert shards[0]["layers.0.attention.wk.weight"].shape == (HEAD_DIM, HIDDEN)  # one KV head each
    assert shards[0]["tok_embeddings.weight"].shape == (VOCAB, HIDDEN // 2)


def test_logits_match_the_original(hf_model, converted):
    for folder in converted:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        assert model.config.intermediate_size == INTER
        assert model.config.num_key_value_heads == KV_HEADS
        assert model.config.rope_parameters["rope_theta"] == THETA
        assert model.config.max_position_embeddings == 4096  # Llama-2's default: params.json has no max_seq_len
        assert not model.config.tie_word_embeddings
        with torch.no_grad():
            for ids in SEQUENCES:
                x = torch.tensor([ids])
                torch.testing.assert_close(model(x).logits, hf_model(x).logits, atol=1e-5, rtol=0)


def test_tokenizer_and_provenance(converted):
    for folder in converted:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert tok("Hello world")["input_ids"] == [1, 15043, 3186]
        record = read_provenance(folder)
        assert record["command"] == "convert meta"
        assert set(record["inputs"]) == {"params", "tokenizer"}
        assert all(len(v) == 64 for v in record["inputs"].values())


def test_two_shards_give_the_same_weights(converted):
    a, b = (load_file(folder / "model.safetensors") for folder in converted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# Meta's llama/model.py, verbatim in substance: rotary as complex multiplication of interleaved pairs.
def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def meta_apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    shape = [d if i == 1 or i == xq_.ndim - 1 else 1 for i, d in enumerate(xq_.shape)]
    freqs_cis = freqs_cis.view(*shape)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def test_permutation_matches_metas_rotary(meta_dirs, converted):
    """First-layer q.k scores: Meta's complex rotary on Meta's wq/wk equal HF's rotate_half on converted weights."""
    _, _, state = meta_dirs
    ids = torch.tensor([[1, 15043, 3186, 29892, 920]])
    seq = ids.shape[1]
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)  # noqa: E731

    # Meta side: (batch, seq, heads, head_dim), as in Meta's Attention.forward.
    h = rms(state["tok_embeddings.weight"][ids]) * state["layers.0.attention_norm.weight"]
    xq = (h @ state["layers.0.attention.wq.weight"].T).view(1, seq, HEADS, HEAD_DIM)
    xk = (h @ state["layers.0.attention.wk.weight"].T).view(1, seq, KV_HEADS, HEAD_DIM)
    xq, xk = meta_apply_rotary_emb(xq, xk, precompute_freqs_cis(HEAD_DIM, seq, THETA))
    xk = xk.repeat_interleave(HEADS // KV_HEADS, dim=2)
    meta_scores = torch.einsum("bqhd,bkhd->bhqk", xq, xk)

    # HF side: the converted weights, transformers' own rotary embedding and apply_rotary_pos_emb.
    model = AutoModelForCausalLM.from_pretrained(converted[0], local_files_only=True).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        q = layer.self_attn.q_proj(x).view(1, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(1, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(seq)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        hf_scores = q @ k.transpose(-1, -2)

    torch.testing.assert_close(hf_scores, meta_scores, atol=1e-4, rtol=1e-5)
    # Without the permutation the scores would differ (positions > 0 rotate different pairs).
    q_raw = (h @ state["layers.0.attention.wq.weight"].T).view(1, seq, HEADS, HEAD_DIM).transpose(1, 2)
    k_raw = (h @ state["layers.0.attention.wk.weight"].T).view(1, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q_raw, k_raw = apply_rotary_pos_emb(q_raw, k_raw, cos, sin)
    wrong = q_raw @ k_raw.repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(-1, -2)
    assert not torch.allclose(wrong, meta_scores, atol=1e-2)


def test_missing_params_leaves_no_output(tmp_path, meta_dirs):
    one, _, _ = meta_dirs
    src = tmp_path / "src"
    shutil.copytree(one, src)
    shutil.copy(one.parent / "tokenizer.model", src / "tokenizer.model")
    (src / "params.json").unlink()
    with pytest.raises(ZhllamaError, match="params.json"):
        convert_meta(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_vocab_mismatch_names_both_sizes(tmp_path, meta_dirs):
    one, _, _ = meta_dirs
    src = tmp_path / "src"
    shutil.copytree(one, src)
    shutil.copy(one.parent / "tokenizer.model", src / "tokenizer.model")
    params = json.loads((src / "params.json").read_text())
    params["vocab_size"] = 32_001
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(ZhllamaError, match=r"32001.*32000") as info:
        convert_meta(src, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_missing_shards_and_tokenizer(tmp_path, meta_dirs):
    one, _, _ = meta_dirs
    src = tmp_path / "src"
    shutil.copytree(one, src)  # the tokenizer stays behind in one's parent
    with pytest.raises(ZhllamaError, match="tokenizer.model"):
        convert_meta(src, tmp_path / "out")
    for p in src.glob("*.pth"):
        p.unlink()
    with pytest.raises(ZhllamaError, match=r"consolidated"):
        convert_meta(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, meta_dirs):
    _, two, _ = meta_dirs
    src = tmp_path / "src"
    shutil.copytree(two, src)
    params = json.loads((src / "params.json").read_text())
    params["n_kv_heads"] = HEADS  # the checkpoint has 2 KV heads
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(ZhllamaError, match=r"layers\.0\.attention\.wk\.weight.*\(128, 256\).*\(256, 256\)"):
        convert_meta(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_meta_command_line(tmp_path, meta_dirs):
    from tests.test_cli import run

    one, _, _ = meta_dirs
    result = run("convert", "meta", "--input", one, "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "tokenizer.json").exists()


def test_a_shard_holding_code_is_refused_without_suggesting_the_unsafe_retry(tmp_path, capsys, meta_dirs):
    import argparse

    from tests.test_cli import assert_one_line_error, run_in_process

    _, two, _ = meta_dirs
    src = tmp_path / "src"
    shutil.copytree(two, src)
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    torch.save({**shard, "args": argparse.Namespace(lr=1)}, src / "consolidated.01.pth")  # a pickled object
    result = run_in_process(capsys, "convert", "meta", "--input", src, "--out", tmp_path / "out")
    assert_one_line_error(result, f"{src / 'consolidated.01.pth'}: holds code or Python objects that are not "
                                  "weights (it refers to argparse.Namespace)")
    assert "weights_only" not in result.stderr and "succeed" not in result.stderr
    assert not (tmp_path / "out").exists()
