"""Memory estimates (zhllama.model.memory) against figures computed here by hand and against real file sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig

from zhllama.errors import ZhllamaError
from zhllama.model.memory import estimate, memory_report

V, H, I, L = 32_000, 4096, 11_008, 32  # Llama-2-7B  # noqa: E741
LLAMA2_7B = SimpleNamespace(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                            num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
PARAMS = 2 * V * H + L * (4 * H * H + 3 * H * I + 2 * H) + H  # embeddings + lm_head, layers, final norm
EMBED = 2 * V * H
# Llama-2-7B GGUF files as published (TheBloke/Llama-2-7B-GGUF), in bytes; llama.cpp's q4_0 keeps output in q6_K
GGUF_FILES = {"gguf f16": 13.48e9, "gguf q8_0": 7.16e9, "gguf q4_0": 3.83e9}


def within(value, expected, share=0.10):
    return abs(value - expected) <= share * expected


def test_7b_parameter_count():
    est = estimate(LLAMA2_7B)
    assert est["params"] == PARAMS == 6_738_415_616
    assert est["params_embeddings"] == EMBED


@pytest.mark.parametrize("name, expected", [
    ("fp32", PARAMS * 4),
    ("fp16/bf16", PARAMS * 2),
    ("int8", (PARAMS - EMBED) * 1 + EMBED * 2),  # Linear weights int8, embeddings and lm_head fp16
    ("int4 nf4", (PARAMS - EMBED) * (0.5 + 1 / 64) + EMBED * 2),  # 4 bits + an 8-bit absmax per 64
    ("gguf f16", PARAMS * 2),
    ("gguf q8_0", PARAMS * 34 / 32),
    ("gguf q4_0", PARAMS * 18 / 32),
])
def test_7b_weights_match_hand_figures(name, expected):
    assert within(estimate(LLAMA2_7B)["weights"][name], expected)


def test_7b_matches_published_sizes():
    weights = estimate(LLAMA2_7B)["weights"]
    for name, size in GGUF_FILES.items():
        assert within(weights[name], size), name
    assert within(weights["int8"], 7.0e9) and within(weights["int4 nf4"], 3.9e9)


def test_7b_kv_cache_and_runtime():
    est = estimate(LLAMA2_7B)
    assert est["kv_cache_per_token"] == 2 * L * 32 * 128 * 2 == 512 * 1024
    assert est["kv_cache"][4096] == 4096 * 512 * 1024
    # weights + a 2k fp16 cache: the "about 8 GB" (int8) and "about 5 GB" (int4) a 7B model needs on a GPU
    assert within(est["runtime"]["int8"], 8e9) and within(est["runtime"]["int4 nf4"], 5e9)


def test_grouped_query_attention_and_tied_embeddings():
    config = LlamaConfig(vocab_size=1000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=True)
    est = estimate(config)
    q, kv = 2048 * 2048, 2048 * 256
    assert est["params"] == 1000 * 2048 + 22 * (2 * q + 2 * kv + 3 * 2048 * 5632 + 2 * 2048) + 2048
    assert est["kv_cache_per_token"] == 2 * 22 * 4 * 64 * 2


def test_report_for_a_folder_and_a_bad_name(tmp_path):
    LlamaConfig(vocab_size=35_008, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4).save_pretrained(tmp_path)
    report = memory_report(str(tmp_path))
    assert "vocab 35,008" in report and "gguf q4_0" in report
    with pytest.raises(ZhllamaError, match="neither a model folder nor a preset"):
        memory_report("13b")


def test_cli_prints_the_table_for_the_7b_preset():
    result = subprocess.run([sys.executable, "-m", "zhllama", "model", "memory", "--model", "7b"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "6.74B parameters" in out and "KV cache" in out
    weights_gb = {line[:11].strip(): float(line.split()[-2]) for line in out.splitlines()
                  if line.startswith(("fp", "int", "gguf"))}  # name, bytes/param, weights GB, with 2k context
    assert weights_gb["gguf q4_0"] == pytest.approx(3.79, abs=0.01)
    assert weights_gb["int8"] == pytest.approx(7.01, abs=0.01) and weights_gb["fp16/bf16"] == pytest.approx(13.48)


def test_llama3_presets_are_sized_with_their_own_vocabulary():
    assert memory_report("llama3-1b").startswith("llama3-1b: 1.24B parameters (vocab 128,256,")
    assert memory_report("llama3-8b").startswith("llama3-8b: 8.03B parameters (vocab 128,256,")
    assert "(vocab 32,000," in memory_report("7b")  # the Llama-2 shapes keep Llama-2's vocabulary


MEASURE = """
import json, sys, threading, time
from pathlib import Path
import psutil
from zhllama.config import TrainConfig
from zhllama.train.loop import train_loop
from zhllama.train.pretrain import PackedTrainData
from zhllama.train.run import load_for_training

model_dir, packed, out, chunked = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
model = load_for_training(Path(model_dir), 256)
data = PackedTrainData(Path(packed), 256)
process = psutil.Process()
before, peak, running = process.memory_info().rss, [0], [True]


def sample():  # the resident size while training runs, not the process's lifetime peak (ru_maxrss)
    while running[0]:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.005)


watcher = threading.Thread(target=sample)
watcher.start()
cfg = TrainConfig(max_steps=3, batch_size=8, seq_len=256, precision="fp32", warmup_steps=1, save_every=100,
                  eval_every=100, eval_batches=1, log_every=1, chunked_loss=chunked)
train_loop(model, data, cfg, Path(out), resume=False)
running[0] = False
watcher.join()
print(json.dumps({"before": before, "peak": peak[0]}))
"""


@pytest.mark.parametrize("chunked", [True, False])
def test_training_estimate_is_within_20_percent_of_a_measured_run(tiny_zh_model, extended_dir, zh_train_file,
                                                                   tmp_path, chunked):
    """What `train pretrain` adds to the loaded model (peak RSS of the run minus RSS before it), against the
    estimate, for the tiny model with its 34k vocabulary, batch 8 x 256, with and without the chunked loss."""
    import json

    from zhllama.data.pack import pack
    from zhllama.model.loading import load_model_config
    from zhllama.model.memory import training_estimate

    packed = pack(extended_dir, [zh_train_file], 256, tmp_path / "packed", val_fraction=0.05)
    # A clean environment: nothing an earlier test left in os.environ changes what the run allocates.
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR") if key in os.environ}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_zh_model), str(packed), str(tmp_path / "run"),
                           "1" if chunked else "0"], capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    increase = measured["peak"] - measured["before"]
    estimated = training_estimate(load_model_config(tiny_zh_model), 8, 256, "fp32", chunked)["step"]
    assert abs(estimated / increase - 1) < 0.2, (estimated / 2**20, increase / 2**20)
