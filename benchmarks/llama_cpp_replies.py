"""Check: the exported GGUF answers in llama.cpp as the trained run answers in transformers.

The consumer is real: llama.cpp through ``llama-cpp-python`` (not a dependency; ``pip install
llama-cpp-python`` builds llama.cpp, about 15 minutes on 2 cores). The demo run (``make demo`` trains it)
is exported with ``oasst_peft.export.export_gguf`` to f32, f16 and q8_0, and for each file:

- the prompts (the cards' widget prompts plus two arithmetic questions like the demo data's), rendered by
  the run's saved template, are tokenized by llama.cpp: the ids must equal the run's tokenizer's;
- llama.cpp's chat completion renders the same prompts with the template embedded in the GGUF: the
  text must equal training's rendering;
- llama.cpp greedy-decodes each prompt (temperature 0, no repeat penalty) and the reply is compared
  with the run's greedy reply in transformers (``generate_replies`` on what ``oasst-peft sample``
  loads, fp32), and whether each stopped at the end-of-turn token.

Target: with f32 every reply is the same text and stops the same way. f16 and q8_0 are reported (replies
the same, and where the first one differs), not judged: rounding may flip a near tie. Prints a table,
then one summary line; exits 1 on a miss, 2 when llama-cpp-python or the run is missing.

    PYTHONPATH=. python benchmarks/llama_cpp_replies.py [--run runs/demo-smollm2] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXTRA_PROMPTS = ("How much is 673 + 949?", "Convert 12 kilometres to metres.")
TYPES = ("f32", "f16", "q8_0")


def llama_cpp_side(gguf: Path, prompts: list[list[dict]], texts: list[str], max_new_tokens: int) -> dict:
    """Token ids, the runtime's own rendering and greedy replies from llama.cpp for one GGUF file."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=2, seed=0, verbose=False, logits_all=False)
    meta = llm.metadata
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    formatter = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"], eos_token=eos, bos_token=eos, add_generation_prompt=True
    )
    ids, rendered, replies = [], [], []
    for messages, text in zip(prompts, texts, strict=True):
        ids.append(llm.tokenize(text.encode(), add_bos=False, special=True))
        rendered.append(formatter(messages=messages).prompt)
        out = llm.create_completion(
            text, max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, seed=0
        )
        choice = out["choices"][0]
        replies.append({"reply": choice["text"], "stopped": choice["finish_reason"] == "stop"})
    return {"ids": ids, "rendered": rendered, "replies": replies, "eos": eos}


def in_own_process(gguf: Path, prompts, texts, max_new_tokens: int) -> dict | None:
    """``llama_cpp_side`` in a fresh process, so that a crash of the runtime is reported, not fatal: None then."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(llama_cpp_side, gguf, prompts, texts, max_new_tokens).result()
        except BrokenProcessPool:
            return None


def first_difference(a: str, b: str) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo-smollm2")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the GGUF files go (default: a temp dir)"
    )
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (it builds llama.cpp)")
        return 2
    if not (args.run / "oasst_run.json").is_file():
        print(f"{args.run}: no finished run; train it first with: make demo")
        return 2

    from oasst_peft.export import export_gguf
    from oasst_peft.sample import generate_replies, prompt_ids, render_prompt, widget_prompts
    from oasst_peft.sampler import load_sampler

    prompts = [*widget_prompts(), *([{"role": "user", "content": q}] for q in EXTRA_PROMPTS)]
    s = load_sampler(args.run, dtype="fp32")  # what `oasst-peft sample RUN` loads: the adapter on the base
    texts = [render_prompt(s.tokenizer, m) for m in prompts]
    hf_ids = [prompt_ids(s.tokenizer, m) for m in prompts]
    hf = generate_replies(
        s.model, s.tokenizer, prompts, "greedy", args.max_new_tokens, s.eos_ids, s.pad_id, 8, 0
    )
    del s
    print(f"llama-cpp-python {llama_cpp.__version__}; run {args.run}; {len(prompts)} prompts, greedy, "
          f"{args.max_new_tokens} new tokens at most")  # fmt: skip
    ok = True
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for qtype in TYPES:
            gguf = Path(tmp) / f"demo-{qtype}.gguf"
            export_gguf(args.run, gguf, qtype=qtype, modelfile=False, say=lambda _m: None)
            got = in_own_process(gguf, prompts, texts, args.max_new_tokens)
            if got is None:
                print(f"{qtype:>5}: llama.cpp crashed on this file (run it alone to see the signal)")
                ok = False
                continue
            same_ids = sum(a == b for a, b in zip(got["ids"], hf_ids, strict=True))
            same_render = sum(a == b for a, b in zip(got["rendered"], texts, strict=True))
            same, stops, firsts = 0, 0, []
            for mine, theirs in zip(hf, got["replies"], strict=True):
                diff = first_difference(mine["reply"], theirs["reply"])
                same += diff is None
                stops += mine["ended_with_eot"] == theirs["stopped"]
                if diff is not None:
                    firsts.append(diff)
            n = len(prompts)
            print(
                f"{qtype:>5}: token ids {same_ids}/{n}, runtime template rendering {same_render}/{n}, "
                f"replies identical {same}/{n}, stopped alike {stops}/{n}, eos {got['eos']!r}"
                + (f", first difference at character {min(firsts)}" if firsts else "")
            )
            if qtype == "f32":
                ok = ok and same_ids == n and same_render == n and same == n and stops == n
                for p, mine, theirs in zip(prompts, hf, got["replies"], strict=True):
                    if mine["reply"] != theirs["reply"]:
                        print(f"    {p[-1]['content'][:40]!r}: transformers {mine['reply']!r}")
                        print(f"    {'':40}  llama.cpp    {theirs['reply']!r}")
            else:
                ok = ok and same_ids == n and same_render == n
    for r in hf:
        print(f"  transformers: {r['reply'][:90]!r} (ended with eot: {r['ended_with_eot']})")
    print(
        f"llama.cpp check: {'met' if ok else 'MISSED'} (f32 replies and stops identical, ids and rendering equal)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
