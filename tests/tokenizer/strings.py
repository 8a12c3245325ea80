"""Random test strings that mix everything a Chinese Llama tokenizer meets.

They may contain "<s>" or "</s>" as text: compare with sentencepiece using split_special_tokens=True.
"""

import random

HAN = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而"
ZH_TW = "臺灣說話體龍與為們個這國際學習電腦網路資訊開發環境設計團隊專業"
PUNCT = "，。！？、；：「」『』（）《》〈〉【】…—～·“”‘’"
EMOJI = ["😀", "🎉", "🚀", "👍🏽", "🇨🇳", "❤️", "👨‍👩‍👧", "🧑🏻‍💻"]
WORDS = ["hello", "world", " the", "Tokenizer", "中华人民共和国", "人工智能", "Llama-2", "    return x", "\n    ",
         "def f(x):", "if (a && b) {", "https://example.com/a?b=1", "café", "naïve", "Ελληνικά", "русский",
         "日本語のテキスト"]
ASCII_CODE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ_(){}[]<>=+-*/;:,.'\"#"
WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", "\u3000", " \t ", "        "]


def _ext_b(rng):
    return chr(rng.randint(0x20000, 0x2A6DF))


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    makers = [
        lambda: "".join(rng.choice(HAN) for _ in range(rng.randint(1, 12))),
        lambda: "".join(rng.choice(ZH_TW) for _ in range(rng.randint(1, 6))),
        lambda: rng.choice(PUNCT),
        lambda: "".join(_ext_b(rng) for _ in range(rng.randint(1, 3))),
        lambda: rng.choice(EMOJI),
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 9))),
        lambda: rng.choice(WORDS),
        lambda: rng.choice(WHITESPACE) * rng.randint(1, 6),
        lambda: "".join(rng.choice(ASCII_CODE) for _ in range(rng.randint(1, 10))),
    ]
    return ["".join(rng.choice(makers)() for _ in range(rng.randint(1, 10))) for _ in range(n)]
