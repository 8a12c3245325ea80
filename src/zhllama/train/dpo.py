"""`train dpo`: preference pairs in, through the same loop as pretraining and SFT, an aligned chat model out.

The pairs are read (LLaMA-Factory's preference format, Alpaca-style chosen/rejected), rendered with the chat
template exactly as SFT renders them, and only the final reply's tokens count. For DPO the reference model's
log-probabilities are computed once with the starting model and stored in the run folder
(`reference_logps.safetensors`), so training holds one model and a resumed run reuses them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zhllama import scoring
from zhllama.artifacts import atomic_file, file_sha256, make_dir, write_json_atomic, write_provenance
from zhllama.config import DpoConfig, to_dict
from zhllama.errors import ZhllamaError
from zhllama.model.loading import check_model_vocab, load_tokenizer, tokenizer_sha256
from zhllama.runs import latest_checkpoint
from zhllama.train.loop import resolve_precision, train_loop, val_index_batches
from zhllama.train.preference import PreferenceObjective, check_loss_settings
from zhllama.train.run import base_vocab_size, check_run_dir, finish_run, load_for_training
from zhllama.train.sft import split_conversations
from zhllama.train.trainable import check_qlora_available, prepare_trainable

REFERENCE_FILE = "reference_logps.safetensors"


class PreferenceTrainData:
    """Pairs as the loop wants them: a batch of B pairs is 2B rows, chosen first, with the pairs' reference
    log-probabilities (DPO) as `ref_chosen`/`ref_rejected`."""

    def __init__(self, train, val, pad_id: int, reference: np.ndarray | None = None,
                 train_ids: list[int] | None = None, val_ids: list[int] | None = None):
        self.train, self.val, self.pad_id = train, val, pad_id
        self.ref_train = None if reference is None else reference[:, train_ids]
        self.ref_val = None if reference is None or val is None else reference[:, val_ids]

    def num_train(self) -> int:
        return len(self.train)

    def sample_tokens(self) -> np.ndarray:
        return self.train.lengths()

    def train_batch(self, samples: list[int]) -> dict[str, torch.Tensor]:
        return pair_batch(self.train, samples, self.pad_id, self.ref_train)

    def val_batches(self, batch_size: int, limit: int, rank: int, world: int):
        if self.val is None or len(self.val) == 0:
            return []
        return [pair_batch(self.val, ids, self.pad_id, self.ref_val)
                for ids in val_index_batches(len(self.val), batch_size, limit, rank, world)]


def pair_batch(examples, ids: list[int], pad_id: int, reference: np.ndarray | None = None) -> dict:
    """The chosen rows of the pairs `ids`, then their rejected rows, padded as SFT rows are (data/sft_batches)."""
    from zhllama.data.sft_batches import SftExamples, collate

    sides = SftExamples([examples.chosen_ids[i] for i in ids] + [examples.rejected_ids[i] for i in ids],
                        [examples.chosen_labels[i] for i in ids] + [examples.rejected_labels[i] for i in ids])
    batch = collate(sides, [[i] for i in range(2 * len(ids))], pad_id)
    if reference is not None:
        batch["ref_chosen"] = torch.from_numpy(reference[0, ids].astype(np.float32))
        batch["ref_rejected"] = torch.from_numpy(reference[1, ids].astype(np.float32))
    return batch


@torch.no_grad()
def reference_logps(model, examples, pad_id: int, batch_size: int, precision: str,
                    progress: bool = True) -> np.ndarray:
    """(2, pairs) summed log-probabilities of the chosen and rejected replies under `model` as it is now (with
    LoRA: the base, adapters disabled), in the precision training runs at."""
    from zhllama.train.preference import reply_logps

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    out = np.zeros((2, len(examples)), dtype=np.float64)
    base_only = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    autocast = torch.autocast(device.type if device else "cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with base_only, autocast:
        for start in tqdm(range(0, len(examples), batch_size), desc="reference log-probabilities",
                          disable=not progress or None, leave=False):
            ids = list(range(start, min(start + batch_size, len(examples))))
            batch = {k: v.to(device) if device else v for k, v in pair_batch(examples, ids, pad_id).items()}
            chosen, rejected, _, _ = reply_logps(model, batch)
            out[0, ids], out[1, ids] = chosen.double().cpu().numpy(), rejected.double().cpu().numpy()
    model.train(was_training)
    return out


def pairs_sha256(examples) -> str:
    digest = hashlib.sha256()
    for side in (examples.chosen_ids, examples.chosen_labels, examples.rejected_ids, examples.rejected_labels):
        for array in side:
            digest.update(np.asarray(array, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def stored_reference(run_dir: Path, model, examples, pad_id: int, cfg: DpoConfig, progress: bool) -> np.ndarray:
    """The run's reference log-probabilities: read back when the run folder holds them for these very pairs
    (a resumed run), else computed with the starting model and written (by the main process)."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    path, key = run_dir / REFERENCE_FILE, pairs_sha256(examples)
    if path.is_file():
        with safe_open(str(path), "np") as fh:
            same = (fh.metadata() or {}).get("pairs_sha256") == key
        if same:
            return load_file(str(path))["logps"]
        print(f"warning: {path} was computed for other pairs; computing it again", file=sys.stderr)
    logps = reference_logps(model, examples, pad_id, cfg.batch_size, resolve_precision(cfg.precision), progress)
    if int(os.environ.get("RANK", 0)) == 0:
        with atomic_file(path) as tmp:
            save_file({"logps": logps}, str(tmp), metadata={"pairs_sha256": key})
    return logps


def prepare_preference_data(model_dir: Path, data: list[str | Path], cfg: DpoConfig, progress: bool = True):
    """Read, template, tokenize and split the pairs; returns (examples, train ids, val ids, report dict)."""
    from zhllama.chat import get_template
    from zhllama.data.preference import read_preference_pairs, skip_kind, tokenize_pairs
    from zhllama.data.readers import ReadReport

    if not cfg.template:
        raise ZhllamaError("preference training needs a chat template: pass --template (atom, llama2, chatml or "
                           "llama3, as the SFT used) or set it in the recipe")
    template = get_template(cfg.template)
    if not cfg.seq_len or cfg.seq_len < 8:
        raise ZhllamaError(f"seq_len must be at least 8, got {cfg.seq_len}")
    tokenizer = load_tokenizer(model_dir)
    check_model_vocab(model_dir, tokenizer)
    report = ReadReport()
    pairs = read_preference_pairs(data, report)
    examples = tokenize_pairs(tokenizer, template, pairs, cfg.seq_len, progress)
    examples.warn(cfg.seq_len)
    if len(examples) == 0:
        raise ZhllamaError(f"none of the {len(pairs)} preference pairs could be used (see the warnings)")
    train_ids, val_ids = split_conversations(len(examples), cfg.val_fraction, cfg.seed)
    reasons = Counter(skip_kind(entry) for entry in report.skipped)
    summary = {**examples.counts(), "rows_skipped": len(report.skipped), "rows_skipped_by_reason": dict(reasons),
               "skipped": report.skipped[:100], "train_pairs": len(train_ids), "val_pairs": len(val_ids)}
    return examples, train_ids, val_ids, summary


def dpo(model_dir: str | Path, data: list[str | Path], out: str | Path, cfg: DpoConfig, resume: bool = False,
        progress: bool = True) -> Path:
    """Align `model_dir` on preference pairs with cfg.loss; returns the run folder (chat model in run/final)."""
    import torch.distributed as dist

    from zhllama.chat import get_template

    model_dir, out = Path(model_dir), Path(out)
    check_loss_settings(cfg.loss, cfg.beta, cfg.gamma, cfg.label_smoothing)
    if cfg.trainable == "qlora":
        check_qlora_available()
    check_run_dir(out, resume)
    examples, train_ids, val_ids, summary = prepare_preference_data(model_dir, data, cfg, progress)
    print(f"preference data: {summary['train_pairs']:,} pairs for training, {summary['val_pairs']:,} held out; "
          f"{summary['rows_skipped']} rows skipped", file=sys.stderr)
    make_dir(out)
    write_json_atomic(out / "dpo_data.json", summary)
    base = load_for_training(model_dir, cfg.seq_len, nf4=cfg.trainable == "qlora", rope=cfg.rope,
                             rope_factor=cfg.rope_factor)
    model = prepare_trainable(base, cfg, base_vocab_size(model_dir))
    pad_id = scoring.pad_id(load_tokenizer(model_dir))
    reference = stored_reference(out, model, examples, pad_id, cfg, progress) if cfg.loss == "dpo" else None
    train_data = PreferenceTrainData(examples.subset(train_ids), examples.subset(val_ids) if val_ids else None,
                                     pad_id, reference, train_ids, val_ids)
    args = {"model": str(model_dir), "data": [str(p) for p in data], "config": to_dict(cfg), "resume": resume}
    inputs = {"tokenizer": tokenizer_sha256(model_dir), "data": [file_sha256(p) for p in data]}
    write_provenance(out, "train dpo", args, inputs)
    objective = PreferenceObjective(cfg.loss, cfg.beta, cfg.gamma, cfg.label_smoothing)
    result = train_loop(model, train_data, cfg, out, resume=resume and latest_checkpoint(out) is not None,
                        objective=objective)
    if not dist.is_initialized() or dist.get_rank() == 0:
        finish_run(result.model, out, model_dir, "train dpo", args, inputs,
                   chat_template=get_template(cfg.template).jinja, state_dict=result.state_dict)
    return out
