#!/usr/bin/env python3
"""Records transformers' `CLIPTokenizer` ids on varied prompts, for runner's tokenizer tests.

    .venv-fixtures/bin/python tools/make_tokenizer_refs.py

Loads the committed tokenizers (SD 1.5's, padded with `<|endoftext|>`, and SDXL's tokenizer_2,
padded with `!`, which is then also an added special token) and writes
tests/fixtures/refs/tokenizer.json: per prompt and tokenizer, the ids of
`tokenizer(text, padding="max_length", max_length=model_max_length, truncation=True)` and the
text diffusers reports as truncated (`StableDiffusionPipeline.encode_prompt`'s check), or null.
"""
import json
import unicodedata
from pathlib import Path

import tokenizers
import transformers
from transformers import CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "refs" / "tokenizer.json"
TOKENIZERS = ["tiny-sd15/tokenizer", "tiny-sdxl/tokenizer_2"]

LONG = ("a highly detailed photograph of an ancient castle on a hill at sunset, dramatic clouds, "
        "golden hour lighting, volumetric fog, intricate stonework, ivy covered walls, a winding road, "
        "horses and carriages, medieval villagers in colorful clothes, banners waving in the wind, "
        "birds flying over the towers, a calm lake reflecting the sky, mountains in the distance, "
        "snow on the peaks, ultra realistic, 8k, sharp focus, award winning, trending on artstation")

TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a cute dog running on the grass",
    "blurry",
    "",
    "   ",
    "\n\n\n",
    "a",
    "    leading and trailing    ",
    "hello,world!how are you?",
    "wow!!! really??? ... ok.",
    "!!! hello ! world!",
    "a!b",
    "A, B, C; D: E. F! G? H",
    "it's a dog's life, isn't it? we'll see, they'd've",
    "IT'S DON'T I'M YOU'RE WE'VE THEY'LL HE'D",
    "rock'n'roll ''quoted'' 's 't 're alone",
    "it\u2019s \u201ccurly\u201d \u2018single\u2019",
    "1234567890 3.14159 1,000,000 2nd 21st 100%",
    "version v2.1.0-beta_3 Mixed123abc456",
    "\uff11\uff12\uff13 \u0663\u0664\u0665 x\u00b2 \u00bd \u2153 \u2460 \u2211 \u2264 \u221e",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade",
    unicodedata.normalize("NFD", "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade"),
    "A\u030a e\u0301\u0301 o\u0308\u0304",
    "\u00c5ngstr\u00f6m \u00d8resund Stra\u00dfe \u00c9COLE \u1e9e",
    "\u0130stanbul \u01c4 \u01c5 \ufb01 \ufb00",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03a3\u039f\u03a6\u0399\u0391\u03a3",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u041c\u0418\u0420",
    "\u6771\u4eac\u306e\u591c\u666f\u3001\u7f8e\u3057\u3044\u685c",
    "\uff76\uff80\uff76\uff85 \u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    unicodedata.normalize("NFD", "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8"),
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u05e9\u05dc\u05d5\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a",
    "\U0001f431 cat \U0001f436 dog \U0001f44d\U0001f3fd \u2764\ufe0f \U0001f1ef\U0001f1f5 "
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "fish &amp; chips &lt;b&gt; &quot;quoted&quot; &#39;",
    "tabs\tand\nnewlines\r\n  multiple     spaces\x0bvt\x0cff",
    "\u00a0non-breaking\u2003em space\u3000ideographic\u2028line",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "a\x1fb\x00c\x07d",
    "<|startoftext|>a cat<|endoftext|>",
    "a<|endoftext|>b <|endoftext|><|endoftext|>",
    "<|ENDOFTEXT|> <|StartOfText|> <|endoftext <endoftext|>",
    "masterpiece, best quality, (ultra-detailed:1.2), [bad], {curly}, <lora:x:0.5>",
    "email@example.com https://example.com/path?q=1&r=2#frag",
    "snake_case camelCase PascalCase kebab-case C++ C# .NET node.js",
    "#hashtag @mention $100 \u20ac50 \u00a330 \u00a51000",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 400,
    "a " * 75,
    "a " * 76,
    "a " * 74 + "hello world",
    "a " * 75 + "\x1f end",  # the dropped text is `str.strip`ped: U+001F goes too
    LONG,
    LONG + " \U0001f3f0 caf\u00e9 \u6771\u4eac",
    LONG + " <|endoftext|> wow! it's done!!",
    ", ".join(["masterpiece", "best quality", "ultra-detailed", "illustration", "1girl", "solo",
               "long hair", "blue eyes", "school uniform", "cherry blossoms", "outdoors", "smile"] * 4),
    "\u00e9" * 120,
    "\U0001f600" * 60,
    "\U0001f600 " * 80,
    " ".join(str(i) for i in range(60)),
    "Don't stop (me) now!!! -- QUEEN, 1978",
]


def removed_text(tok, text):
    """diffusers `encode_prompt`: the part of the prompt dropped by truncation, or None."""
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    full = tok(text, padding="longest").input_ids
    if len(full) >= len(ids) and full != ids:
        return ids, tok.batch_decode([full[tok.model_max_length - 1:-1]])[0]
    return ids, None


def main():
    toks = {name: CLIPTokenizer.from_pretrained(FIX / name) for name in TOKENIZERS}
    cases = []
    for text in TEXTS:
        case = {"text": text}
        for name, tok in toks.items():
            ids, removed = removed_text(tok, text)
            case[name] = {"ids": ids, "truncated": removed}
        cases.append(case)
    head = {
        "generator": "tools/make_tokenizer_refs.py",
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "tokenizers": TOKENIZERS,
    }
    # One case a line: readable diffs, and a file of a few hundred lines rather than 10k.
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    body = json.dumps(head, indent=2, ensure_ascii=False)[:-2]
    text = body + ',\n  "cases": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n"
    json.loads(text)
    OUT.write_text(text, encoding="utf-8")
    print(f"{len(cases)} cases -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
