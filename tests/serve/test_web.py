"""The web chat page at ``/``, driven in headless Chromium (Debian's /usr/bin/chromium; never `playwright install`).

The served model is the random tiny one: its replies are gibberish, deterministic at temperature 0, and never end
before max_tokens, so a long max_tokens keeps a reply streaming long enough to watch it grow and stop it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
Q1 = "你好，请用三句话介绍长城。"
Q2 = "谢谢！那故宫呢？"
# Set to a path to save a screenshot of the page after the conversation (for a person to look at).
SCREENSHOT = os.environ.get("ZHLLAMA_WEB_SCREENSHOT")

# Resolves once the first assistant bubble has shown two different non-empty lengths; it also notes whether Send
# was disabled and Stop enabled at that moment.
SEEN_GROWING = """() => {
  const el = document.querySelector('#messages .msg.assistant');
  const n = el ? el.textContent.length : 0;
  window.__lengths = window.__lengths || [];
  if (n > 0 && !window.__lengths.includes(n)) window.__lengths.push(n);
  if (window.__lengths.length < 2) return false;
  return {lengths: window.__lengths, send: document.querySelector('#send').disabled,
          stop: document.querySelector('#stop').disabled};
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 760}, locale="zh-CN")
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    context.close()


def open_page(page, server):
    page.goto(server.url + "/", wait_until="load")
    expect(page.locator("#status")).not_to_have_text("正在连接…")


def is_chat_post(request) -> bool:
    return request.method == "POST" and request.url.endswith("/v1/chat/completions")


def test_chat_streams_stops_and_keeps_history(page, live_server):
    open_page(page, live_server)
    expect(page.locator("#model")).to_contain_text("tiny-chat")
    expect(page.locator("#api-key")).to_be_visible()
    expect(page.locator("#stop")).to_be_disabled()
    page.fill("#api-key", live_server.api_key)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "256")
    page.fill("#input", Q1)
    with page.expect_request(is_chat_post) as first:
        page.click("#send")
    assert first.value.headers["authorization"] == f"Bearer {live_server.api_key}"
    sent = json.loads(first.value.post_data)
    assert sent["messages"] == [{"role": "user", "content": Q1}]
    assert (sent["stream"], sent["truncate"], sent["temperature"], sent["max_tokens"]) == (True, True, 0, 256)
    assert sent["model"] == "tiny-chat"

    expect(page.locator("#messages .msg.user")).to_have_text([Q1])
    seen = page.wait_for_function(SEEN_GROWING).json_value()
    page.click("#stop")
    assert seen["send"] is True and seen["stop"] is False, "Send must be disabled and Stop enabled while streaming"
    assert len(set(seen["lengths"])) >= 2

    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#status")).to_contain_text("停止")  # stopped, not finished
    assistant = page.locator("#messages .msg.assistant")
    expect(assistant).to_have_count(1)
    assert assistant.first.text_content().strip(), "the partial reply must stay on the page"

    # The second turn goes out with the whole history, the partial reply included; Enter sends it.
    page.fill("#max-tokens", "8")
    page.fill("#input", Q2)
    with page.expect_request(is_chat_post) as second:
        page.press("#input", "Enter")
    messages = json.loads(second.value.post_data)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == Q1 and messages[2]["content"] == Q2
    partial = messages[1]["content"]
    assert partial

    expect(page.locator("#status")).to_contain_text("length")  # the second reply ran to its max_tokens
    expect(page.locator("#messages .msg")).to_have_count(4)
    expect(page.locator("#messages .msg.user")).to_have_text([Q1, Q2])
    expect(page.locator("#messages .msg.assistant")).to_have_count(2)
    assert page.locator("#messages .msg.assistant").nth(1).text_content().strip()
    expect(page.locator("#send")).to_be_enabled()
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)

    # The kept reply is what the greedy model says from the start: it and a short whole reply are prefixes of each
    # other (a short one, as this CPU may be slow and shared).
    short = httpx.post(live_server.base_url + "/chat/completions", headers=live_server.headers(), timeout=120,
                       json={"model": "tiny-chat", "messages": [{"role": "user", "content": Q1}], "temperature": 0,
                             "max_tokens": 16}).json()["choices"][0]["message"]["content"]
    assert short and (short.startswith(partial) or partial.startswith(short))

    page.click("#new-chat")
    expect(page.locator("#messages .msg")).to_have_count(0)


def test_render_markdown_is_safe(page, open_server):
    open_page(page, open_server)
    expect(page.locator("#api-key")).to_be_hidden()  # this server needs no key
    text = ("# 长城\n你好，**粗体** 和 *斜体*，还有 `代码`。\n\n- 一\n- 二\n\n1. 甲\n2. 乙\n\n"
            "```python\nprint(\"你好\") # <b>\n```\n"
            "<script>alert(1)</script> <img src=x onerror=alert(1)> [好](https://example.com/?a=1&b=2) "
            "[坏](javascript:alert(1))")
    result = page.evaluate("""(text) => {
      const html = window.renderMarkdown(text);
      const box = document.createElement('div');
      box.innerHTML = html;
      const q = (s) => box.querySelector(s);
      return {html, text: box.textContent, dangerous: box.querySelectorAll('script, img, [onerror]').length,
              code: q('pre > code.language-python')?.textContent, strong: q('strong')?.textContent,
              em: q('em')?.textContent, h1: q('h1')?.textContent, ul: box.querySelectorAll('ul > li').length,
              ol: box.querySelectorAll('ol > li').length, inlineCode: q('p code')?.textContent,
              links: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href'))};
    }""", text)
    assert result["dangerous"] == 0
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in result["html"]
    assert "<script>alert(1)</script>" in result["text"]  # shown as text, not run
    assert result["code"] == 'print("你好") # <b>'
    assert (result["strong"], result["em"], result["h1"], result["inlineCode"]) == ("粗体", "斜体", "长城", "代码")
    assert (result["ul"], result["ol"]) == (2, 2)
    assert result["links"] == ["https://example.com/?a=1&b=2"]
    assert "[坏](javascript:alert(1))" in result["text"]


def test_wrong_api_key_shows_the_error(page, live_server):
    open_page(page, live_server)
    page.fill("#api-key", "sk-wrong")
    page.fill("#input", Q1)
    page.click("#send")
    status = page.locator("#status")
    expect(status).to_contain_text("401")
    expect(status).to_contain_text("API key")
    expect(status).to_have_class("error")
    expect(page.locator("#messages .msg")).to_have_count(0)  # the unanswered turn is dropped...
    expect(page.locator("#input")).to_have_value(Q1)  # ...and its text is given back to edit
    expect(page.locator("#send")).to_be_enabled()
    page.reload(wait_until="load")
    expect(page.locator("#api-key")).to_have_value("sk-wrong")  # the key is remembered
