import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zhllama.config import TrainConfig
from zhllama.data import builtin
from zhllama.data.pack import pack
from zhllama.eval import track
from zhllama.eval.ppl import perplexity
from zhllama.train import pretrain

SEQ_LEN, STRIDE = 32, 16
STEPS, BATCH, BLOCK = 3, 2, 64
PROMPTS = ["中国的首都是", "<b>标签</b> & \"引号\""]  # the second must come out escaped on the page
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_zh_model, extended_dir):
    root = tmp_path_factory.mktemp("track")
    corpus = root / "corpus.jsonl"
    builtin.write_jsonl(corpus, "train", ["peoples_daily"], max_chars=8_000)
    packed = pack(extended_dir, [corpus], BLOCK, root / "packed")
    cfg = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=3e-3, warmup_steps=1, save_every=1, keep_checkpoints=3,
                      eval_every=100, log_every=1, seed=0, precision="fp32")
    return pretrain(tiny_zh_model, packed, root / "run", cfg)


@pytest.fixture(scope="module")
def heldout(run_dir, zh_heldout_texts):
    texts = [t[:150] for t in zh_heldout_texts[:4]]
    path = run_dir.parent / "heldout.jsonl"
    builtin.write_texts(path, texts)
    return path, texts


@pytest.fixture(scope="module")
def tracked(run_dir, heldout):
    prompts = run_dir.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = run_dir.parent / "track"
    kwargs = dict(every=1, data=[heldout[0]], prompts=prompts, out=out, device="cpu", seq_len=SEQ_LEN,
                  stride=STRIDE, max_new_tokens=6)
    scores = track.run_track(run_dir, **kwargs)
    return out, scores, kwargs


def test_every_checkpoint_and_final_is_scored_against_training_tokens(tracked):
    out, scores, _ = tracked
    assert [s["name"] for s in scores] == ["step-000001", "step-000002", "step-000003", "final"]
    assert [s["step"] for s in scores] == [1, 2, 3, 3]
    assert [s["tokens"] for s in scores] == [step * BATCH * BLOCK for step in (1, 2, 3, 3)]
    assert sorted(p.name for p in (out / "scores").iterdir()) == sorted(f"{s['name']}.json" for s in scores)
    assert len({s["heldout"]["nll_sum"] for s in scores[:3]}) == 3  # training moved the weights
    assert all(len(s["answers"]) == len(PROMPTS) and s["mc"] is None for s in scores)


def test_scores_equal_perplexity_computed_directly(run_dir, heldout, tracked):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = tracked
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "final")).eval()
    model.load_state_dict(load_file(str(run_dir / "checkpoints" / "step-000002" / "model.safetensors")),
                          strict=False)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "final"))
    direct = perplexity(model, tokenizer, heldout[1], SEQ_LEN, STRIDE, progress=False)
    saved = json.loads((out / "scores" / "step-000002.json").read_text())["heldout"]
    assert (saved["tokens"], saved["chars"], saved["docs"]) == (direct.tokens, direct.chars, 4)
    assert saved["nll_sum"] == pytest.approx(direct.nll_sum, rel=1e-6)
    assert saved["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert saved["bits_per_char"] == pytest.approx(direct.bits_per_char, rel=1e-6)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_page_holds_the_numbers_the_plots_and_the_escaped_answers(tracked):
    out, scores, _ = tracked
    page = (out / "index.html").read_text(encoding="utf-8")
    for s in scores:
        h = s["heldout"]
        row = (f"<tr><td>{s['name']}</td><td>{s['step']:,}</td><td>{s['tokens']:,}</td><td>{h['ppl']:.4f}</td>"
               f"<td>{h['bits_per_char']:.5f}</td><td>{h['tokens_per_char']:.4f}</td><td>—</td></tr>")
        assert row in page
    assert "&lt;b&gt;标签&lt;/b&gt; &amp; &quot;引号&quot;" in page and "<b>标签" not in page
    for name in ("heldout_ppl.png", "bits_per_char.png"):
        assert f'src="{name}"' in page
        width, height = png_size(out / name)
        assert width > 100 and height > 100
    assert not (out / "mc_accuracy.png").exists()


def test_rerun_skips_scored_checkpoints_and_scores_only_missing_ones(run_dir, tracked, monkeypatch, capsys):
    out, scores, kwargs = tracked
    calls = []
    real = track.perplexity
    monkeypatch.setattr(track, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "scores").iterdir()}
    again = track.run_track(run_dir, **kwargs)
    assert calls == [] and again == scores
    assert {p: p.stat().st_mtime_ns for p in (out / "scores").iterdir()} == mtimes
    assert capsys.readouterr().err.count("skipped (already scored)") == 4

    (out / "scores" / "step-000002.json").unlink()
    again = track.run_track(run_dir, **kwargs)
    assert len(calls) == 1 and capsys.readouterr().err.count("skipped (already scored)") == 3
    assert again[1]["heldout"] == scores[1]["heldout"]


def test_page_renders_in_headless_chromium(tracked):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    out, scores, _ = tracked
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto((out / "index.html").resolve().as_uri(), wait_until="load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            rows = page.locator("#metrics tbody tr").count()
            answers = page.locator("#answers tbody tr").count()
        finally:
            browser.close()
    assert len(widths) == 2 and all(w > 0 for w in widths)
    assert rows == len(scores) and answers == len(PROMPTS)
