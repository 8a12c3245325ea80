"""Training: continued pretraining and SFT, through one loop.

  run.py         what every run shares: the model loaded for training, the run folder checked, final/ written
  pretrain.py    packed blocks, validation, `zhllama train pretrain`
  sft.py         conversations rendered, tokenized and packed, `zhllama train sft`
  loop.py        the training loop (mixed precision, accumulation, checkpoints, logs)
  checkpoint.py  checkpoints written whole or not at all
  trainable.py   which weights train: all, embeddings, LoRA, QLoRA
  lora_merge.py  `zhllama lora merge`: adapters folded into their base
  varlen.py      attention one packed document or conversation at a time
  logs.py        log.jsonl and the loss plot
"""

from zhllama.config import SftConfig, TrainConfig
from zhllama.train.loop import IGNORE
from zhllama.train.pretrain import PackedTrainData, pretrain, validate
from zhllama.train.run import finish_run, load_for_training
from zhllama.train.sft import sft

__all__ = ["IGNORE", "PackedTrainData", "SftConfig", "TrainConfig", "finish_run", "load_for_training", "pretrain",
           "sft", "validate"]
