"""A CLIP-format tokenizer whose every world word is one token.

Prompts of the bundled model then take exactly the same path as Stable Diffusion prompts
(CLIPTokenizer.from_pretrained on a folder). The files are the standard vocab.json and
merges.txt: a byte-level base alphabet (so any text tokenizes) plus merges learnt by a tiny
BPE run on the world's words, so that each of them becomes a single token.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from gas_lightning.errors import PlanError
from gas_lightning.worlds.scenes import BACKGROUNDS, COLOURS, SHAPES

EXTRA_WORDS = (
    "a",
    "an",
    "the",
    "and",
    "on",
    "in",
    "with",
    "of",
    "into",
    "to",
    ",",
    ".",
    "background",
    "scene",
    "image",
    "change",
    "shape",
    "colour",
    "color",
    "object",
)
WORDS: tuple[str, ...] = tuple(dict.fromkeys((*COLOURS, *SHAPES, *BACKGROUNDS, *EXTRA_WORDS)))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 24  # longest caption is 15 tokens with BOS/EOS


def unknown_words(texts: list[str]) -> list[str]:
    """The words of `texts` the bundled model never saw, in order, once each. Its tokenizer would
    split them into letters and the edit would follow noise."""
    words = [w for t in texts for w in re.findall(r"[a-z]+|[^a-z\s]", t.lower())]
    return list(dict.fromkeys(w for w in words if w not in WORDS and w.isalpha()))


def check_known(texts: list[str]) -> None:
    """Refuse, before any step, an edit whose phrases hold words the bundled model does not know."""
    unknown = unknown_words(texts)
    if unknown:
        raise PlanError(
            f"the bundled model does not know the word{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}: it knows only its shapes world (colours {', '.join(COLOURS)}; shapes "
            f"{', '.join(SHAPES)}; backgrounds {', '.join(BACKGROUNDS)}). Edit a world scene with those words, or a "
            "photo with a Stable Diffusion model (--model /models/sd15 --config configs/sd15.yaml)"
        )


def byte_alphabet() -> dict[int, str]:
    """Map every byte to a printable character (the byte-level BPE convention CLIP uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _symbols(word: str, table: dict[int, str]) -> tuple[str, ...]:
    chars = [table[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + "</w>")


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair until every word is one symbol."""
    table = byte_alphabet()
    seqs = [_symbols(w, table) for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = max(pairs, key=lambda p: (pairs[p], p))  # deterministic tie-break
        merges.append(best)
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(tuple(out))
        seqs = new
    return merges


def write_tokenizer(folder: str | Path, config: bool = True) -> Path:
    """Write vocab.json, merges.txt and (with `config`) the tokenizer config; load with CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(byte_alphabet().values())
    merges = learn_merges(WORDS)
    tokens = [*base, *(c + "</w>" for c in base), *(a + b for a, b in merges), BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if not config:
        return folder
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2) + "\n"
    )
    return folder
