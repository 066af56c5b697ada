"""Subtasks from two whole-scene sentences: word differences widened to whole noun phrases.

A plain word diff of "a green apple and a red cup" -> "a yellow apple and a red bowl" gives
fragments ("a green" -> "a yellow", "cup" -> "bowl") that a detector cannot ground and a text
encoder reads badly. Here both sentences are cut into noun-phrase chunks by a small rule-based
chunker (no tagger or weights are available offline), the word sequences are diffed, and every
differing word is mapped to the chunk it belongs to, giving ("a green apple" -> "a yellow
apple", "a red cup" -> "a red bowl").

Chunking rules (documented limits: a compound like "a big swimming pool" splits at
"swimming", and "that dog" loses its "that"):
- separators are punctuation and closed-class words: prepositions (including "next to",
  "on top of", "in front of"), conjunctions, pronouns, relative words, and a short list of
  verbs; a listed verb directly after a determiner is a modifier ("a sleeping cat");
- a determiner or number starts a new chunk (unless it follows another determiner, as in
  "all the two"); the word just before such a split is taken for an unlisted verb and
  dropped ("a dog chases the ball" -> "a dog", "the ball");
- "<chunk> is <bare predicate>" is one chunk ("the sky is blue"), so the attribute stays
  with its noun.

Pairing: chunks linked by an equal word, or changed in the same diff block (i-th with i-th
when both sides touch as many chunks), form one subtask; a changed target chunk with no
source counterpart is a new object, which this planner refuses (it needs a region).
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from gas_lightning.errors import PlannerError
from gas_lightning.plan import EditPlan, Subtask
from gas_lightning.planners.request import strip_quotes

_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['\u2019-]\w+)*|[^\w\s]")

DETERMINERS = frozenset(
    "a an the this these those my your his her its our their some any no every each another "
    "several many few both all half one two three four five six seven eight nine ten".split()
)
PREPOSITIONS = frozenset(
    "on in under behind with without near at of by beside besides between above below over "
    "inside outside into onto from for across along around against among through toward towards "
    "beneath underneath atop upon within like past after before about off out up down via "
    "to next".split()
)
MULTIWORD_PREPOSITIONS = (
    ("next", "to"),
    ("close", "to"),
    ("on", "top", "of"),
    ("in", "front", "of"),
    ("in", "the", "middle", "of"),
    ("to", "the", "left", "of"),
    ("to", "the", "right", "of"),
    ("on", "the", "left", "of"),
    ("on", "the", "right", "of"),
)
CONJUNCTIONS = frozenset("and or but nor while whereas as than so then".split())
PRONOUNS = frozenset("it it's they them he she him i we you that which who whom whose where when there there's".split())
COPULAS = frozenset("is are was were looks seems appears becomes".split())
VERBS = COPULAS | frozenset(
    "be been being am has have had sits sit sitting stands standing lies lying lays laying rests "
    "resting holds holding held wears wearing carries carrying eating drinking playing running "
    "walking flying swimming floating hangs hanging leans leaning looking facing rides riding "
    "chasing grazing sleeping jumping reading watching covered filled made placed perched "
    "surrounded topped shown seen".split()
)
SEPARATORS = PREPOSITIONS | CONJUNCTIONS | PRONOUNS | VERBS


class _Sentence:
    """A sentence as tokens with character offsets and a chunk id per token (None = separator)."""

    def __init__(self, text: str, what: str):
        self.text = " ".join(strip_quotes(text).split()) if isinstance(text, str) else ""
        if not self.text:
            raise PlannerError(f"the {what} sentence is empty; give a whole-scene sentence such as 'a dog on a sofa'.")
        matches = list(_TOKEN.finditer(self.text))
        self.spans = [m.span() for m in matches]
        self.words = [m.group().lower() for m in matches]
        self.chunk_of = self._chunk(self.words)

    @staticmethod
    def _chunk(words: list[str]) -> list[int | None]:
        n = len(words)
        sep = [not re.match(r"\w", w) or w in SEPARATORS for w in words]
        for i, w in enumerate(words):  # "a sleeping cat": a verb right after a determiner is a modifier
            if sep[i] and w in VERBS and i > 0 and words[i - 1] in DETERMINERS:
                sep[i] = False
        for phrase in MULTIWORD_PREPOSITIONS:
            k = len(phrase)
            for i in range(n - k + 1):
                if tuple(words[i : i + k]) == phrase:
                    sep[i : i + k] = [True] * k
        chunk_of: list[int | None] = [None] * n
        current = -1
        for i in range(n):
            if sep[i]:
                continue
            if i == 0 or sep[i - 1]:
                current += 1
            elif words[i] in DETERMINERS and words[i - 1] not in DETERMINERS:
                # a determiner inside a run starts a new phrase; the word before it is a verb
                if i >= 2 and chunk_of[i - 2] == current:
                    chunk_of[i - 1] = None
                current += 1
            chunk_of[i] = current
        # "the sky is blue": a bare predicate after a copula stays with its subject
        for i in range(1, n - 1):
            before, after = chunk_of[i - 1], chunk_of[i + 1]
            if words[i] in COPULAS and before is not None and after is not None and words[i + 1] not in DETERMINERS:
                for j in range(i, n):
                    if j > i and chunk_of[j] != after:
                        break
                    chunk_of[j] = before
        return chunk_of

    def chunks(self, token_range: range) -> list[int]:
        """Chunk ids met in a token range, in order, without repeats."""
        return list(dict.fromkeys(c for c in (self.chunk_of[i] for i in token_range) if c is not None))

    def enclosing(self, i: int) -> int | None:
        """The chunk that an insertion point before token i falls inside, if any."""
        if 0 < i < len(self.words) and self.chunk_of[i - 1] is not None and self.chunk_of[i - 1] == self.chunk_of[i]:
            return self.chunk_of[i]
        return None

    def phrase(self, chunk_ids: list[int]) -> str:
        """Original text from the first to the last of these chunks."""
        idx = [i for i, c in enumerate(self.chunk_of) if c in chunk_ids]
        return self.text[self.spans[idx[0]][0] : self.spans[idx[-1]][1]]

    def first_token(self, chunk_ids: list[int]) -> int:
        return min(i for i, c in enumerate(self.chunk_of) if c in chunk_ids)


def diff_sentences(source: str, target: str) -> EditPlan:
    """Two whole-scene sentences -> one subtask per changed noun phrase, in sentence order."""
    src, tgt = _Sentence(source, "source"), _Sentence(target, "target")
    if [w for w in src.words if w[0].isalnum()] == [w for w in tgt.words if w[0].isalnum()]:
        raise PlannerError("the sentences are identical; nothing to edit.")  # up to case and punctuation

    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    def union(nodes):
        for node in nodes[1:]:
            parent[find(node)] = find(nodes[0])

    changed: set[tuple[str, int]] = set()
    differing: list[str] = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, src.words, tgt.words, autojunk=False).get_opcodes():
        if tag == "equal":
            for a, b in zip(src.chunk_of[i1:i2], tgt.chunk_of[j1:j2]):
                if a is not None and b is not None:
                    union([("s", a), ("t", b)])
            continue
        differing.append(
            f"{' '.join(src.words[i1:i2]) or '(nothing)'!r} -> {' '.join(tgt.words[j1:j2]) or '(nothing)'!r}"
        )
        s_nodes = [("s", c) for c in src.chunks(range(i1, i2))]
        t_nodes = [("t", c) for c in tgt.chunks(range(j1, j2))]
        # a word inserted (deleted) inside a phrase changes the phrase around the insertion point
        if not s_nodes and t_nodes and src.enclosing(i1) is not None:
            s_nodes = [("s", src.enclosing(i1))]
        if not t_nodes and s_nodes and tgt.enclosing(j1) is not None:
            t_nodes = [("t", tgt.enclosing(j1))]
        for node in s_nodes + t_nodes:
            find(node)
        if len(s_nodes) == len(t_nodes):
            for pair in zip(s_nodes, t_nodes):
                union(list(pair))
        elif s_nodes and t_nodes:
            union(s_nodes + t_nodes)
        changed.update(s_nodes + t_nodes)

    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for node in list(parent):
        groups.setdefault(find(node), []).append(node)
    pairs = []
    for members in groups.values():
        if not changed.intersection(members):
            continue
        s_ids = sorted(c for side, c in members if side == "s")
        t_ids = sorted(c for side, c in members if side == "t")
        if not s_ids:
            raise PlannerError(
                f"'{tgt.phrase(t_ids)}' in the target sentence has no counterpart in the source sentence: adding a "
                "new object needs an explicit plan with a region, e.g. source 'the grass', target "
                f"'{tgt.phrase(t_ids)} on the grass' and a box where it should appear."
            )
        if not t_ids:
            raise PlannerError(
                f"'{src.phrase(s_ids)}' in the source sentence has no counterpart in the target sentence: removing "
                "an object needs an explicit plan saying what replaces it, e.g. source "
                f"'{src.phrase(s_ids)}', target 'the empty floor', with a box."
            )
        pairs.append((src.first_token(s_ids), src.phrase(s_ids), tgt.phrase(t_ids)))
    if not pairs:
        raise PlannerError(
            f"the sentences differ only in words outside noun phrases ({'; '.join(differing)}), so there is no "
            "object to edit; give source and target phrases explicitly."
        )
    seen, subtasks = set(), []
    for _, a, b in sorted(pairs):
        if (a.lower(), b.lower()) not in seen:
            seen.add((a.lower(), b.lower()))
            subtasks.append(Subtask(source=a, target=b))
    return EditPlan(source_prompt=src.text, target_prompt=tgt.text, subtasks=tuple(subtasks))
