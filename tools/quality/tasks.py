"""The four task families, the pretraining corpus and the out-of-distribution prompts.

Everything is generated from seeded `random.Random` instances (string seeds hash with sha512,
so the data are identical on every machine and Python run). An example is a (prompt, answer)
pair: the model sees `<s>` + prompt and must generate answer + `</s>`; exact match compares the
stripped generated text with the stripped answer.

Families (the expert names are the task names):

  math   multi-digit arithmetic            "calc 347 + 589 ="          -> " 936"
  code   Python list expressions           "py sorted([5, 2, 9, 1])"  -> " [1, 2, 5, 9]"
  facts  QA over a synthetic fact base     "Q: Where was Tavo Rimek born? A:" -> " Lisbon"
         (the biographies are in the pretraining corpus; the expert is fine-tuned on them and
         on questions about half of the people, and is tested on the other half)
  trans  translation into a made-up SOV    "en2zo: the red cat sees a dog" -> " miro ka tula ven"
         language (lexicon + word order; both languages appear, unpaired, in pretraining)

Held-out test sets: drawn first from their own seeds; the fine-tuning generators skip every
prompt that is in a test set (math, code, trans) or draw from the people not tested (facts).

Out-of-distribution prompts (`ood_set`) mix two families' formats and skills, or a family and
the pretraining corpus: none of the experts was fine-tuned on them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("math", "code", "facts", "trans")
TASK_TYPES = {"math": "math", "code": "code", "facts": "chat", "trans": "chat"}  # 1bit `paper` preset


@dataclass(frozen=True)
class Difficulty:
    """Sizes of the problems (the smoke configuration makes them easy)."""

    max_operand: int = 999  # math: a + b and a - b operands; a * b uses max_mul x 9
    max_mul: int = 99
    list_min: int = 2
    list_max: int = 6
    people: int = 240  # facts: people in the fact base (half asked in fine-tuning, half tested)
    sentence_max_adj: int = 2  # trans: adjectives per sentence at most


# ---- the fact base --------------------------------------------------------------------------

_ONSETS = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "pl", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "m"]
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Dakar", "Hanoi", "Perth", "Tunis", "Sofia", "Riga", "Bern", "Doha", "Kyiv", "Minsk", "Rabat", "Accra", "Dhaka", "Seoul", "Delhi", "Tokyo", "Paris", "Rome", "Athens"]
JOBS = ["baker", "pilot", "farmer", "doctor", "painter", "sailor", "teacher", "lawyer", "miner", "nurse", "tailor", "singer", "driver", "dancer", "writer", "cook", "plumber", "judge", "guard", "potter"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray", "violet"]
ATTRS = ("city", "job", "color")
_BIO = {
    "city": ["{n} was born in {v}.", "{n} came into the world in {v}.", "The birthplace of {n} is {v}.", "{n} is a native of {v}."],
    "job": ["{n} works as a {v}.", "{n} earns a living as a {v}.", "By trade, {n} is a {v}.", "The job of {n} is {v}."],
    "color": ["{n} likes the color {v}.", "The favorite color of {n} is {v}.", "{n} loves anything {v}.", "{n} prefers {v} to other colors."],
}
_QUESTION = {"city": "Q: Where was {n} born? A:", "job": "Q: What is the job of {n}? A:", "color": "Q: What color does {n} like? A:"}


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _name(rng: random.Random) -> str:
    first = "".join(_syllable(rng) for _ in range(rng.randint(1, 2))).capitalize()
    last = "".join(_syllable(rng) for _ in range(2)).capitalize()
    return f"{first} {last}"


def fact_base(n_people: int, seed: str = "facts") -> list[dict]:
    """[{name, city, job, color}], unique names, deterministic."""
    rng = random.Random(seed)
    people, seen = [], set()
    while len(people) < n_people:
        n = _name(rng)
        if n in seen:
            continue
        seen.add(n)
        people.append({"name": n, "city": rng.choice(CITIES), "job": rng.choice(JOBS), "color": rng.choice(COLORS)})
    return people


def biography(person: dict, rng: random.Random) -> str:
    attrs = list(ATTRS)
    rng.shuffle(attrs)
    return " ".join(rng.choice(_BIO[a]).format(n=person["name"], v=person[a]) for a in attrs)


def fact_question(person: dict, attr: str) -> tuple[str, str]:
    return _QUESTION[attr].format(n=person["name"]), " " + person[attr]


def split_people(people: list[dict]) -> tuple[list[dict], list[dict]]:
    """(asked in fine-tuning, tested): even / odd positions."""
    return people[0::2], people[1::2]


# ---- the made-up language -------------------------------------------------------------------

NOUNS = {"cat": "miro", "dog": "tula", "bird": "pesk", "fish": "lomu", "horse": "dranu", "child": "kivo", "king": "ostra",
         "tree": "bal", "ship": "nevro", "man": "guto", "woman": "fela", "wolf": "rask"}
ADJS = {"red": "ka", "big": "ven", "small": "pim", "old": "druk", "young": "sel", "happy": "olo", "dark": "mur",
        "quick": "fis", "blue": "azo", "tall": "hon"}
VERBS = {"sees": "zen", "likes": "lupa", "follows": "treka", "finds": "noshe", "helps": "vaidi", "chases": "kuro",
         "hears": "ebri", "feeds": "mamu", "calls": "sovi", "fears": "grolo"}
LEXICON = {**NOUNS, **ADJS, **VERBS}


def _noun_phrase(rng: random.Random, max_adj: int) -> tuple[list[str], list[str]]:
    noun = rng.choice(sorted(NOUNS))
    adjs = rng.sample(sorted(ADJS), rng.randint(0, max_adj))
    det = rng.choice(["the", "a"])
    en = [det, *adjs, noun]
    zo = [NOUNS[noun], *[ADJS[a] for a in adjs]]  # nouns first, adjectives after, no articles
    return en, zo


def sentence_pair(rng: random.Random, max_adj: int) -> tuple[str, str]:
    """(English, Zorbish): subject-object-verb, adjectives after the noun, no articles."""
    s_en, s_zo = _noun_phrase(rng, max_adj)
    o_en, o_zo = _noun_phrase(rng, max_adj)
    verb = rng.choice(sorted(VERBS))
    return " ".join(s_en + [verb] + o_en), " ".join(s_zo + o_zo + [VERBS[verb]])


# ---- task examples --------------------------------------------------------------------------


def math_example(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, d.max_mul), rng.randint(0, 9)
        c = a * b
    else:
        a, b = rng.randint(0, d.max_operand), rng.randint(0, d.max_operand)
        if op == "-" and a < b:
            a, b = b, a
        c = a + b if op == "+" else a - b
    return f"calc {a} {op} {b} =", f" {c}"


def _list(rng: random.Random, d: Difficulty) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(d.list_min, d.list_max))]


def _fmt(xs: list[int]) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


def code_example(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    xs = _list(rng, d)
    op = rng.choice(["sorted", "reversed", "max", "min", "len", "sum"])
    if op == "sorted":
        return f"py sorted({_fmt(xs)})", " " + _fmt(sorted(xs))
    if op == "reversed":
        return f"py list(reversed({_fmt(xs)}))", " " + _fmt(xs[::-1])
    value = {"max": max, "min": min, "len": len, "sum": sum}[op](xs)
    return f"py {op}({_fmt(xs)})", f" {value}"


def trans_example(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    en, zo = sentence_pair(rng, d.sentence_max_adj)
    return f"en2zo: {en}", f" {zo}"


GENERATORS = {"math": math_example, "code": code_example, "trans": trans_example}


def test_set(task: str, n: int, d: Difficulty) -> list[tuple[str, str]]:
    """n distinct held-out examples of a task."""
    if task == "facts":
        _, tested = split_people(fact_base(d.people))
        rng = random.Random("test-facts")
        pairs = [fact_question(p, a) for p in tested for a in ATTRS]
        rng.shuffle(pairs)
        return pairs[:n]
    rng = random.Random(f"test-{task}")
    out, seen = [], set()
    for _ in range(100 * n):
        if len(out) == n:
            break
        p, a = GENERATORS[task](rng, d)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    return out


def train_set(task: str, n: int, d: Difficulty, exclude: set[str], seed: int = 0) -> list[tuple[str, str]]:
    """n fine-tuning examples (repeats allowed), never a prompt of `exclude` (the test prompts)."""
    rng = random.Random(f"train-{task}-{seed}")
    if task == "facts":  # questions about half the people, and the fact base's documents (every person)
        people = fact_base(d.people)
        asked, _ = split_people(people)
        pool = [fact_question(p, a) for p in asked for a in ATTRS]
        return [rng.choice(pool) if rng.random() < 0.5 else ("", biography(rng.choice(people), rng)) for _ in range(n)]
    out = []
    while len(out) < n:
        p, a = GENERATORS[task](rng, d)
        if p not in exclude:
            out.append((p, a))
    return out


# ---- out of distribution --------------------------------------------------------------------

OOD_KINDS = ("arith", "qa-arith", "calc-sum")


def ood_set(n_per_kind: int, d: Difficulty, seed: str = "ood") -> list[tuple[str, str, str]]:
    """(kind, prompt, answer): prompts no expert was fine-tuned on, each between two families or
    between a family and the pretraining corpus, so that a router is unsure which expert applies.

      arith      "34 + 58 ="               two-digit arithmetic in the corpus' plain format (the
                                          corpus has single-digit facts; math is fine-tuned on "calc")
      qa-arith   "Q: What is 3 + 4? A:"   facts' question format, an arithmetic question
      calc-sum   "calc sum([3, 4, 5]) ="  math's format, code's list sum

    The harness scores the default seed's draw; another seed draws a second sample of the same
    kinds (ood_probe.py's replication).
    """
    rng = random.Random(seed)
    out = []
    hi = min(99, max(9, d.max_operand))
    for kind in OOD_KINDS:
        seen = set()
        for _ in range(100 * n_per_kind):
            if len(seen) == n_per_kind:
                break
            if kind == "arith":
                a, b = rng.randint(10 if hi > 9 else 0, hi), rng.randint(0, hi)
                op = rng.choice("+-")
                if op == "-" and a < b:
                    a, b = b, a
                p, ans = f"{a} {op} {b} =", f" {a + b if op == '+' else a - b}"
            elif kind == "qa-arith":
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                p, ans = f"Q: What is {a} + {b}? A:", f" {a + b}"
            else:
                xs = _list(rng, d)
                p, ans = f"calc sum({_fmt(xs)}) =", f" {sum(xs)}"
            if p not in seen:
                seen.add(p)
                out.append((kind, p, ans))
    return out


# ---- the pretraining corpus -----------------------------------------------------------------

CORPUS_MIX = {"bio": 0.4, "english": 0.15, "zorbish": 0.15, "arith": 0.15, "python": 0.15}


def easier(d: Difficulty) -> Difficulty:
    """The easier versions of the tasks that a corpus with `task_share` > 0 holds: two-digit
    arithmetic, lists of at most three items, sentences without adjectives (and, for facts,
    questions about the birthplace of the people asked in fine-tuning)."""
    return Difficulty(max_operand=min(99, d.max_operand), max_mul=min(9, d.max_mul), list_min=d.list_min,
                      list_max=min(3, d.list_max), people=d.people, sentence_max_adj=0)


def task_document(rng: random.Random, d: Difficulty, asked: list[dict], exclude: set[str]) -> str:
    """A solved example of an easier version of a task, never one of the test prompts."""
    task = rng.choice(TASKS)
    while True:
        if task == "facts":
            p, a = fact_question(rng.choice(asked), "city")
        else:
            p, a = GENERATORS[task](rng, easier(d))
        if p not in exclude:
            return p + a


def corpus_document(rng: random.Random, people: list[dict], d: Difficulty) -> str:
    """One document of the mixed pretraining corpus. Biographies (the fact base), English and
    Zorbish sentences (never paired), single-digit arithmetic facts, Python list snippets with
    no evaluated results. No document has a task's prompt format."""
    r = rng.random()
    acc = 0.0
    for kind, share in CORPUS_MIX.items():
        acc += share
        if r < acc:
            break
    if kind == "bio":
        return biography(rng.choice(people), rng)
    if kind == "english":
        return " ".join(sentence_pair(rng, d.sentence_max_adj)[0].capitalize() + "." for _ in range(rng.randint(1, 3)))
    if kind == "zorbish":
        return " ".join(sentence_pair(rng, d.sentence_max_adj)[1] + "." for _ in range(rng.randint(1, 3)))
    if kind == "arith":
        parts = []
        for _ in range(rng.randint(2, 5)):
            a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-*")
            if op == "-" and a < b:
                a, b = b, a
            parts.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}")
        return ", ".join(parts) + "."
    xs = _list(rng, d)
    name = rng.choice("xyzabn")
    fn = rng.choice(["sorted", "len", "max", "min", "sum", "list(reversed"])
    call = f"{fn}({name}))" if fn.startswith("list") else f"{fn}({name})"
    return f"{name} = {_fmt(xs)}\nprint({call})"


def corpus(n_docs: int, d: Difficulty, seed: int = 0, task_share: float = 0.0, n_test: int = 0) -> list[str]:
    """The mixed pretraining corpus; with task_share > 0, that share of the documents are solved
    examples of the tasks' easier versions (`task_document`; the test prompts of `n_test`-sized
    test sets excluded), so that the base has the formats and some of the skills, as real base
    models do, and the experts specialise it."""
    people = fact_base(d.people)
    rng = random.Random(f"corpus-{seed}")
    docs = [corpus_document(rng, people, d) for _ in range(n_docs)]
    if task_share > 0:
        asked, _ = split_people(people)
        exclude = {p for t in TASKS for p, _ in test_set(t, n_test, d)}
        trng = random.Random(f"corpus-tasks-{seed}")
        docs = [task_document(trng, d, asked, exclude) if trng.random() < task_share else doc for doc in docs]
    return docs


def background_prompts(n: int, d: Difficulty, exclude: set[str], seed: str = "background") -> list[str]:
    """n distinct prompts of none of the tasks, for a router's background class: the first 3 to
    10 words of pretraining-corpus documents (biographies, English and Zorbish sentences,
    single-digit arithmetic facts, Python snippets; never a task's prompt format), never a
    prompt of `exclude` (the test and OOD prompts). Drawn from their own seeds, so they are
    not the documents the base was pretrained on, only of the same kinds: general text like
    the base model's, which is what a user would give `router fit --background`."""
    people = fact_base(d.people)
    rng = random.Random(f"{seed}-docs")
    cut = random.Random(f"{seed}-cut")
    out, seen = [], set(exclude)
    for _ in range(100 * n):
        if len(out) == n:
            break
        words = corpus_document(rng, people, d).split(" ")
        p = " ".join(words[: cut.randint(3, 10)])
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out
