"""FSDP2 and DeepSpeed ZeRO-2/3 on two CPU processes over gloo, launched as a user launches them: `accelerate
launch --config_file` with the shipped engine config. Each must follow the one-process loss curve, write the same
final weights, and resume a killed run exactly. The model is one whose vocabulary `model extend-vocab` grew."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.train.test_pretrain import small_cfg, train_losses, weights
from tests.train.test_sft import SEQ_LEN as SFT_SEQ_LEN
from tests.train.test_sft import cfg_for, sft_file  # noqa: F401  (sft_file is a fixture)
from zhllama.config import TrainConfig
from zhllama.errors import ZhllamaError
from zhllama.config import recipe_path
from zhllama.train import engine, pretrain, sft
from zhllama.train.loop import resolve_precision

ENGINES = {"fsdp": "accelerate_fsdp", "zero2": "accelerate_deepspeed_zero2", "zero3": "accelerate_deepspeed_zero3"}
STEPS = 10


def deepspeed_path() -> str | None:
    """Where `make setup` put DeepSpeed (an optional extra, kept off the main environment's path)."""
    extra = Path(sys.prefix) / "extras" / "deepspeed"
    return str(extra) if (extra / "deepspeed").is_dir() else None


def needs_engine(name):
    if name != "fsdp" and deepspeed_path() is None:
        pytest.skip("DeepSpeed is not installed (make setup puts it in .venv/extras/deepspeed)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name, model, data, out, *flags):
    """The command line of a 2-process pretraining run under engine `name`, fp32, global batch 4."""
    recipe = out.with_name(out.name + ".yaml")
    recipe.write_text("warmup_steps: 2\nlog_every: 1\neval_batches: 2\n")
    return accelerate_command(name, "pretrain", "--model", model, "--data", data, "--out", out, "--max-steps", STEPS,
                              "--batch-size", 2, "--lr", "2e-3", "--save-every", 4, "--eval-every", 5, "--seed", 0,
                              "--config", recipe, *flags)


def accelerate_command(name, command, *args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe_path(ENGINES[name])),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "zhllama", "train", command, *map(str, args)]
    paths = [p for p in (deepspeed_path(), os.environ.get("PYTHONPATH")) if p]
    # ninja (for DeepSpeed's CPU communication op) comes with the extra when the system has none.
    bins = [str(Path(p) / "bin") for p in paths[:1] if deepspeed_path()] + [os.environ["PATH"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths), "PATH": os.pathsep.join(bins)}
    return cmd, env


def run_command(cmd, env):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def run_engine(name, model, data, out, *flags):
    return run_command(*launch(name, model, data, out, *flags))


@pytest.fixture(scope="module")
def one_process(extended_model, packed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "one"
    return pretrain(extended_model, packed_dir, out, small_cfg(max_steps=STEPS, batch_size=4, save_every=4,
                                                               eval_every=5))


@pytest.fixture(scope="module")
def engine_runs(extended_model, packed_dir, tmp_path_factory):
    """One uninterrupted 2-process run per engine, made on first use."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp("engines") / name
            run_engine(name, extended_model, packed_dir, runs[name])
        return runs[name]

    return get


@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_follows_the_one_process_curve_and_saves_the_whole_weights(name, engine_runs, one_process):
    needs_engine(name)
    run = engine_runs(name)
    ref, got = train_losses(one_process), train_losses(run)
    assert len(got) == STEPS
    diff = max(abs(a - b) for a, b in zip(ref, got, strict=True))
    print(f"{name}: max |loss difference| against one process over {STEPS} steps: {diff:.2e}")
    assert diff <= 1e-4
    expected, written = weights(one_process), weights(run)
    assert set(written) == set(expected)
    body, rows, rare = weight_differences(expected, written)
    print(f"{name}: final/ against one process: body max |difference| {body:.2e}; embeddings max {rows:.2e}, "
          f"{rare:.1e} of their entries beyond 1e-5")
    assert body <= 2e-5
    # AdamW divides by the root of the squared gradient: rows of tokens seen once or twice get gradients so small
    # that the engines' different reduction orders show, in about one entry in 100,000 (DDP too: see the note).
    assert rows <= 5e-3 and rare <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    assert model.get_input_embeddings().weight.shape[0] == 34_000  # the extended vocabulary, not resized


@pytest.mark.parametrize("name", list(ENGINES))
def test_killed_engine_run_resumes_to_the_same_weights(name, engine_runs, extended_model, packed_dir, tmp_path):
    needs_engine(name)
    reference = engine_runs(name)
    run = tmp_path / "killed"
    cmd, env = launch(name, extended_model, packed_dir, run)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    kill_tree(proc)
    assert not (run / "final").exists()
    done = run_engine(name, extended_model, packed_dir, run, "--resume")
    assert "resuming from" in done.stderr
    ref, got = weights(reference), weights(run)
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    print(f"{name}: killed at step >= 4 and resumed: max |weight difference| against the uninterrupted run: "
          f"{worst:.2e}")
    assert worst == 0.0
    assert train_losses(run) == train_losses(reference)


def kill_tree(proc) -> None:
    """SIGKILL the launcher and every worker under it, as a crash of the machine would: torchrun starts its workers
    in sessions of their own, so killing the launcher's process group would leave them running."""
    import psutil

    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()


def weight_differences(a: dict, b: dict) -> tuple[float, float, float]:
    """Max |difference| of the body, of the embedding matrices, and the share of embedding entries beyond 1e-5."""
    embeddings = [k for k in a if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    body = max(float((a[k] - b[k]).abs().max()) for k in a if k not in embeddings)
    diffs = [(a[k] - b[k]).abs() for k in embeddings]
    rare = sum(int((d > 1e-5).sum()) for d in diffs) / sum(d.numel() for d in diffs)
    return body, max(float(d.max()) for d in diffs), rare


def fake_accelerator(kind: str, world: int = 2, stage: int = 0):
    from accelerate import DistributedType

    return SimpleNamespace(distributed_type=getattr(DistributedType, kind), num_processes=world,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))


def test_resume_under_another_engine_or_world_size_is_refused(tmp_path):
    with pytest.raises(ZhllamaError, match="written by ddp on 2 process.*this run is fsdp on 2"):
        engine.check_resume(tmp_path, {"step": 4, "world_size": 2}, fake_accelerator("FSDP"))
    with pytest.raises(ZhllamaError, match="written by deepspeed-zero3 on 4 process.*this run is deepspeed-zero3 on 2"):
        engine.check_resume(tmp_path, {"step": 4, "world_size": 4, "engine": "deepspeed-zero3"},
                            fake_accelerator("DEEPSPEED", stage=3))
    engine.check_resume(tmp_path, {"step": 4, "world_size": 2, "engine": "fsdp"}, fake_accelerator("FSDP"))


@pytest.mark.parametrize("mode", ["lora", "new-rows"])
def test_modes_that_need_whole_weights_are_refused_under_sharding(mode):
    with pytest.raises(ZhllamaError, match=f"--trainable {mode} is not supported under fsdp"):
        engine.configure(fake_accelerator("FSDP"), TrainConfig(trainable=mode))


def test_deepspeed_config_that_disagrees_is_refused_and_auto_is_filled():
    acc = fake_accelerator("DEEPSPEED", stage=3)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 3}}
    acc.state.deepspeed_plugin.deepspeed_config = ds
    engine.configure(acc, TrainConfig(batch_size=3, grad_accum=2, grad_clip=0.5))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    ds["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(ZhllamaError, match="train_micro_batch_size_per_gpu 8 in the DeepSpeed config disagrees with "
                                           "--batch-size 3"):
        engine.configure(acc, TrainConfig(batch_size=3, grad_accum=2, grad_clip=0.5))
    acc.state.deepspeed_plugin.deepspeed_config = {"optimizer": {"type": "Adam"}}
    with pytest.raises(ZhllamaError, match="sets its own optimizer"):
        engine.configure(acc, TrainConfig())


def test_precision_comes_from_the_launch_config_and_a_disagreement_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision("auto") == "bf16" and resolve_precision("bf16") == "bf16"
    with pytest.raises(ZhllamaError, match="--precision fp32 disagrees with the accelerate launch config "
                                           r"\(mixed_precision bf16\)"):
        resolve_precision("fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ZhllamaError, match="mixed_precision fp16 .* is not supported"):
        resolve_precision("auto")


def test_training_never_resizes_the_embeddings():
    from zhllama.train.loop import _check_vocab_unchanged

    state = {"model.embed_tokens.weight": torch.zeros(34_000, 4)}
    _check_vocab_unchanged(34_000, None, state)
    with pytest.raises(ZhllamaError, match="the embeddings changed from 32,000 to 34,000 rows during training"):
        _check_vocab_unchanged(32_000, None, state)


def test_sft_under_zero3_follows_the_one_process_curve(tiny_zh_model, sft_file, tmp_path):  # noqa: F811
    needs_engine("zero3")
    one = sft(tiny_zh_model, [sft_file], tmp_path / "one", cfg_for(max_steps=4, batch_size=4))
    (tmp_path / "r.yaml").write_text("warmup_steps: 1\nlog_every: 1\neval_batches: 2\nval_fraction: 0.0\n"
                                     "save_every: 100\neval_every: 100\n")
    run_command(*accelerate_command("zero3", "sft", "--model", tiny_zh_model, "--data", sft_file, "--template",
                                    "atom", "--out", tmp_path / "two", "--max-steps", 4, "--batch-size", 2, "--lr",
                                    "2e-3", "--seq-len", SFT_SEQ_LEN, "--seed", 0, "--config", tmp_path / "r.yaml"))
    diff = max(abs(a - b) for a, b in zip(train_losses(one), train_losses(tmp_path / "two"), strict=True))
    print(f"sft under zero3: max |loss difference| against one process over 4 steps: {diff:.2e}")
    assert diff <= 1e-4
    assert (tmp_path / "two" / "final" / "chat_template.jinja").is_file()


def test_deepspeed_files_are_unpickled_only_if_this_run_wrote_them(tmp_path):
    (tmp_path / "engine" / "state").mkdir(parents=True)
    part = tmp_path / "engine" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    part.write_bytes(b"written by the run")
    state = {"engine_files": engine.engine_file_hashes(tmp_path)}
    part.write_bytes(b"replaced afterwards")
    with pytest.raises(ZhllamaError, match="not the ones this run wrote"):
        engine.restore_sharded(fake_accelerator("DEEPSPEED", stage=2), None, None, {"state": state}, tmp_path)
