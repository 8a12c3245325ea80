"""Multiple-choice scoring: which of a few fixed answers does the model find most likely after a prompt?

Each candidate answer is appended as the assistant's reply and tokenized exactly as SFT does
(:func:`zhllama.chat.tokenize_conversation`), so the tokens scored are the reply's target tokens with its
end-of-turn marker: the same tokens the loss trained on. A model that never saw the task scores near chance; a
fine-tuned one puts its mass on the right answer. Scoring needs no sampling and is exactly reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from zhllama.chat import IGNORE_INDEX, get_template, tokenize_conversation


@torch.no_grad()
def score_choices(model, tokenizer, template, prompts: list[list[dict]], choices: list[str],
                  batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Summed log-probability of every choice as the reply to every prompt: shape (len(prompts), len(choices)).

    A prompt is a conversation that ends with a user message.
    """
    from zhllama.data.sft_batches import SftExamples, padded_batch

    template = get_template(template)
    items = SftExamples()
    for messages in prompts:
        for choice in choices:
            enc = tokenize_conversation(tokenizer, template, [*messages, {"role": "assistant", "content": choice}])
            items.input_ids.append(enc["input_ids"])
            items.labels.append(enc["labels"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scores = []
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc="scoring", disable=not progress or None, leave=False):
        batch = padded_batch(items, list(range(start, min(start + batch_size, len(items)))), pad)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(device)
        keep = targets != IGNORE_INDEX
        # Only the reply positions are projected onto the vocabulary; logits come back flattened.
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep,
                       use_cache=False).logits.float()
        logp = -F.cross_entropy(logits, targets[keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        scores.extend(torch.zeros(len(ids), device=device).index_add_(0, rows, logp).tolist())
    return np.array(scores).reshape(len(prompts), len(choices))


def choice_accuracy(model, tokenizer, template, prompts: list[list[dict]], choices: list[str],
                    answers: list[int], batch_size: int = 16, progress: bool = True) -> dict:
    """Accuracy of the highest-scoring choice against `answers` (indices into `choices`)."""
    scores = score_choices(model, tokenizer, template, prompts, choices, batch_size, progress)
    predicted = scores.argmax(axis=1)
    counts = np.bincount(predicted, minlength=len(choices))
    return {"accuracy": float((predicted == np.asarray(answers)).mean()), "n": len(prompts),
            "predicted": {choice: int(c) for choice, c in zip(choices, counts, strict=True)}}
