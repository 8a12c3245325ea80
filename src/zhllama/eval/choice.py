"""Multiple-choice scoring: which of a few fixed answers does the model find most likely after a prompt?

Each candidate answer is appended as the assistant's reply and tokenized exactly as SFT does
(:func:`zhllama.chat.tokenize_conversation`), so the tokens scored are the reply's target tokens with its
end-of-turn marker: the same tokens the loss trained on. A model that never saw the task scores near chance; a
fine-tuned one puts its mass on the right answer. Scoring needs no sampling and is exactly reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from zhllama.chat import get_template, tokenize_conversation
from zhllama.scoring import pad_id, right_pad, token_nll


@torch.no_grad()
def score_choices(model, tokenizer, template, prompts: list[list[dict]], choices: list[str],
                  batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Summed log-probability of every choice as the reply to every prompt: shape (len(prompts), len(choices)).

    A prompt is a conversation that ends with a user message.
    """
    template = get_template(template)
    items = [tokenize_conversation(tokenizer, template, [*messages, {"role": "assistant", "content": choice}])
             for messages in prompts for choice in choices]
    pad, device = pad_id(tokenizer), next(model.parameters()).device
    scores = []
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc="scoring", disable=not progress or None, leave=False):
        batch = items[start:start + batch_size]
        inputs = right_pad([e["input_ids"] for e in batch], pad, [e["labels"] for e in batch], device=device)
        # Only the reply positions are projected onto the vocabulary.
        scores.extend((-token_nll(model, inputs, per="row").nats).tolist())
    return np.array(scores).reshape(len(prompts), len(choices))


def choice_accuracy(model, tokenizer, template, prompts: list[list[dict]], choices: list[str],
                    answers: list[int], batch_size: int = 16, progress: bool = True) -> dict:
    """Accuracy of the highest-scoring choice against `answers` (indices into `choices`)."""
    scores = score_choices(model, tokenizer, template, prompts, choices, batch_size, progress)
    predicted = scores.argmax(axis=1)
    counts = np.bincount(predicted, minlength=len(choices))
    return {"accuracy": float((predicted == np.asarray(answers)).mean()), "n": len(prompts),
            "predicted": {choice: int(c) for choice, c in zip(choices, counts, strict=True)}}
