"""Tool calling, from training data to the OpenAI API, on a 2-core CPU in under a minute.

1. A tiny random Llama with the real Llama-2 vocabulary (`tokenizer from-gguf`, `model init`).
2. SFT with the chatml template (Qwen2.5's `<tool_call>` format) on tool conversations in LLaMA-Factory's format
   (`function_call` and `observation` turns plus a `tools` JSON string, as in glaive_toolcall_zh_demo.json): a few
   planted ones by default, or your own file with --data. Loss is on the calls and the answers, never on the tool
   results.
3. The model served (`zhllama serve`'s app, in a thread), then asked through the official openai client with
   `tools=[...]`: the reply is a tool call; the tool's result goes back and the model answers.

    python examples/tool_calling.py [--out runs/tool-example] [--data glaive_style.json --steps 400]

A random tiny model only learns what it is shown, so the planted conversations are asked again word for word;
a real model trained on glaive_toolcall data generalises to new questions the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

WEATHER = {"name": "get_weather", "description": "查询城市天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PLANTED = [("北京今天天气怎么样？", "get_weather", {"city": "北京"}, "晴，25度", "北京今天晴，25度。"),
           ("上海今天天气怎么样？", "get_weather", {"city": "上海"}, "小雨，18度", "上海今天有小雨，18度。")]


def planted_records() -> list[dict]:
    """LLaMA-Factory tool records: human, function_call, observation, gpt; tools as a JSON string."""
    return [{"conversations": [{"from": "human", "value": question},
                               {"from": "function_call", "value": json.dumps({"name": name, "arguments": args},
                                                                             ensure_ascii=False)},
                               {"from": "observation", "value": result},
                               {"from": "gpt", "value": answer}],
             "tools": json.dumps([WEATHER], ensure_ascii=False)}
            for question, name, args, result, answer in PLANTED]


def main() -> None:
    import openai

    from zhllama import model, tokenizer
    from zhllama.assets import llama2_vocab_gguf
    from zhllama.config import SftConfig
    from zhllama.infer import load_engine
    from zhllama.serve import ServeConfig, serve_in_thread
    from zhllama.train import sft

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/tool-example"))
    p.add_argument("--data", type=Path, help="LLaMA-Factory tool conversations (default: two planted ones)")
    p.add_argument("--steps", type=int, default=80)
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = args.out / "tools.json"
        data.write_text(json.dumps(planted_records(), ensure_ascii=False, indent=1), encoding="utf-8")
    tok = tokenizer.from_gguf(llama2_vocab_gguf(), args.out / "tokenizer")
    base = model.init_model("tiny", tok, args.out / "model", seed=0)
    cfg = SftConfig(template="chatml", seq_len=512, packing=False, max_steps=args.steps, batch_size=2, lr=3e-3,
                    min_lr_ratio=1.0, warmup_steps=2, weight_decay=0.0, save_every=10_000, eval_every=10_000,
                    eval_batches=1, log_every=10, seed=0, precision="fp32", val_fraction=0.0)
    shutil.rmtree(args.out / "run-sft", ignore_errors=True)  # the example's own run: start it afresh
    run = sft(base, [data], args.out / "run-sft", cfg)

    engine = load_engine(run / "final", device="cpu", name="tiny-tools")
    background = serve_in_thread(engine, ServeConfig(port=0))
    try:
        client = openai.OpenAI(base_url=background.url + "/v1", api_key="unused", max_retries=0)
        tools = [{"type": "function", "function": WEATHER}]
        messages = [{"role": "user", "content": PLANTED[0][0]}]
        reply = client.chat.completions.create(model="tiny-tools", messages=messages, tools=tools, temperature=0)
        call = reply.choices[0].message.tool_calls[0]
        print(f"user: {messages[0]['content']}\nassistant calls {call.function.name}({call.function.arguments}) "
              f"[finish_reason: {reply.choices[0].finish_reason}]")
        messages += [reply.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": PLANTED[0][3]}]
        answer = client.chat.completions.create(model="tiny-tools", messages=messages, tools=tools, temperature=0)
        print(f"tool: {PLANTED[0][3]}\nassistant: {answer.choices[0].message.content}")
    finally:
        background.stop()
        engine.close()


if __name__ == "__main__":
    main()
