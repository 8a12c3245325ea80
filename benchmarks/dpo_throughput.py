"""DPO training throughput and peak memory: zhllama's `train dpo` path against the common naive implementation.

A random Llama of a zhllama preset (default `tiny`) with the Chinese-LLaMA-Alpaca-2 vocabulary (55,296 pieces,
from the shared folder), trained on the real Chinese pairs of LLaMA-Factory's `dpo_zh_demo.json`
(`read_preference_pairs` + `tokenize_pairs`, template `atom`), the same pairs in the same order for every arm.
Every arm does --steps AdamW steps on all weights (forward + backward + step, B pairs a batch) after warm-up
steps that are not timed, with the DPO sigmoid loss (beta 0.1), in the same precision:

* `ours`: `PreferenceObjective("dpo")` on `pair_batch` (the B chosen and B rejected rows in one forward, only the
  reply positions projected onto the vocabulary by `token_nll`), reference log-probabilities precomputed once by
  `reference_logps` (its time is reported apart, not in pairs/s): one model in memory.
* `naive`: a second full copy of the model as the reference; per step the policy runs two forwards (chosen rows,
  then rejected rows, each right-padded with an attention mask, full [batch, seq, vocab] logits, log_softmax over
  all of them, labels gathered) and the reference two no-grad forwards the same way.
* `ours_live_reference`: ours, with a second model copy computing the reference log-probabilities live each step
  (no precomputation): what precomputing saves in memory.

Each arm runs in a fresh process (peak RSS = the child's ru_maxrss, model load included); the arms alternate,
--rounds times, and each keeps its best round. Before timing, the benchmark checks on the first batch that ours and
naive compute the same loss for a policy that differs from the reference (weights perturbed by seeded noise).
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

ARMS = ("ours", "naive", "ours_live_reference")
TEMPLATE, BETA, WARMUP, LR = "atom", 0.1, 2, 1e-5
DATA = "sft/llama-factory/dpo_zh_demo.json"
TOKENIZER = "tokenizers/chinese-llama-alpaca-2/tokenizer.model"


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def batch_ids(step: int, batch: int, n: int) -> list[int]:
    return [(step * batch + i) % n for i in range(batch)]


def naive_logps(model, ids: list[np.ndarray], labels: list[np.ndarray], pad_id: int) -> torch.Tensor:
    """Summed log-probabilities of the labelled tokens, the common way: right-padded rows with an attention mask,
    every logit, log_softmax over the whole [batch, seq, vocab], the labels gathered."""
    from zhllama.scoring import right_pad

    batch = right_pad(ids, pad_id, labels)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["labels"][:, 1:]
    mask = target != -100
    picked = torch.gather(logp, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def naive_loss(policy, reference, ex, ids: list[int], pad_id: int) -> torch.Tensor:
    sides = [([ex.chosen_ids[i] for i in ids], [ex.chosen_labels[i] for i in ids]),
             ([ex.rejected_ids[i] for i in ids], [ex.rejected_labels[i] for i in ids])]
    chosen, rejected = (naive_logps(policy, s_ids, s_labels, pad_id) for s_ids, s_labels in sides)
    with torch.no_grad():
        ref_chosen, ref_rejected = (naive_logps(reference, s_ids, s_labels, pad_id) for s_ids, s_labels in sides)
    z = BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(z).mean()


def load(model_dir: Path, ours: bool):
    from transformers import AutoModelForCausalLM

    from zhllama.train.run import load_for_training

    if ours:
        return load_for_training(model_dir)  # what `train dpo` loads: fp32, SDPA one conversation span at a time
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model


def run_arm(arm: str, model_dir: Path, pairs: Path, pad_id: int, steps: int, batch: int, precision: str) -> dict:
    """One arm in this (fresh) process: {pairs_per_s, step_s, ref_s, peak_rss_mib, losses}."""
    from zhllama.train.dpo import pair_batch, reference_logps
    from zhllama.train.preference import PreferenceObjective, reply_logps

    ex = pickle.loads(pairs.read_bytes())
    used = ex.subset(range(min(len(ex), (WARMUP + steps) * batch)))
    model = load(model_dir, arm != "naive").train()
    reference, ref_s, ref = None, None, None
    if arm == "ours":
        start = time.perf_counter()
        ref = reference_logps(model, used, pad_id, batch, precision, progress=False)
        ref_s = time.perf_counter() - start
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    objective = PreferenceObjective("dpo", beta=BETA)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    took, step_s, losses = 0.0, [], []
    for step in range(WARMUP + steps):
        ids = batch_ids(step, batch, len(used))
        start = time.perf_counter()
        with autocast(precision):
            if arm == "naive":
                loss = naive_loss(model, reference, used, ids, pad_id)
            else:
                b = pair_batch(used, ids, pad_id, ref)
                if arm == "ours_live_reference":
                    with torch.no_grad():
                        rc, rr, _, _ = reply_logps(reference, b)
                    b["ref_chosen"], b["ref_rejected"] = rc.float(), rr.float()
                loss_sum, _ = objective(model, b)
                loss = loss_sum / objective.units(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(float(loss))
        if step >= WARMUP:
            took += elapsed
            step_s.append(round(elapsed, 3))
    return {"pairs_per_s": steps * batch / took, "step_s": step_s, "ref_s": ref_s, "ref_pairs": len(used),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses}


def check_same_loss(model_dir: Path, ex, pad_id: int, batch: int, precision: str) -> dict:
    """Ours and naive on the first batch, for a policy perturbed away from the reference."""
    from zhllama.train.dpo import pair_batch, reference_logps
    from zhllama.train.preference import PreferenceObjective

    reference = load(model_dir, True).eval()
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    first = ex.subset(range(batch))
    ref = reference_logps(reference, first, pad_id, batch, precision, progress=False)
    objective = PreferenceObjective("dpo", beta=BETA)
    with torch.no_grad(), autocast(precision):
        b = pair_batch(first, list(range(batch)), pad_id, ref)
        ours = float(objective(policy, b)[0]) / batch
        naive_ref, naive_pol = load(model_dir, False).eval(), load(model_dir, False).eval()
        naive_pol.load_state_dict(policy.state_dict())
        naive = float(naive_loss(naive_pol, naive_ref, first, list(range(batch)), pad_id))
    return {"ours": ours, "naive": naive, "abs_diff": abs(ours - naive)}


def prepare(args) -> tuple[Path, Path, int, dict]:
    from zhllama import scoring
    from zhllama.chat import get_template
    from zhllama.data.preference import read_preference_pairs, tokenize_pairs
    from zhllama.model import init_model
    from zhllama.model.loading import load_tokenizer
    from zhllama.tokenizer.hf import write_hf_tokenizer
    from zhllama.tokenizer.spm import load_proto

    work = args.work / "dpo_throughput"
    tok_dir = work / "cla2-hf"
    if not (tok_dir / "tokenizer.json").is_file():
        write_hf_tokenizer(load_proto(args.data / TOKENIZER), tok_dir)
    model_dir = work / args.preset
    if not (model_dir / "config.json").is_file():
        init_model(args.preset, tok_dir, model_dir, seed=0)
    tok = load_tokenizer(tok_dir)
    ex = tokenize_pairs(tok, get_template(TEMPLATE), read_preference_pairs([args.data / DATA]), args.seq_len,
                        progress=False)
    pairs = work / f"pairs-{args.seq_len}.pkl"
    pairs.write_bytes(pickle.dumps(ex))
    return model_dir, pairs, scoring.pad_id(tok), {"vocab": len(tok), **ex.counts()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--preset", default="tiny", help="zhllama model preset (default: tiny)")
    p.add_argument("--steps", type=int, default=3, help=f"timed steps per arm, after {WARMUP} warm-up steps")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--pad-id", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = run_arm(args.child, args.model, args.pairs, args.pad_id, args.steps, args.batch_size, args.precision)
        print("RESULT " + json.dumps(out))
        return
    wall = time.perf_counter()
    model_dir, pairs, pad_id, data = prepare(args)
    check = check_same_loss(model_dir, pickle.loads(pairs.read_bytes()), pad_id, args.batch_size, args.precision)
    print(f"loss on the first batch: ours {check['ours']:.6f}, naive {check['naive']:.6f}, "
          f"|diff| {check['abs_diff']:.2e}", flush=True)
    rounds: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            cmd = [sys.executable, __file__, "--child", arm, "--model", str(model_dir), "--pairs", str(pairs),
                   "--pad-id", str(pad_id), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--precision", args.precision]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
            rounds[arm].append(json.loads(line[0][7:]))
            print(f"round {r + 1} {arm}: {rounds[arm][-1]['pairs_per_s']:.3f} pairs/s, "
                  f"peak {rounds[arm][-1]['peak_rss_mib']:,.0f} MiB", flush=True)
    best = {arm: max(rs, key=lambda x: x["pairs_per_s"]) for arm, rs in rounds.items()}
    peak = {arm: min(x["peak_rss_mib"] for x in rs) for arm, rs in rounds.items()}
    base = best["naive"]["pairs_per_s"]
    ref = best["ours"]
    lines = [f"preset {args.preset} (random init, vocab {data['vocab']:,}: Chinese-LLaMA-Alpaca-2), {args.precision}, "
             f"batch {args.batch_size} pairs, seq_len {args.seq_len}, template {TEMPLATE}, DPO sigmoid beta {BETA}, "
             f"AdamW lr {LR} on all weights; {args.steps} timed steps per arm after {WARMUP} warm-up; best of "
             f"{args.rounds} alternating rounds, each arm in a fresh process; threads {torch.get_num_threads()}", "",
             f"Data: {DATA}: {data['examples']} of {data['pairs']} pairs usable at seq_len {args.seq_len} "
             f"({data['truncated']} truncated, {data['skipped_too_long']} too long)", "",
             "| arm | pairs/s | ratio to naive | s/step | peak RSS (MiB) | models in memory |",
             "|---|---|---|---|---|---|"]
    models = {"ours": 1, "naive": 2, "ours_live_reference": 2}
    for arm in ARMS:
        b = best[arm]
        lines.append(f"| {arm} | {b['pairs_per_s']:.3f} | {b['pairs_per_s'] / base:.2f}x | "
                     f"{float(np.mean(b['step_s'])):.2f} | {peak[arm]:,.0f} | {models[arm]} |")
    lines += ["", f"- ours: one-off reference pass over the {ref['ref_pairs']} pairs used: {ref['ref_s']:.1f} s "
              f"({ref['ref_pairs'] / ref['ref_s']:.2f} pairs/s; not in pairs/s above)",
              f"- same loss on the first batch (policy perturbed from the reference): ours {check['ours']:.6f}, "
              f"naive {check['naive']:.6f}, |diff| {check['abs_diff']:.2e} "
              f"({'PASS' if check['abs_diff'] < 1e-4 else 'CHECK'} < 1e-4)",
              f"- peak RSS: the child's ru_maxrss (model load, data, optimizer state included), lowest over rounds; "
              f"wall time {time.perf_counter() - wall:.0f} s"]
    payload = {"settings": {"preset": args.preset, "precision": args.precision, "batch_size": args.batch_size,
                            "seq_len": args.seq_len, "steps": args.steps, "warmup": WARMUP, "rounds": args.rounds,
                            "beta": BETA, "lr": LR, "template": TEMPLATE, "threads": torch.get_num_threads()},
               "data": data, "best": best, "peak_rss_mib": peak, "rounds": rounds, "loss_check": check,
               "ratio_to_naive": {arm: best[arm]["pairs_per_s"] / base for arm in ARMS},
               "wall_s": time.perf_counter() - wall}
    write_results("dpo_throughput", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
