"""Run logging: one JSON line per logging step, TensorBoard events, and loss.png at the end."""

from __future__ import annotations

import json
from pathlib import Path

from zhllama.artifacts import atomic_file, write_text_atomic
from zhllama.runs import LOG, read_log


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / LOG
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
        self.writer.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint, so the log reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if json.loads(ln)["step"] <= step]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
