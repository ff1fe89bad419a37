"""RULER-style long-context tasks, generated offline and deterministically from local text.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", https://github.com/hsiehjackson/RULER) hides facts in a haystack and asks for them at the
end of the prompt. Here the haystack is any text (by default the license files in
``/usr/share/common-licenses``; nothing is downloaded) and every sample comes from one seeded
generator, so the same seed always gives the same prompts, token for token:

* ``passkey``: "The pass key is 71432. Remember it. 71432 is the pass key." at depth ``d``
  (Mohtashami & Jaggi 2023, the pass-key retrieval test).
* ``needle``: "The best thing to do in Lisbon is eat a sandwich in Dolores Park." (Kamradt's
  needle-in-a-haystack).
* ``niah_single``: "One of the special magic numbers for gentle-harbor is: 4830219." — one key, one
  7-digit value (RULER's niah_single_2: an essay haystack, number values).
* ``niah_multikey``: four such needles with different keys; one key is asked (RULER's niah_multikey_1).
* ``niah_multivalue``: one key with four values; all four must be given (RULER's niah_multivalue).
* ``vt``: variable tracking, a chain ``VAR QXJRT = 48213``, ``VAR BZKEO = VAR QXJRT``, ... (four hops)
  hidden in the haystack; the answer is every name bound to the value (RULER's vt).
* ``cwe``: common-words extraction, a numbered list of words where ten words appear far more often
  than the others; the answer is those ten (RULER's cwe; no haystack, so depth does not apply).

Every prompt is exactly ``length`` tokens: an opening line, the haystack with the fact(s) inserted
(each snapped to a word boundary at most :data:`SNAP` tokens from the requested depth; depth 0 is
the haystack's start, 1 its end), then the question, whose trailing ``question_tokens`` a
question-aware KV-cache policy may use as its observation window. Scoring is RULER's and kvpress's
``string_match_all`` (:func:`string_match`): the share of the expected answers found in the output.

>>> class Chars:  # a toy tokenizer: one token per character
...     def encode(self, text, add_special_tokens=True): return [ord(c) for c in text]
...     def decode(self, ids): return "".join(map(chr, ids))
>>> text = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 80
>>> s = make_samples(Chars(), text, ["niah_single"], [900], [0.5], seed=1)[0]
>>> len(s.ids), s.task, len(s.answers[0])
(900, 'niah_single', 7)
>>> Chars().decode(s.ids[s.needle_start:s.needle_start + s.needle_len]).strip()[:37]
'One of the special magic numbers for '
>>> Chars().decode(s.ids[-s.question_tokens:]).startswith("\\n\\nWhat is the special magic number")
True
>>> string_match(" 4830219 and 1234567", ["4830219", "7654321"])
0.5
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

#: every task the generator makes, in RULER's naming where RULER has the task
TASKS = ("passkey", "needle", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
#: a fact snaps to a word boundary at most this many tokens from the requested depth
SNAP = 8
#: RULER's sizes: needles of niah_multikey / values of niah_multivalue, hops of vt, common words of cwe
N_KEYS, N_VALUES, N_HOPS, N_COMMON = 4, 4, 4, 10
#: cwe: how often each uncommon word appears (RULER's freq_ucw)
UNCOMMON_FREQ = 3

_INTRO = {
    "passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n",
    "needle": "There is an important fact hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about it.\n\n",
    "niah": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n\n",
    "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
    "cwe": "Below is a numbered list of words. In these words, some appear more often than others. "
           "Memorize the ones that appear most often.\n",
}
_CITIES = ("San Francisco", "Lisbon", "Nairobi", "Osaka", "Montreal", "Krakow", "Valparaiso", "Tbilisi",
           "Hanoi", "Reykjavik", "Marseille", "Cork")
_ACTIVITIES = ("eat a sandwich in Dolores Park", "ride the old yellow tram", "swim at the northern beach",
               "climb the castle hill at dawn", "visit the glass museum", "drink tea in the botanical garden",
               "walk along the harbour wall", "buy bread at the night market", "watch the boats from the pier",
               "read in the public library", "cycle around the lake", "listen to jazz in the cellar bars")
# keys of the niah tasks: adjective-noun pairs, as RULER's (which draws them from the wonderwords lists)
_ADJECTIVES = ("gentle", "crimson", "silent", "brave", "hollow", "amber", "frosty", "lucky", "rapid", "velvet",
               "narrow", "golden", "dusty", "bitter", "quiet", "tidy")
_NOUNS = ("harbor", "lantern", "meadow", "falcon", "violin", "orchard", "compass", "glacier", "kettle", "ribbon",
          "canyon", "pebble", "saddle", "thistle", "beacon", "walnut")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt: token ids (exactly ``length`` of them), what a right answer contains, where the facts are.

    ``answers``: every string the output must contain (RULER's ``outputs``); ``spans``: (start, tokens)
    of each inserted piece in ``ids``, the asked fact first (``needle_start``/``needle_len`` repeat
    it; for ``cwe`` the word list); ``question_tokens``: how many trailing ids are the question.
    """

    task: str
    length: int
    depth: float
    trial: int
    ids: list[int]
    answers: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    question_tokens: int

    @property
    def needle_start(self) -> int:
        return self.spans[0][0]

    @property
    def needle_len(self) -> int:
        return self.spans[0][1]

    @property
    def question(self) -> list[int]:
        """The question's ids: the prompt's last ``question_tokens``."""
        return self.ids[-self.question_tokens:]


@dataclasses.dataclass(frozen=True)
class _Task:
    """A task's text before tokenising: opening line, pieces (text, depth) with the asked one first, question."""

    intro: str
    pieces: list[tuple[str, float]]
    question: str
    answers: tuple[str, ...]
    ordered: bool = False  # the pieces must keep their order in the haystack (a vt chain)


def check_tasks(tasks: Sequence[str], flag: str = "--tasks") -> list[str]:
    """``tasks`` when each is one of :data:`TASKS`; :class:`~lucidlm.errors.CacheError` naming the
    first that is not and listing the valid ones.

    >>> check_tasks(["passkey", "vt"])
    ['passkey', 'vt']
    >>> check_tasks(["quiz"])
    Traceback (most recent call last):
    ...
    lucidlm.errors.CacheError: --tasks: unknown task 'quiz'; expected some of passkey, needle, niah_single, \
niah_multikey, niah_multivalue, vt, cwe
    """
    from lucidlm.errors import CacheError

    tasks = list(tasks)
    for task in tasks or [""]:
        if task not in TASKS:
            raise CacheError(f"{flag}: unknown task {task!r}; expected some of {', '.join(TASKS)}")
    return tasks


def _number(rng: random.Random, taken: set[str]) -> str:
    """A 7-digit number not drawn before in this prompt (RULER's values)."""
    while (value := str(rng.randint(1_000_000, 9_999_999))) in taken:
        pass
    taken.add(value)
    return value


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _niah(task: str, depth: float, rng: random.Random) -> _Task:
    taken: set[str] = set()
    n_keys = N_KEYS if task == "niah_multikey" else 1
    keys = _keys(rng, n_keys)
    values = [_number(rng, taken) for _ in range(N_VALUES if task == "niah_multivalue" else n_keys)]
    if task == "niah_multivalue":  # one key, every value; the first at the requested depth
        pieces = [(f"One of the special magic numbers for {keys[0]} is: {v}.", depth if i == 0 else rng.random())
                  for i, v in enumerate(values)]
        question = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                    f"The special magic numbers for {keys[0]} mentioned in the provided text are")
        return _Task(_INTRO["niah"], pieces, question, tuple(values))
    # the asked key first (at depth), the other keys as distractors at random depths
    pieces = [(f"One of the special magic numbers for {k} is: {v}.", depth if i == 0 else rng.random())
              for i, (k, v) in enumerate(zip(keys, values))]
    question = (f"What is the special magic number for {keys[0]} mentioned in the provided text? "
                f"The special magic number for {keys[0]} mentioned in the provided text is")
    return _Task(_INTRO["niah"], pieces, question, (values[0],))


def _vt(depth: float, rng: random.Random) -> _Task:
    """A chain of N_HOPS assignments after the first, spread evenly from ``depth`` to the haystack's end."""
    names: list[str] = []
    while len(names) < N_HOPS + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    pieces = [(line, depth + (1 - depth) * i / (N_HOPS + 1)) for i, line in enumerate(lines)]
    question = (f"Question: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {len(names)} variables "
                f"are assigned the value {value}, they are:")
    return _Task(_INTRO["vt"], pieces, question, tuple(names), ordered=True)


def _task(task: str, depth: float, rng: random.Random) -> _Task:
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return _Task(_INTRO[task], [(f"The pass key is {key}. Remember it. {key} is the pass key.", depth)],
                     "What is the pass key? The pass key is", (key,))
    if task == "needle":
        city, activity = rng.choice(_CITIES), rng.choice(_ACTIVITIES)
        return _Task(_INTRO[task], [(f"The best thing to do in {city} is {activity}.", depth)],
                     f"What is the best thing to do in {city}? The best thing to do in {city} is", (activity,))
    if task == "vt":
        return _vt(depth, rng)
    return _niah(task, depth, rng)


class Haystack:
    """The text the prompts are cut from: its token ids and (for ``cwe``) its distinct words.

    >>> class Chars:
    ...     def encode(self, text, add_special_tokens=True): return [ord(c) for c in text]
    ...     def decode(self, ids): return "".join(map(chr, ids))
    >>> h = Haystack(Chars(), "The Software is provided as is. The software, the licence.")
    >>> len(h.ids), h.words
    (58, ['licence', 'provided', 'software'])
    """

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.ids = tokenizer.encode(text, add_special_tokens=False)
        # cwe's vocabulary: lower-case words of 4 to 10 letters, in a fixed order
        self.words = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", text)} - {"this", "that"})

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def make_sample(hay: Haystack, task: str, length: int, depth: float, rng: random.Random, trial: int = 0,
                flag: str = "--lengths") -> Sample:
    """A prompt of exactly ``length`` tokens for ``task`` with its fact(s) at ``depth`` in [0, 1]; a
    length too short (or a haystack too small) is a :class:`~lucidlm.errors.CacheError` naming ``flag``."""
    if task == "cwe":
        return _cwe(hay, length, depth, rng, trial, flag)
    spec = _task(task, depth, rng)
    intro = hay.tokenizer.encode(spec.intro)  # the checkpoint's own BOS handling
    pieces = [hay.encode(f"\n\n{text}\n\n") for text, _ in spec.pieces]
    ask = hay.encode(f"\n\n{spec.question}")
    n = length - len(intro) - sum(map(len, pieces)) - len(ask)
    _check_room(task, length, n, len(hay.ids), flag)
    start = rng.randrange(len(hay.ids) - n + 1)
    window = list(hay.ids[start:start + n])
    cuts = [_snap(hay.tokenizer, window, round(d * n)) for _, d in spec.pieces]
    if spec.ordered:  # a snap never reorders a chain
        cuts = [max(cuts[:i + 1]) for i in range(len(cuts))]
    ids, spans, last = list(intro), [(0, 0)] * len(pieces), 0
    for i in sorted(range(len(pieces)), key=lambda i: (cuts[i], i)):
        ids += window[last:cuts[i]]
        spans[i] = (len(ids), len(pieces[i]))
        ids += pieces[i]
        last = cuts[i]
    ids += window[last:] + ask
    return Sample(task, length, depth, trial, ids, spec.answers, tuple(spans), len(ask))


def _check_room(task: str, length: int, n: int, available: int, flag: str) -> None:
    from lucidlm.errors import CacheError

    if n < 1 or n >= available:
        raise CacheError(f"{flag} {length}: a {task} prompt needs more than {length - n} tokens and the "
                         f"haystack has {available}: choose lengths in ({length - n}, {available})")


def _snap(tokenizer, hay: list[int], cut: int) -> int:
    """The nearest index to ``cut`` where a word starts (a fact never splits a word in two)."""
    for offset in sorted(range(-SNAP, SNAP + 1), key=abs):
        i = cut + offset
        if i in (0, len(hay)) or (0 < i < len(hay) and tokenizer.decode([hay[i]])[:1].isspace()):
            return i
    return cut


def _cwe(hay: Haystack, length: int, depth: float, rng: random.Random, trial: int, flag: str) -> Sample:
    """A numbered list ``1. word 2. word ...`` filling the prompt: :data:`N_COMMON` words about a third
    of the entries, the others :data:`UNCOMMON_FREQ` times each (then once each to fill up); newlines
    pad the last few tokens. Entry ids are concatenated, so the length is exact by arithmetic."""
    from lucidlm.errors import CacheError

    intro = hay.tokenizer.encode(_INTRO["cwe"])
    question = f"\nQuestion: What are the {N_COMMON} most common words in the above list? Answer: The top " \
               f"{N_COMMON} words that appear most often in the list are:"
    ask, pad = hay.encode(question), hay.encode("\n")[-1:]
    room = length - len(intro) - len(ask)
    words = rng.sample(hay.words, len(hay.words))
    common, spare = words[:N_COMMON], words[N_COMMON:]
    cost = {w: len(hay.encode(f" {w}")) for w in words}
    number = lambda i: len(hay.encode(f" {i}."))  # noqa: E731  (the entry's own numbering)
    per_entry = sum(cost[w] for w in common) / N_COMMON + number(100)
    freq = max(UNCOMMON_FREQ + 2, round(room / per_entry / 3 / N_COMMON))
    entries = [w for w in common for _ in range(freq)]
    used = sum(number(i + 1) for i in range(len(entries))) + sum(cost[w] for w in entries)
    if used > room or len(hay.words) < N_COMMON + 1:
        raise CacheError(f"{flag} {length}: a cwe prompt needs more than {length - room + used} tokens "
                         f"and {N_COMMON + 1} distinct words in the text")
    for copies in (UNCOMMON_FREQ, 1):  # uncommon words while a group fits, then single ones
        while spare and used + sum(number(len(entries) + k + 1) + cost[spare[0]] for k in range(copies)) <= room:
            used += sum(number(len(entries) + k + 1) + cost[spare[0]] for k in range(copies))
            entries += [spare.pop(0)] * copies
    rng.shuffle(entries)
    listed = [t for i, w in enumerate(entries) for t in hay.encode(f" {i + 1}.") + hay.encode(f" {w}")]
    ids = intro + listed + pad * (room - len(listed)) + ask
    return Sample("cwe", length, depth, trial, ids, tuple(common), ((len(intro), len(listed)),), len(ask))


def make_samples(tokenizer, text: str | Haystack, tasks: Sequence[str], lengths: Sequence[int],
                 depths: Sequence[float], trials: int = 1, seed: int = 0, flag: str = "--lengths") -> list[Sample]:
    """Every (length, depth, trial, task) prompt from one generator seeded with ``seed``: the same
    arguments give the same samples. ``text``: the haystack (a string, or a :class:`Haystack` made once)."""
    hay = text if isinstance(text, Haystack) else Haystack(tokenizer, text)
    rng = random.Random(seed)
    return [make_sample(hay, task, length, depth, rng, trial, flag)
            for length in lengths for depth in depths for trial in range(trials) for task in check_tasks(tasks)]


def new_tokens(tokenizer, sample: Sample) -> int:
    """How many tokens to generate: the answers written out as a list, plus room for punctuation."""
    return len(tokenizer.encode(" " + ", ".join(sample.answers), add_special_tokens=False)) + 2


# ----------------------------------------------------------------------------- scoring


def clean_prediction(text: str) -> str:
    """The output as kvpress's RULER scorer reads it: control characters removed, ends stripped."""
    return re.sub(r"[\x00-\x1f]", "", text.strip()).strip()


def string_match(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the share of ``answers`` found (case-insensitive
    substring) in the cleaned prediction.

    >>> string_match(" 71432.\\nThe pass", ["71432"]), string_match("GATE, ROBIN", ["gate", "robin", "ox"])
    (1.0, 0.6666666666666666)
    """
    got = clean_prediction(prediction).lower()
    return sum(a.lower() in got for a in answers) / len(answers) if answers else 0.0


def task_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]], tasks: Sequence[str]) -> dict:
    """kvpress's ``metrics.json`` for RULER: ``{task: {"string_match": percent rounded to 2 places}}``
    (``string_match_all`` per sample, averaged per task; kvpress's ``qa`` tasks, which take the best
    answer instead, are not generated here).

    >>> task_scores(["12 and 34", "nothing", "7"], [["12", "34"], ["5"], ["7"]], ["vt", "vt", "passkey"])
    {'passkey': {'string_match': 100.0}, 'vt': {'string_match': 50.0}}
    """
    by_task: dict[str, list[float]] = {}
    for prediction, refs, task in zip(predictions, answers, tasks):
        by_task.setdefault(task, []).append(string_match(prediction, refs))
    return {t: {"string_match": round(100 * sum(s) / len(s), 2)} for t, s in sorted(by_task.items())}
