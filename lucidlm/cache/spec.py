"""KV-cache policy specs: the one table of policies and their parameters, and the one parser.

Torch-free (the command line checks ``--kv-cache`` before loading anything). A spec is::

    NAME[(key=value, ...)][+int8|+int4]

``NAME`` is an eviction policy of :data:`TABLE`, its parameters are typed and range-checked here;
``+int8`` / ``+int4`` stores the kept keys and values quantised (``int8`` / ``int4`` alone means
``dense+int8`` / ``dense+int4``). ``str(spec)`` is the canonical form: no spaces, parameters in the
table's order, and it parses back to an equal spec.

>>> spec = parse_policy("sink(n_sink=8)+int8")
>>> spec
PolicySpec(eviction='sink', quant='int8', params={'n_sink': 8})
>>> str(parse_policy(" snapkv( pool=max , window=16 ) "))
'snapkv(window=16,pool=max)'
>>> str(parse_policy("int4"))
'dense+int4'
>>> try:
...     parse_policy("snapkv(kernel=4)")
... except CacheError as exc:
...     print(exc)
policy 'snapkv': kernel=4 is not an odd integer >= 1
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

from ..errors import CacheError


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a policy: its type (int, float or str), default, range and a one-line doc.

    ``default=None`` means the policy derives the value from ``cache_tokens`` (``doc`` says how).
    """

    name: str
    kind: type
    default: object
    doc: str
    low: float | None = None
    high: float | None = None
    odd: bool = False
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        """What a value must be, in words (for error messages and help)."""
        if self.choices:
            return f"one of: {', '.join(self.choices)}"
        what = ("an odd integer" if self.odd else "an integer") if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} in [{self.low:g}, {self.high:g}]"
        return what + (f" >= {self.low:g}" if self.low is not None else "")

    def convert(self, text: str, policy: str) -> int | float | str:
        """``text`` as this parameter's type, or :class:`CacheError` naming what was expected."""
        try:
            value = self.kind(text) if self.kind is not int or re.fullmatch(r"[+-]?\d+", text) else None
        except ValueError:
            value = None
        bad = value is None or (self.choices and value not in self.choices) \
            or (self.low is not None and value < self.low) or (self.high is not None and value > self.high) \
            or (self.odd and value % 2 == 0) or (self.kind is float and math.isnan(value))
        if bad:
            raise CacheError(f"policy {policy!r}: {self.name}={text} is not {self.expected()}")
        return value


@dataclasses.dataclass(frozen=True)
class Policy:
    """An eviction policy: its name, a one-line summary (with its source) and its parameters."""

    name: str
    doc: str
    params: tuple[Param, ...] = ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        takes = f"takes {', '.join(p.name for p in self.params)}" if self.params else "takes no parameters"
        raise CacheError(f"policy {self.name!r}: unknown parameter {name!r}; {self.name} {takes}")


#: the ``heads`` settings of a scored policy (:mod:`lucidlm.cache.slots`)
HEADS = ("shared", "each", "adaptive")
_RECENT = Param("recent", int, None, "most recent tokens never evicted (default: cache_tokens // 2)", low=1)
_H2O_SINK = Param("n_sink", int, 0, "first positions never evicted", low=0)
_WINDOW = Param("window", int, None, "observation window: the step's last queries score the keys, and the "
                "newest tokens are kept (default: min(32, cache_tokens // 2))", low=1)
_KERNEL = Param("kernel", int, 5, "pooling kernel along the keys (odd)", low=1, odd=True)
_POOL = Param("pool", str, "avg", "pooling of the window's scores along the keys", choices=("avg", "max"))
#: where a scored policy decides (:mod:`lucidlm.cache.slots`): one set of positions for all KV heads of a
#: layer, each head its own, or each its own with the layer's budget shared out by score (AdaKV)
_HEADS = Param("heads", str, "shared", "per KV head: shared (one decision per layer on the heads' mean), each "
               "(every head keeps its own cache_tokens best), adaptive (AdaKV, Feng et al. 2024: the layer's "
               "heads x cache_tokens slots go to the best scores of all heads, each head keeping its best 20%)",
               choices=HEADS)

#: the presses decide per KV head unless told otherwise (kvpress's presses score each head)
_HEADS_EACH = dataclasses.replace(_HEADS, default="each")


def default_window(cache_tokens: int) -> int:
    """SnapKV's observation window when none is given: 32 (the paper's), at most half the budget.

    >>> default_window(512), default_window(10)
    (32, 5)
    """
    return max(1, min(32, cache_tokens // 2))


#: policies that hold the prompt and compress at its end (:mod:`lucidlm.cache.presses`)
PRESSES = (
    Policy("expected-attention", "Expected Attention (Devoto et al., 2025; kvpress): keys scored by the "
                                 "attention future queries are expected to pay, from the prompt's query statistics",
           (Param("n_future_positions", int, 512, "future positions whose mean rotation the query statistics "
                  "take", low=1),
            Param("n_sink", int, 4, "first positions kept, and left out of the statistics", low=0),
            Param("use_covariance", int, 1, "1: the queries' covariance term, 0: the mean only", low=0, high=1),
            Param("use_vnorm", int, 1, "1: scores times the value norm", low=0, high=1),
            Param("epsilon", float, 0.0, "added to the scores before the value norm", low=0),
            Param("n_queries", int, 512, "the prompt's last queries the statistics are taken over", low=1),
            _HEADS_EACH)),
    Policy("kvzip", "KVzip (Kim et al., 2025; kvpress): max attention each key receives when the model "
                    "re-reads the prompt after itself (prefill about 2x)",
           (Param("chunk", int, 512, "tokens per chunk of the re-reading pass", low=1), _HEADS_EACH)),
    Policy("snapkv-q", "question-aware SnapKV (Li et al., 2024; kvpress): the observation window is the "
                       "question when marked, compressed once at the prompt's end", (_WINDOW, _KERNEL, _POOL, _HEADS_EACH)),
    Policy("duo", "DuoAttention (Xiao et al., 2025): retrieval heads keep the prompt, streaming heads sinks + "
                  "a recent window; heads from lucidlm calibrate-heads",
           (Param("heads_file", str, None, "the head-score file of lucidlm calibrate-heads MODEL --out FILE "
                  "(default: each layer ranks its heads on the prompt's last queries)"),
            Param("n_sink", int, 4, "first positions a streaming head keeps", low=0),
            Param("window", int, None, "recent tokens a streaming head keeps (default: min(32, cache_tokens // 2))",
                  low=1))),
)

#: every eviction policy, in the order error messages and help list them
TABLE: dict[str, Policy] = {p.name: p for p in (
    Policy("dense", "keep every token; fails when cache_tokens is full"),
    Policy("window", "the cache_tokens most recent tokens"),
    Policy("sink", "StreamingLLM (Xiao et al., ICLR 2024): the first tokens forever, plus the most recent",
           (Param("n_sink", int, 4, "first positions never evicted", low=1),)),
    Policy("h2o", "heavy hitters (Zhang et al., NeurIPS 2023): highest accumulated attention, plus the "
                  "most recent", (_RECENT, _H2O_SINK, _HEADS)),
    Policy("snapkv", "SnapKV (Li et al., 2024): attention of the step's last `window` queries, pooled "
                     "along the keys", (_WINDOW, _KERNEL, _POOL, _HEADS)),
    Policy("tova", "TOVA (Oren et al., 2024): lowest attention from the newest query, averaged over heads",
           (_HEADS,)),
    Policy("knorm", "key norm (Devoto et al., EMNLP 2024): evict the keys of largest L2 norm", (_HEADS,)),
    Policy("pyramidkv", "PyramidKV (Cai et al., 2024): SnapKV with budgets shrinking with depth "
                        "(same total)", (_WINDOW, _KERNEL, _POOL,
                                         Param("beta", int, 20, "steepness: last layer's share is 1/beta of "
                                               "the mean", low=1), _HEADS)),
    Policy("h2o-vlen", "H2O scoring attention times value norm (keys_values, Amazon)",
           (_RECENT, _H2O_SINK, _HEADS)),
    Policy("qh2o", "H2O minus quantisation error (keys_values after Q-Hitter, Zhang et al., MLSys 2024); "
                   "plain H2O without +int8/+int4",
           (_RECENT, _H2O_SINK, Param("weight", float, 0.5, "weight of the H2O score against the "
                                      "quantisation error", low=0, high=1), _HEADS)),
    *PRESSES,
)}
#: eviction policies: how a bounded cache chooses which keys to drop
EVICTIONS = tuple(TABLE)
#: quantised key/value buffers
QUANTS = ("int8", "int4")
#: every parameter-free policy name -> (eviction, quantisation or None), in the order listed
POLICY_NAMES: dict[str, tuple[str, str | None]] = {
    **{e: (e, None) for e in EVICTIONS},
    **{q: ("dense", q) for q in QUANTS},
    **{f"{e}+{q}": (e, q) for e in EVICTIONS for q in QUANTS},
}
#: budget of an evicting policy when ``cache_tokens`` is not given (``dense``: the context length)
DEFAULT_CACHE_TOKENS = 512

GRAMMAR = "NAME[(key=value, ...)][+int8|+int4]"
_SPEC = re.compile(r"\s*(?P<name>[A-Za-z][\w-]*)\s*(?:\((?P<args>[^()]*)\))?\s*(?:\+\s*(?P<quant>\w+))?\s*")
_ARG = re.compile(r"\s*(?P<key>[a-z_]\w*)\s*=\s*(?P<value>[^\s=,]+)\s*")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A parsed policy: eviction name, quantisation (None, ``int8``, ``int4``), given parameters.

    Valid by construction (built by hand, it is checked as :func:`parse_policy` checks text, and
    its parameters take their table types), so the layers a spec is passed down to never check
    or parse it again: parse a user's value once, where it enters, and pass the spec.

    >>> PolicySpec("h2o", None, {"recent": 8})
    PolicySpec(eviction='h2o', quant=None, params={'recent': 8})
    >>> str(PolicySpec("h2o", "int4", {"recent": 8}))
    'h2o(recent=8)+int4'
    >>> PolicySpec("dense").is_plain_dense, PolicySpec("dense", "int8").is_dense
    (True, True)
    """

    eviction: str
    quant: str | None = None
    params: dict[str, int | float | str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.eviction not in TABLE:
            raise _unknown(self.eviction)
        if self.quant is not None and self.quant not in QUANTS:
            raise _unknown_quant(str(self), self.quant)
        policy = TABLE[self.eviction]
        typed = {name: policy.param(name).convert(str(value), policy.name) for name, value in self.params.items()}
        object.__setattr__(self, "params", typed)  # frozen: the one place the typed values are set

    @property
    def is_dense(self) -> bool:
        """Keeps every token (quantised or not): its budget is what must fit, never a default."""
        return self.eviction == "dense"

    @property
    def is_plain_dense(self) -> bool:
        """Dense at full precision: the preallocated dense cache, which the compiled decoder and
        the packed prefill of a batch work on."""
        return self.is_dense and self.quant is None

    def budget(self, cache_tokens: int | str | None, needed: int, prompt: int | None = None) -> int:
        """Slots per layer: ``cache_tokens`` when given, else ``needed`` (what must fit) for a dense
        policy and :data:`DEFAULT_CACHE_TOKENS` for an evicting one.

        ``cache_tokens`` may be a share such as ``"25%"`` (kvpress's compression ratio, as a share
        kept): it resolves against ``prompt`` (the prompt's length; default ``needed``), rounded up,
        at least one slot. Budgets are resolved here and nowhere else.

        >>> PolicySpec("dense").budget(None, 100), PolicySpec("h2o").budget(None, 100)
        (100, 512)
        >>> PolicySpec("snapkv").budget("25%", 120, prompt=100), PolicySpec("window").budget("50%", 7)
        (25, 4)
        """
        if cache_tokens is None:
            return needed if self.is_dense else DEFAULT_CACHE_TOKENS
        share = parse_share(cache_tokens)
        if share is None:
            return int(cache_tokens)
        return max(1, math.ceil(share * (needed if prompt is None else prompt) - 1e-9))

    def __str__(self) -> str:
        known = [p.name for p in TABLE[self.eviction].params] if self.eviction in TABLE else []
        order = [k for k in known if k in self.params] + sorted(k for k in self.params if k not in known)
        args = ",".join(f"{k}={self.params[k]}" for k in order)
        return self.eviction + (f"({args})" if args else "") + (f"+{self.quant}" if self.quant else "")

    def value(self, name: str):
        """The parameter's given value, else its table default (None: derived from the budget)."""
        return self.params.get(name, TABLE[self.eviction].param(name).default)


def parse_share(cache_tokens: int | str | None) -> float | None:
    """The share a budget such as ``"25%"`` states, as a fraction in (0, 1]; None for a token count
    (an int, or text of one). :class:`CacheError` for 0%, over 100%, or text that is neither.

    >>> parse_share("25%"), parse_share(64), parse_share("64")
    (0.25, None, None)
    >>> parse_share("150%")
    Traceback (most recent call last):
    ...
    lucidlm.errors.CacheError: cache_tokens='150%': a share must be in (0%, 100%]
    """
    if cache_tokens is None or isinstance(cache_tokens, bool):
        if isinstance(cache_tokens, bool):
            raise CacheError(f"cache_tokens={cache_tokens!r}: expected a positive integer or a share such as '25%'")
        return None
    if isinstance(cache_tokens, int):
        if cache_tokens < 1:
            raise CacheError(f"cache_tokens={cache_tokens}: expected a positive integer or a share such as '25%'")
        return None
    text = str(cache_tokens).strip()
    if re.fullmatch(r"\d+", text):
        return parse_share(int(text))
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%", text)
    if match is None:
        raise CacheError(f"cache_tokens={cache_tokens!r}: expected a positive integer or a share such as '25%'")
    share = float(match[1]) / 100
    if not 0 < share <= 1:
        raise CacheError(f"cache_tokens={cache_tokens!r}: a share must be in (0%, 100%]")
    return share


def check_budget(cache_tokens: int | str | None) -> int | str | None:
    """``cache_tokens`` as given when it is a valid budget (None, a positive token count, or a share
    in (0%, 100%]); a count given as text comes back as an int. Else :class:`CacheError`.

    >>> check_budget("25%"), check_budget("64"), check_budget(None)
    ('25%', 64, None)
    """
    if parse_share(cache_tokens) is not None:
        return str(cache_tokens).strip().replace(" ", "")
    return None if cache_tokens is None else int(cache_tokens)


def _malformed(text: str) -> CacheError:
    return CacheError(f"policy={text!r} is malformed: expected {GRAMMAR}, e.g. 'snapkv(window=16)+int8'")


def _unknown_quant(text: str, quant: str) -> CacheError:
    return CacheError(f"policy={text!r}: unknown quantisation {quant!r}; valid: {', '.join(QUANTS)}")


def _unknown(name: str) -> CacheError:
    return CacheError(f"policy={name!r} is not a KV-cache policy; valid: {', '.join(EVICTIONS)} "
                      f"(each optionally with (key=value, ...) and +{'/+'.join(QUANTS)}; "
                      f"{' / '.join(QUANTS)} alone: dense)")


def _parse_args(args: str | None, policy: Policy, text: str) -> dict[str, int | float | str]:
    params: dict[str, int | float | str] = {}
    if args is None or not args.strip():
        return params
    for item in args.split(","):
        match = _ARG.fullmatch(item)
        if match is None:
            raise _malformed(text)
        key = match["key"]
        if key in params:
            raise CacheError(f"policy {policy.name!r}: parameter {key!r} given twice in {text!r}")
        params[key] = policy.param(key).convert(match["value"], policy.name)
    return params


def parse_policy(text: str | PolicySpec) -> PolicySpec:
    """Parse ``text`` (:data:`GRAMMAR`) into a :class:`PolicySpec`; a spec is returned as it is
    (it was checked when it was built).

    Raises :class:`CacheError` for malformed text, an unknown policy (listing the valid ones), an
    unknown parameter (listing the policy's) or a bad value (saying what was expected).

    >>> parse_policy("h2o(recent=16, n_sink=4)")
    PolicySpec(eviction='h2o', quant=None, params={'recent': 16, 'n_sink': 4})
    >>> parse_policy(" dense() ") == parse_policy("dense")
    True
    """
    if isinstance(text, PolicySpec):
        return text
    if not isinstance(text, str):
        raise CacheError(f"policy={text!r} must be a string such as 'h2o' or 'snapkv(window=16)+int8'")
    match = _SPEC.fullmatch(text)
    if match is None:
        raise _malformed(text)
    name, quant = match["name"], match["quant"]
    if name in QUANTS:  # int8 / int4 alone: dense with quantised buffers
        if quant is not None or match["args"] is not None:
            raise _malformed(text)
        name, quant = "dense", name
    if name not in TABLE:
        raise _unknown(name)
    if quant is not None and quant not in QUANTS:
        raise _unknown_quant(text, quant)
    return PolicySpec(name, quant, _parse_args(match["args"], TABLE[name], text))


def check_policy(text: str) -> str:
    """``text`` unchanged when it is a valid policy spec; else :class:`CacheError`.

    >>> check_policy("h2o+int4")
    'h2o+int4'
    """
    parse_policy(text)
    return text


def split_policies(text: str) -> list[str]:
    """A comma-separated list of specs split at the commas outside parentheses.

    >>> split_policies("window, snapkv(window=8,kernel=3)+int8,h2o")
    ['window', 'snapkv(window=8,kernel=3)+int8', 'h2o']
    """
    return [part.strip() for part in _top_level(text) if part.strip()]


def _top_level(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def describe_policies() -> str:
    """One line per policy and per parameter (type, default, range): for ``--help`` and docs.

    >>> print(describe_policies().splitlines()[2])
    sink: StreamingLLM (Xiao et al., ICLR 2024): the first tokens forever, plus the most recent
    """
    lines = []
    for policy in TABLE.values():
        lines.append(f"{policy.name}: {policy.doc}")
        for p in policy.params:
            default = "derived" if p.default is None else p.default
            lines.append(f"  {p.name} ({p.expected()}, default {default}): {p.doc}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_CACHE_TOKENS",
    "EVICTIONS",
    "GRAMMAR",
    "HEADS",
    "POLICY_NAMES",
    "QUANTS",
    "TABLE",
    "Param",
    "Policy",
    "PolicySpec",
    "check_budget",
    "check_policy",
    "describe_policies",
    "parse_policy",
    "parse_share",
    "split_policies",
]
