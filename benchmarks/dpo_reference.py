"""zhllama's preference losses against TRL's, on the same summed log-probabilities (and reference ones).

By hand, never a dependency: TRL is imported from --trl-path (e.g. `pip install --no-deps --target /tmp/trl
trl==1.16.0 datasets pyarrow pandas dill multiprocess python-dateutil pytz tzdata six`; the venv has the rest).

* DPO: `DPOTrainer._compute_loss` of TRL 1.16 (loss_type "sigmoid", precomputed reference log-probabilities) with
  a stand-in `self` and a stand-in model whose per-token log-probabilities sum to the given ones; one pair per
  call, so its logged rewards are that pair's. TRL 1.16's sigmoid loss has no label smoothing (its
  `label_smoothing` is only for the robust and EXO losses); the conservative DPO with label smoothing that
  zhllama implements is `DPOTrainer.dpo_loss` of older TRL (0.23: `-(1-eps) logsigmoid(z) - eps logsigmoid(-z)`),
  compared from --trl-legacy-path (a `pip install --no-deps --target` of trl==0.23.0). That version no longer
  imports with transformers 5 (it wants mergekit), so its `dpo_loss` and the helpers it names are taken from its
  source files with `ast` and run as they are.
* ORPO: `ORPOTrainer.odds_ratio_loss` (TRL 1.16) on the mean log-probabilities. TRL's ORPO loss is
  `nll - mean(odds term)` with the NLL averaged over all the batch's chosen tokens, ours is per pair (the chosen
  reply's mean NLL, as the paper writes it); the odds-ratio term is compared alone and the NLL gap is reported.
* SimPO: `CPOTrainer.cpo_loss` (TRL 1.16) with loss_type "simpo", `simpo_gamma` = our gamma, on the mean
  log-probabilities (pure SimPO: TRL's cpo_alpha 0 adds no NLL term).
* Per-sequence log-probabilities: TRL's `ORPOTrainer.get_batch_logps` (what its ORPO/CPO concatenated_forward use)
  on the full logits of right-padded rows of a tiny random zhllama model, against our `reply_logps` on
  `pair_batch` of the same tokenized pairs (LLaMA-Factory's dpo_zh_demo.json, template atom).
"""

from __future__ import annotations

import ast
import math
import sys
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

from zhllama.train.preference import preference_losses, reply_logps

DEVICE = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def sources(path: Path, names: list[str], namespace: dict) -> dict:
    """Run the top-level definitions (or `Class.method` bodies) `names` of a TRL source file in `namespace`."""
    src = path.read_text()
    found = []
    for node in ast.parse(src).body:
        for name in names:
            head, _, method = name.partition(".")
            if getattr(node, "name", None) == head:
                found += [n for n in node.body if getattr(n, "name", None) == method] if method else [node]
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def cases(dtype) -> dict[str, torch.Tensor]:
    """64 seeded random pairs plus edge cases: summed log-probs, reference ones and reply token counts."""
    g = torch.Generator().manual_seed(0)
    n = 64
    counts = torch.randint(1, 300, (2, n), generator=g).double()
    mean = -torch.rand(2, n, generator=g).double() * 4  # mean log-probs in (-4, 0]
    logps = mean * counts
    ref = logps + torch.randn(2, n, generator=g).double() * 5
    edge_logps = torch.tensor([[-50., -1e-4, -3000., -1.0, 0.0, -20.], [-50., -2e-4, -5., -3000., -10., 0.0]])
    edge_ref = torch.tensor([[-50., -1e-4, -5., -3000., -5., -20.], [-50., -2e-4, -3000., -1., -10., -30.]])
    edge_counts = torch.tensor([[10., 1., 300., 1., 3., 4.], [10., 2., 1., 300., 5., 7.]])
    logps, ref, counts = (torch.cat([a, b.double()], 1) for a, b in ((logps, edge_logps), (ref, edge_ref),
                                                                         (counts, edge_counts)))
    return {"c": logps[0].to(dtype), "r": logps[1].to(dtype), "rc": ref[0].to(dtype), "rr": ref[1].to(dtype),
            "nc": counts[0].to(dtype), "nr": counts[1].to(dtype)}


def trl_dpo_116(trl, d: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16's DPOTrainer._compute_loss, one pair a call: (losses, chosen rewards, rejected rewards)."""
    from collections import defaultdict

    losses, chosen, rejected = [], [], []
    for i in range(len(d["c"])):
        sums = torch.stack([d["c"][i], d["r"][i]])
        per_token = torch.stack([sums, torch.zeros_like(sums)], 1)  # sums to the given log-probs
        model = SimpleNamespace(training=True)
        this = SimpleNamespace(model=model, accelerator=DEVICE, aux_loss_enabled=False, ld_alpha=None,
                               precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                               loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                               _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)

        def forward(per_token=per_token, **kwargs):
            return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                   mean_logits=torch.zeros_like(per_token),
                                   is_top1=torch.zeros_like(per_token, dtype=torch.bool))

        inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3),
                  "completion_mask": torch.tensor([[0, 1, 1], [0, 1, 1]]), "ref_chosen_logps": d["rc"][i:i + 1],
                  "ref_rejected_logps": d["rr"][i:i + 1]}
        losses.append(trl.DPOTrainer._compute_loss(this, forward, inputs, False))
        chosen.append(this._metrics["train"]["rewards/chosen"][0])
        rejected.append(this._metrics["train"]["rewards/rejected"][0])
    return torch.stack(losses), torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


def max_diff(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    same = (a == b) | (torch.isfinite(a) & torch.isfinite(b))  # equal infinities count as agreeing
    return float(torch.where(a == b, torch.zeros_like(a), (a - b).abs())[same].max())


def compare_losses(args, trl, legacy) -> list[dict]:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    rows = []
    for dtype in (torch.float32, torch.float64):
        d, name = cases(dtype), str(dtype).replace("torch.", "")
        for eps in (0.0, 0.1):
            ours = preference_losses("dpo", d["c"], d["r"], d["nc"], d["nr"], d["rc"], d["rr"], beta=args.beta,
                                     label_smoothing=eps)
            this = SimpleNamespace(accelerator=DEVICE, reference_free=False, f_divergence_type="reverse_kl",
                                   f_divergence_params=None, beta=args.beta, label_smoothing=eps, loss_type="sigmoid")
            old = legacy["dpo_loss"](this, d["c"], d["r"], d["rc"], d["rr"], "sigmoid")
            rows.append({"loss": "dpo", "dtype": name, "label_smoothing": eps, "trl": "0.23 DPOTrainer.dpo_loss",
                         **diffs(ours, old)})
            if eps == 0.0:
                rows.append({"loss": "dpo", "dtype": name, "label_smoothing": eps, "trl": f"{trl.__version__} "
                             "DPOTrainer._compute_loss", **diffs(ours, trl_dpo_116(trl, d, args.beta))})
        a, b = d["c"] / d["nc"], d["r"] / d["nr"]
        ours = preference_losses("orpo", d["c"], d["r"], d["nc"], d["nr"], beta=args.beta)
        theirs = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=args.beta, accelerator=DEVICE), a, b)[:3]
        rows.append({"loss": "orpo (odds-ratio term)", "dtype": name, "label_smoothing": 0.0,
                     "trl": f"{trl.__version__} ORPOTrainer.odds_ratio_loss",
                     **diffs((ours[0] + a, ours[1], ours[2]), (-theirs[0], theirs[1], theirs[2])),
                     "nll_ours_minus_trl": float((-a).mean() - (-d["c"].sum() / d["nc"].sum()))})
        for eps in (0.0, 0.1):
            ours = preference_losses("simpo", d["c"], d["r"], d["nc"], d["nr"], beta=args.simpo_beta,
                                     gamma=args.gamma, label_smoothing=eps)
            this = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=args.gamma, beta=args.simpo_beta,
                                   label_smoothing=eps, accelerator=DEVICE)
            rows.append({"loss": "simpo", "dtype": name, "label_smoothing": eps,
                         "trl": f"{trl.__version__} CPOTrainer.cpo_loss",
                         **diffs(ours, CPOTrainer.cpo_loss(this, a, b))})
    return rows


def diffs(ours, theirs) -> dict:
    return {"pairs": len(ours[0]), "loss_max_abs_diff": max_diff(ours[0], theirs[0]),
            "chosen_reward_max_abs_diff": max_diff(ours[1], theirs[1]),
            "rejected_reward_max_abs_diff": max_diff(ours[2], theirs[2]),
            "nonfinite_ours": int((~torch.isfinite(ours[0])).sum()),
            "nonfinite_trl": int((~torch.isfinite(theirs[0])).sum())}


def compare_logps(args) -> dict:
    """TRL's get_batch_logps on full logits of right-padded rows vs our reply_logps on pair_batch."""
    from trl.experimental.orpo import ORPOTrainer

    from zhllama import scoring
    from zhllama.chat import get_template
    from zhllama.data.preference import read_preference_pairs, tokenize_pairs
    from zhllama.model import init_model
    from zhllama.model.loading import load_tokenizer
    from zhllama.tokenizer.hf import write_hf_tokenizer
    from zhllama.tokenizer.spm import load_proto
    from zhllama.train.dpo import pair_batch
    from zhllama.train.run import load_for_training

    work = args.work / "dpo_reference"
    tok_dir, model_dir = work / "cla2-hf", work / "tiny"
    if not (tok_dir / "tokenizer.json").is_file():
        write_hf_tokenizer(load_proto(args.data / "tokenizers/chinese-llama-alpaca-2/tokenizer.model"), tok_dir)
    if not (model_dir / "config.json").is_file():
        init_model("tiny", tok_dir, model_dir, seed=0)
    tok = load_tokenizer(tok_dir)
    pairs = read_preference_pairs([args.data / "sft/llama-factory/dpo_zh_demo.json"])
    ex = tokenize_pairs(tok, get_template("atom"), pairs, args.seq_len, progress=False)
    ex = ex.subset(range(min(args.pairs, len(ex))))  # the first pairs that fit seq_len
    ids, pad = list(range(len(ex))), scoring.pad_id(tok)
    model = load_for_training(model_dir).eval()
    with torch.no_grad():
        ours = torch.cat(reply_logps(model, pair_batch(ex, ids, pad))[:2])
        rows = scoring.right_pad(ex.chosen_ids + ex.rejected_ids, pad, ex.chosen_labels + ex.rejected_labels)
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits
        theirs = ORPOTrainer.get_batch_logps(logits.float(), rows["labels"])
    return {"pairs": len(ex), "rows": 2 * len(ex), "seq_len": args.seq_len,
            "max_abs_diff": float((ours - theirs).abs().max()),
            "max_rel_diff": float(((ours - theirs).abs() / theirs.abs()).max()),
            "logp_range": [float(theirs.min()), float(theirs.max())]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--trl-path", type=Path, default=Path("/tmp/trl"), help="a --target folder holding trl")
    p.add_argument("--trl-legacy-path", type=Path, default=Path("/tmp/trl023"),
                   help="a --target folder holding trl 0.23 (for DPOTrainer.dpo_loss with label smoothing)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO and ORPO beta")
    p.add_argument("--simpo-beta", type=float, default=2.0)
    p.add_argument("--gamma", type=float, default=0.5, help="SimPO gamma (TRL's simpo_gamma)")
    p.add_argument("--pairs", type=int, default=8, help="pairs for the log-probability check")
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    sys.path.insert(0, str(args.trl_path))
    import trl

    old = args.trl_legacy_path / "trl" / "trainer"
    legacy = {"torch": torch, "F": F, "math": math, "Enum": Enum}
    sources(old / "dpo_config.py", ["FDivergenceType", "FDivergenceConstants"], legacy)
    sources(old / "utils.py", ["get_exp_cap", "cap_exp"], legacy)
    sources(old / "dpo_trainer.py", ["DPOTrainer.dpo_loss"], legacy)
    rows = compare_losses(args, trl, legacy)
    logps = compare_logps(args)
    lines = [f"TRL {trl.__version__} from {args.trl_path} (and DPOTrainer.dpo_loss of TRL 0.23 from "
             f"{args.trl_legacy_path}); {rows[0]['pairs']} pairs: 64 seeded random + 6 edge cases (equal policy "
             "and reference, margins of +-3000 nats, mean log-probs of -1e-4 and exactly 0); DPO/ORPO beta "
             f"{args.beta}, SimPO beta {args.simpo_beta} gamma {args.gamma}", "",
             "| loss | dtype | label smoothing | TRL function | max abs diff loss | chosen reward | rejected reward "
             "| non-finite losses ours / TRL |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['dtype']} | {r['label_smoothing']} | {r['trl']} | "
                     f"{r['loss_max_abs_diff']:.2e} | {r['chosen_reward_max_abs_diff']:.2e} | "
                     f"{r['rejected_reward_max_abs_diff']:.2e} | {r['nonfinite_ours']} / {r['nonfinite_trl']} |")
    orpo = [r for r in rows if r["loss"].startswith("orpo")]
    lines += ["", f"- ORPO NLL term, ours (mean over pairs of each chosen reply's mean NLL, the paper's per-pair form) "
              f"minus TRL's (NLL averaged over all chosen tokens of the batch) on these pairs: "
              f"{orpo[-1]['nll_ours_minus_trl']:+.4f} nats (a definitional difference, not compared)",
              f"- summed reply log-probabilities, {logps['pairs']} pairs ({logps['rows']} rows, seq_len "
              f"{logps['seq_len']}, tiny random model, fp32): our reply_logps (one forward, reply positions only) "
              f"vs TRL's ORPOTrainer.get_batch_logps on full logits of right-padded rows: max abs diff "
              f"{logps['max_abs_diff']:.2e} nats, max rel diff {logps['max_rel_diff']:.2e} "
              f"(log-probs in [{logps['logp_range'][0]:.0f}, {logps['logp_range'][1]:.0f}])"]
    write_results("dpo_reference", {"trl_version": trl.__version__, "rows": rows, "logps": logps,
                                    "settings": {k: v for k, v in vars(args).items() if k in
                                                 ("beta", "simpo_beta", "gamma", "pairs", "seq_len")}},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
