"""The HTML page of ``zhllama eval qa``: questions by category, one answer column per model, judge scores.

One self-contained file (no scripts, no external assets) so it opens anywhere and can be mailed around. Every
piece of model or question text goes through ``html.escape``: answers are untrusted text and may contain markup.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict

# Chinese needs a CJK font named first, or browsers fall back to mismatched glyphs (Japanese forms, for one).
CJK_FONTS = ('"PingFang SC", "Hiragino Sans GB", "Noto Sans CJK SC", "Source Han Sans SC", "Microsoft YaHei", '
             '"WenQuanYi Micro Hei", sans-serif')

STYLE = f"""
body {{ font-family: {CJK_FONTS}; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222;
       line-height: 1.6; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }}
table.scores {{ border-collapse: collapse; margin: 1em 0; }}
table.scores th, table.scores td {{ border: 1px solid #ccc; padding: .3em .8em; text-align: right; }}
table.scores th:first-child, table.scores td:first-child {{ text-align: left; }}
.item {{ border: 1px solid #e3e3e3; border-radius: 6px; margin: 1em 0; padding: .8em 1em; }}
.question {{ font-weight: 600; white-space: pre-wrap; }}
.meta, .stats {{ color: #888; font-size: .85em; }}
.answers {{ display: grid; gap: 1em; margin-top: .6em; }}
.answer {{ background: #f7f7f9; border-radius: 4px; padding: .6em .8em; min-width: 0; }}
.answer h4 {{ margin: 0 0 .3em; font-size: .9em; color: #555; }}
.text {{ white-space: pre-wrap; word-wrap: break-word; }}
.score {{ display: inline-block; font-weight: 600; padding: 0 .4em; border-radius: 3px; background: #e8f0fe; }}
.score.none {{ background: #fde8e8; }}
details {{ margin-top: .4em; }} summary {{ cursor: pointer; color: #555; }}
nav a {{ margin-right: 1em; }}
"""


def render_report(questions, rows: list[dict], models: list[str], summary: dict, source: str) -> str:
    """The whole page: header, score table (when judged), then every category's questions with all answers."""
    e = html.escape
    answers = {(row["id"], row["model"]): row for row in rows}
    by_category: dict[str, list] = defaultdict(list)
    for q in questions:
        by_category[q.category].append(q)
    judged = summary.get("scores") is not None

    parts = ['<!DOCTYPE html>', '<html lang="zh-CN"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f'<title>问答评测 · {e(" vs ".join(models))}</title>', f'<style>{STYLE}</style></head><body>',
             f'<h1>问答评测 · {e(" vs ".join(models))}</h1>',
             f'<p class="meta">{len(questions)} questions from {e(source)} in {len(by_category)} categories · '
             f'{len(models)} model(s) · greedy decoding · {e(time.strftime("%Y-%m-%d %H:%M"))}</p>']
    if judged:
        parts.append(_score_table(summary, models, list(by_category)))
        parts.append(f'<details><summary>Judge rubric ({e(summary["judge"]["model"])})</summary>'
                     f'<div class="text">{e(summary["judge"]["rubric"])}</div></details>')
    parts.append("<nav>" + "".join(f'<a href="#cat-{i}">{e(c)} ({len(qs)})</a>'
                                   for i, (c, qs) in enumerate(by_category.items())) + "</nav>")
    columns = f"repeat({len(models)}, minmax(0, 1fr))"
    for i, (category, qs) in enumerate(by_category.items()):
        parts.append(f'<h2 id="cat-{i}">{e(category)} <span class="meta">({len(qs)})</span></h2>')
        for q in qs:
            parts.append('<div class="item">')
            sub = f" · {e(q.subcategory)}" if q.subcategory else ""
            parts.append(f'<div class="meta">#{e(q.id)}{sub}</div><div class="question">{e(q.question)}</div>')
            if q.reference:
                parts.append(f'<details><summary>参考答案</summary><div class="text">{e(q.reference)}</div>'
                             '</details>')
            parts.append(f'<div class="answers" style="grid-template-columns: {columns}">')
            for model in models:
                parts.append(_answer_cell(answers.get((q.id, model)), model, judged))
            parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _answer_cell(row: dict | None, model: str, judged: bool) -> str:
    e = html.escape
    if row is None:
        return f'<div class="answer"><h4>{e(model)}</h4><div class="meta">no answer</div></div>'
    score = ""
    if judged:
        value = row.get("judge_score")
        if value is None:
            score = '<span class="score none" title="the judge gave no parseable score">—</span> '
        else:
            score = f'<span class="score">{e(str(value))}/10</span> '
        if row.get("judge_reason"):
            score += f'<span class="meta">{e(row["judge_reason"])}</span>'
        elif row.get("judge_reply") is not None:
            score += f'<details><summary>judge reply</summary><div class="text">{e(row["judge_reply"])}</div></details>'
    stats = f'{e(str(row["tokens"]))} tokens · {row["seconds"]:.1f} s · {e(row["finish_reason"])}'
    return (f'<div class="answer"><h4>{e(model)}</h4><div class="text">{e(row["answer"])}</div>'
            f'<div class="stats">{stats}</div><div>{score}</div></div>')


def _score_table(summary: dict, models: list[str], categories: list[str]) -> str:
    e = html.escape
    scores = summary["scores"]

    def cell(entry: dict) -> str:
        mean = "—" if entry["mean"] is None else f'{entry["mean"]:.2f}'
        missing = f' <span class="meta">({entry["unscored"]} unscored)</span>' if entry["unscored"] else ""
        return f"<td>{mean}{missing}</td>"

    head = "<tr><th>类别</th>" + "".join(f"<th>{e(m)}</th>" for m in models) + "</tr>"
    body = ["<tr><td>" + e(c) + "</td>" + "".join(cell(scores[m]["categories"][c]) for m in models) + "</tr>"
            for c in categories]
    overall = "<tr><th>总体</th>" + "".join(cell(scores[m]["overall"]) for m in models) + "</tr>"
    return f'<table class="scores">{head}{"".join(body)}{overall}</table>'
