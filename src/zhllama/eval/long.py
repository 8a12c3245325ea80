"""Long context (``zhllama eval long``): passkey retrieval and perplexity against context length.

Passkey retrieval (the standard test, with Chinese filler): a random 5-digit key sentence is hidden at several
depths of a haystack of repeated filler sentences that fills the target length, and the prompt ends with
"通行密码是多少？通行密码是". The main metric is generation: greedy-decode a few tokens and check the digits appear.
A weak model may never write the digits yet still prefer them, so we also rank the log-likelihood of the true key
against random distractor keys (rank 1 = the true key is the most likely).

Perplexity against length: windows of each length cut from the built-in held-out text, the mean NLL over the whole
window and over its last quarter (the tokens that see the most context: where a too-short RoPE shows first).

RoPE scaling (``--rope linear|dynamic|yarn|llama3 --rope-factor F``) is set before the weights load by
zhllama.model.rope (see there): linear, YaRN and llama3 stretch positions, so ``max_position_embeddings`` grows by
the factor; dynamic NTK keeps it, because it measures how far a sequence has gone past it to decide how much to
scale. Lengths past the context (trained, or scaled with --rope) still run, since showing the degradation is the
point, and are flagged.
"""

from __future__ import annotations

import copy
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zhllama.artifacts import write_json_atomic
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_checked
from zhllama.model.rope import scale_rope
from zhllama.scoring import token_nll

FILLER = ("草是绿的。", "天空是蓝的。", "太阳是黄的。", "这里是家，那里是远方。")
KEY_SENTENCE = "通行密码是 {key}。记住它。{key} 是通行密码。"
QUESTION = "\n通行密码是多少？通行密码是"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEW_TOKENS = 8  # a 5-digit key is at most 6 tokens in Llama's tokenizer (digits are split, plus a space)
DISTRACTORS = 4


def parse_lengths(text: str) -> list[int]:
    """"1k,2k,4k" -> [1024, 2048, 4096]; plain numbers are tokens."""
    lengths = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", part)
        if not match:
            raise ZhllamaError(f"--lengths: cannot read {part.strip()!r}; write e.g. 1k,2k,4k or 512,1024")
        value = float(match.group(1)) * (1024 if match.group(2) else 1)
        if value != int(value) or value < 1:
            raise ZhllamaError(f"--lengths: {part.strip()!r} is not a positive whole number of tokens")
        lengths.append(int(value))
    return sorted(set(lengths))


# --- RoPE scaling ------------------------------------------------------------------------------------------

def load_scaled(model_dir: str | Path, rope: str | None = None, factor: float | None = None,
                device: str = "auto"):
    """(model, tokenizer, trained context) with RoPE scaling applied before the weights load."""
    from zhllama.model.loading import load_model_config

    trained = int(load_model_config(model_dir).max_position_embeddings)
    scale_rope(SimpleNamespace(max_position_embeddings=trained), rope, factor)  # check flags before loading
    model, tokenizer = load_checked(model_dir, device, rope=rope, rope_factor=factor)
    return model, tokenizer, trained


# --- passkey -----------------------------------------------------------------------------------------------

def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a passkey prompt at most ``length`` tokens long (within one filler sentence of it)."""
    def build(n: int) -> list[int]:
        sentences = [FILLER[i % len(FILLER)] for i in range(n)]
        sentences.insert(round(depth * n), KEY_SENTENCE.format(key=key))
        return tokenizer("".join(sentences) + QUESTION)["input_ids"]

    if len(build(0)) > length:
        raise ZhllamaError(f"length {length} is too short for a passkey prompt (it needs {len(build(0))} tokens)")
    # Token counts grow almost linearly with filler sentences: estimate, then step to the longest that fits.
    per_sentence = (len(build(64)) - len(build(0))) / 64
    n = max(0, int((length - len(build(0))) / per_sentence))
    while n > 0 and len(build(n)) > length:
        n -= 1
    while len(build(n + 1)) <= length:
        n += 1
    return build(n)


@torch.no_grad()
def passkey_trials(model, tokenizer, prompts: list[list[int]], keys: list[str], distractors: list[list[str]],
                   new_tokens: int = NEW_TOKENS) -> list[dict]:
    """For prompts of one token length, batched: the greedy reply (found = it holds the key) and the key's
    likelihood rank among its distractors.

    Equal lengths need no padding, so the batch is exactly the single-prompt computation. One prefill serves
    both: its cache is copied for the greedy decode and repeated across the candidate keys.
    """
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("passkey_trials batches prompts of one token length only")
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor(prompts, device=device), use_cache=True, logits_to_keep=1)
    cache, last = out.past_key_values, out.logits[:, -1].float()

    generated, step_cache, logits = [], copy.deepcopy(cache), last
    for _ in range(new_tokens):
        tokens = logits.argmax(-1)
        generated.append(tokens.tolist())
        step = model(input_ids=tokens[:, None], past_key_values=step_cache, use_cache=True)
        step_cache, logits = step.past_key_values, step.logits[:, -1].float()
    del step_cache
    replies = []
    for row in zip(*generated, strict=True):
        ids = list(row)
        if tokenizer.eos_token_id in ids:  # a row that ended keeps decoding in the batch; cut it at its end
            ids = ids[:ids.index(tokenizer.eos_token_id)]
        replies.append(tokenizer.decode(ids, skip_special_tokens=True))

    candidates = [_continuation(tokenizer, prompt, k) for prompt, key, others in zip(prompts, keys, distractors,
                                                                                      strict=True)
                  for k in [key, *others]]
    per_prompt = len(candidates) // len(prompts)
    lengths = torch.tensor([len(c) for c in candidates], device=device)
    width = max(map(len, candidates))
    tokens = torch.tensor([c + [c[-1]] * (width - len(c)) for c in candidates], device=device)  # pads masked
    logp = torch.zeros(len(candidates), width, device=device)
    first = F.log_softmax(last, -1).repeat_interleave(per_prompt, 0)
    logp[:, 0] = first.gather(1, tokens[:, :1])[:, 0]
    if width > 1:
        cache.batch_repeat_interleave(per_prompt)
        rest = model(input_ids=tokens[:, :-1], past_key_values=cache, use_cache=True).logits.float()
        logp[:, 1:] = F.log_softmax(rest, -1).gather(-1, tokens[:, 1:, None])[..., 0]
    mask = torch.arange(width, device=device)[None] < lengths[:, None]
    scores = (logp * mask).sum(-1).view(len(prompts), per_prompt).tolist()
    return [{"key": key, "reply": reply, "found": key in re.sub(r"\s", "", reply),
             "rank": 1 + sum(s > row[0] for s in row[1:]), "logprob": row[0]}
            for key, reply, row in zip(keys, replies, scores, strict=True)]


def _continuation(tokenizer, prompt_ids: list[int], key: str) -> list[int]:
    """The key's tokens right after the prompt, as the tokenizer would split prompt + key."""
    full = tokenizer(tokenizer.decode(prompt_ids, skip_special_tokens=True) + key)["input_ids"]
    if full[:len(prompt_ids)] == list(prompt_ids):
        return full[len(prompt_ids):]
    return tokenizer(key, add_special_tokens=False)["input_ids"]  # the boundary merged: score the key alone


def passkey_accuracy(model, tokenizer, length: int, depths=DEPTHS, n_keys: int = 2, seed: int = 0,
                     progress: bool = False, batch_tokens: int = 8192) -> dict:
    """Generation accuracy and likelihood ranks of ``n_keys`` keys at every depth, for one length.

    Keys and distractors come from a generator seeded by ``seed`` and the length, so a run repeats exactly.
    """
    rng = random.Random(f"{seed}-{length}")
    jobs = []
    for depth in depths:
        for _ in range(n_keys):
            key = str(rng.randint(10000, 99999))
            others: list[str] = []
            while len(others) < DISTRACTORS:
                other = str(rng.randint(10000, 99999))
                if other != key and other not in others:
                    others.append(other)
            jobs.append((depth, key, others, passkey_prompt(tokenizer, length, depth, key)))
    # Prompts of one token length (most are: only the key's place differs) share a batch.
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(len(job[3]), []).append(i)
    trials: list[dict | None] = [None] * len(jobs)
    # The candidates repeat the batch's KV cache 1 + DISTRACTORS times: bound the batch by tokens, not prompts.
    batch_size = max(1, batch_tokens // length)
    for members in tqdm(groups.values(), desc=f"passkey {length}", disable=not progress or None, leave=False):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            results = passkey_trials(model, tokenizer, [jobs[i][3] for i in chunk], [jobs[i][1] for i in chunk],
                                     [jobs[i][2] for i in chunk])
            for i, result in zip(chunk, results, strict=True):
                trials[i] = {"depth": jobs[i][0], "tokens": len(jobs[i][3]), **result}
    return {"accuracy": sum(t["found"] for t in trials) / len(trials),
            "rank1": sum(t["rank"] == 1 for t in trials) / len(trials),
            "mean_rank": sum(t["rank"] for t in trials) / len(trials),
            "by_depth": {str(d): sum(t["found"] for t in trials if t["depth"] == d) / n_keys for d in depths},
            "trials": trials}


# --- perplexity --------------------------------------------------------------------------------------------

def heldout_ids(tokenizer, tokens: int) -> list[int]:
    """At least ``tokens`` ids of the built-in held-out text (all of it if it is shorter)."""
    from zhllama.data import builtin

    parts, chars, enough_chars = [], 0, tokens  # Chinese runs near one token per character: tokenize there
    for doc in builtin.documents("heldout"):
        parts.append(doc["text"])
        chars += len(doc["text"])
        if chars >= enough_chars:
            ids = tokenizer("\n".join(parts))["input_ids"]
            if len(ids) >= tokens:
                return ids
            enough_chars = int(chars * 1.5)  # fewer tokens than characters: read on, tokenize again later
    return tokenizer("\n".join(parts))["input_ids"]


@torch.no_grad()
def window_nll(model, ids: list[int]) -> tuple[float, float]:
    """(mean NLL of every predicted token, mean NLL of the last quarter) of one window."""
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    # Every token but the first is a target: all positions go through the vocabulary projection (sparse=0).
    nll = token_nll(model, {"input_ids": tokens, "labels": tokens}, per="token", sparse=0.0).nats
    tail = nll[-max(1, len(nll) // 4):]
    return nll.mean().item(), tail.mean().item()


def perplexity_by_length(model, tokenizer, lengths: list[int], windows: int = 2) -> dict:
    """{length: {nll, ppl, nll_last_quarter, windows}} over up to ``windows`` disjoint windows per length."""
    stream = heldout_ids(tokenizer, max(lengths) * windows)
    result = {}
    for length in lengths:
        starts = list(range(0, len(stream) - length + 1, length))[:windows]
        if not starts:
            result[length] = {"nll": None, "ppl": None, "nll_last_quarter": None, "windows": 0}
            continue
        pairs = [window_nll(model, stream[s:s + length]) for s in starts]
        nll = sum(p[0] for p in pairs) / len(pairs)
        result[length] = {"nll": nll, "ppl": math.exp(nll), "nll_last_quarter": sum(p[1] for p in pairs) / len(pairs),
                          "windows": len(pairs)}
    return result


# --- report ------------------------------------------------------------------------------------------------

def long_context_report(model, tokenizer, lengths: list[int], depths=DEPTHS, n_keys: int = 2, seed: int = 0,
                        trained_context: int | None = None, perplexity: bool = True, progress: bool = False) -> dict:
    """Passkey accuracy and perplexity for every length, each flagged when it runs past the usable context."""
    parameters = dict(getattr(model.config, "rope_parameters", None) or {})
    rope = parameters.get("rope_type", "default")
    trained = int(trained_context or model.config.max_position_embeddings)
    factor = float(parameters.get("factor", 1.0)) if rope != "default" else 1.0
    usable = int(trained * factor)
    ppl = perplexity_by_length(model, tokenizer, lengths) if perplexity else {}
    rows = []
    for length in lengths:
        flag = "" if length <= usable else ("beyond trained context" if rope == "default"
                                            else f"beyond scaled context ({usable})")
        rows.append({"length": length, "beyond_context": bool(flag), "note": flag,
                     "passkey": passkey_accuracy(model, tokenizer, length, depths, n_keys, seed, progress),
                     "perplexity": ppl.get(length)})
    return {"rope": None if rope == "default" else {"type": rope, "factor": factor}, "trained_context": trained,
            "usable_context": usable, "depths": list(depths), "n_keys": n_keys, "seed": seed, "lengths": rows}


def format_table(report: dict) -> str:
    lines = [f"{'length':>8}  {'passkey':>7}  {'rank1':>5}  {'nll':>7}  {'ppl':>9}  {'nll@tail':>8}  note"]
    for row in report["lengths"]:
        p = row["perplexity"] or {}
        nll = f"{p['nll']:.3f}" if p.get("nll") is not None else "-"
        ppl = f"{p['ppl']:.2f}" if p.get("ppl") is not None else "-"
        tail = f"{p['nll_last_quarter']:.3f}" if p.get("nll_last_quarter") is not None else "-"
        lines.append(f"{row['length']:>8}  {row['passkey']['accuracy']:>7.2f}  {row['passkey']['rank1']:>5.2f}  "
                     f"{nll:>7}  {ppl:>9}  {tail:>8}  {row['note']}")
    return "\n".join(lines)


def run_long(model_dir: Path, lengths: str = "1k,2k,4k,8k", rope: str | None = None, factor: float | None = None,
             out: Path | None = None, device: str = "auto", n_keys: int = 2, seed: int = 0) -> dict:
    """Load (RoPE-scaled), score every length, print the table and write the JSON report atomically."""
    from zhllama import __version__

    parsed = parse_lengths(lengths)
    if out is not None and Path(out).is_dir():
        raise ZhllamaError(f"--out {out} is a folder; give a .json file name")
    model, tokenizer, trained = load_scaled(model_dir, rope, factor, device)
    report = long_context_report(model, tokenizer, parsed, n_keys=n_keys, seed=seed, trained_context=trained,
                                 progress=True)
    report = {"model": str(model_dir), "zhllama_version": __version__, **report}
    print(format_table(report))
    if out is not None:
        print(f"wrote {write_json_atomic(out, report)}")
    return report
