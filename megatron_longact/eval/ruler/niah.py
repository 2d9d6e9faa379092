"""RULER retrieval tasks: needle-in-a-haystack (8 variants) and variable tracking.

Follows RULER ``scripts/data/synthetic/niah.py`` and ``variable_tracking.py``: needle and
statement wording, key/value types, query phrasing and the singular template when one value is
asked; haystack "noise" (the grass-is-green paragraph, one per line), "essay" (sentences joined by
spaces) or "needle" (distractor needles with other keys, one per line). Depths default to RULER's
(a sample of its 40-point grid for essays, uniform for line haystacks); ``depths=`` pins them.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable, Sequence

from megatron_longact.errors import UserError
from megatron_longact.eval.ruler.config import (
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_TEMPLATE,
    VT_ANSWER_PREFIX,
    VT_TEMPLATE,
    NiahConfig,
    VariableTrackingConfig,
)
from megatron_longact.eval.ruler.layout import (
    Filled,
    TokenCounter,
    UnitStream,
    fit_count,
    place_at_depths,
    render,
)
from megatron_longact.eval.ruler.text import (
    NOISE_SENTENCE,
    RULER_DEPTHS_PERCENT,
    essay_sentences,
    random_value,
    split_sentences,
)
from megatron_longact.eval.tokens import TextCodec

VT_VAR_LEN = 5  # letters per variable name
VT_ICL_VAR_LEN = 3  # the few-shot example uses shorter names
VT_ICL_TOKENS = 500  # RULER builds its VT example with max_seq_length=500
VT_VALUE_RANGE = (10000, 99999)  # np.random.randint(10000, 99999): upper bound excluded


def _haystack_stream(
    kind: str, *, seed: str, essay_text: str | None, avoid_keys: set[str], cfg: NiahConfig | None
) -> tuple[UnitStream, str]:
    """Filler units for a haystack kind and the string that joins them."""
    rng = random.Random(f"{seed}:haystack")
    if kind == "noise":
        return UnitStream(lambda k: [NOISE_SENTENCE] * k), "\n"
    if kind == "essay":
        if essay_text is not None:
            sentences = split_sentences(essay_text)
            if not sentences:
                raise UserError("essay_text has no sentences; pass None to use generated filler")
            # RULER repeats the essay as often as the context needs.
            cycle = itertools.cycle(sentences)
            return UnitStream(lambda k: list(itertools.islice(cycle, k))), " "
        return UnitStream(lambda k: essay_sentences(rng, k)), " "
    if kind == "needle":
        assert cfg is not None

        def distractors(k: int) -> list[str]:
            out = []
            while len(out) < k:
                key = random_value(rng, cfg.type_needle_k)
                if key in avoid_keys:  # a distractor must never answer the question
                    continue
                out.append(
                    NIAH_NEEDLE.format(
                        type_needle_v=cfg.type_needle_v,
                        key=key,
                        value=random_value(rng, cfg.type_needle_v),
                    )
                )
            return out

        return UnitStream(distractors), "\n"
    raise ValueError(f"type_haystack must be 'noise', 'essay' or 'needle', got {kind!r}")


def _default_depths(rng: random.Random, kind: str, count: int) -> list[float]:
    if kind == "essay":
        if count > len(RULER_DEPTHS_PERCENT):
            return sorted(rng.random() for _ in range(count))
        return sorted(d / 100 for d in rng.sample(RULER_DEPTHS_PERCENT, count))
    return sorted(rng.random() for _ in range(count))


def _check_depths(depths: Sequence[float], count: int) -> list[float]:
    if len(depths) != count:
        raise ValueError(f"depths has {len(depths)} entries but the task inserts {count} needles")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths are fractions of the context in [0, 1], got {list(depths)}")
    return sorted(depths)


def _fit_and_fill(
    build: Callable[[int], Filled], *, codec: TextCodec, budget: int, task: str
) -> Filled:
    """The largest haystack whose full prompt fits ``budget`` tokens."""
    return build(fit_count(lambda n: build(n).prompt, codec=codec, budget=budget, task=task))


def generate_niah(
    cfg: NiahConfig,
    *,
    task: str,
    seed: str,
    codec: TextCodec,
    budget: int,
    depths: Sequence[float] | None = None,
    essay_text: str | None = None,
) -> tuple[Filled, list[str]]:
    """One NIAH prompt whose tokens fit ``budget``; returns it and the reference values."""
    rng = random.Random(seed)
    num_keys = max(cfg.num_needle_k, cfg.num_needle_q)
    keys: list[str] = []
    while len(keys) < num_keys:
        key = random_value(rng, cfg.type_needle_k)
        if key not in keys:
            keys.append(key)
    values = [[random_value(rng, cfg.type_needle_v) for _ in range(cfg.num_needle_v)] for _ in keys]
    needles = [
        NIAH_NEEDLE.format(type_needle_v=cfg.type_needle_v, key=key, value=value)
        for key, key_values in zip(keys, values)
        for value in key_values
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(num_keys), cfg.num_needle_q)
    queries = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    template, prefix, type_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, cfg.type_needle_v
    if cfg.num_needle_q * cfg.num_needle_v == 1:
        # RULER's singular wording, applied to the template only (never to the haystack).
        def singular(text: str) -> str:
            for old, new in (
                ("Some", "A"),
                ("are all", "is"),
                ("are", "is"),
                ("answers", "answer"),
            ):
                text = text.replace(old, new)
            return text

        template, prefix, type_v = singular(template), singular(prefix), type_v[:-1]

    needle_depths = (
        _check_depths(depths, len(needles))
        if depths is not None
        else _default_depths(rng, cfg.type_haystack, len(needles))
    )
    stream, joiner = _haystack_stream(
        cfg.type_haystack, seed=seed, essay_text=essay_text, avoid_keys=set(keys), cfg=cfg
    )
    count_tokens = TokenCounter(codec)
    needle_tokens = [count_tokens(n) for n in needles]

    def build(n: int) -> Filled:
        units = stream.take(n)
        pieces = place_at_depths(
            units, [count_tokens(u) for u in units], needles, needle_tokens, needle_depths
        )
        filled = render(
            template, prefix, context=joiner.join(pieces), type_needle_v=type_v, query=query
        )
        return Filled(
            filled.input,
            filled.answer_prefix,
            filled.context_span,
            tuple(needles),
            tuple(needle_depths),
        )

    return _fit_and_fill(build, codec=codec, budget=budget, task=task), answers


def _variable_chains(
    rng: random.Random, *, num_chains: int, num_hops: int, var_len: int
) -> tuple[list[list[str]], list[list[str]], str]:
    """(variables per chain, statements per chain, the first chain's value)."""
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=var_len))
        if name not in names:
            names.append(name)
    variables, chains, first_value = [], [], ""
    for c in range(num_chains):
        chain_vars = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        value = str(rng.randrange(*VT_VALUE_RANGE))
        first_value = first_value or value
        statements = [f"VAR {chain_vars[0]} = {value}"]
        statements += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(num_hops)]
        variables.append(chain_vars)
        chains.append(statements)
    return variables, chains, first_value


def _interleave(rng: random.Random, chains: list[list[str]]) -> list[str]:
    """Random merge of the chains that keeps each chain's order (RULER's shuffle_sublists_heap)."""
    positions = [0] * len(chains)
    merged = []
    while any(p < len(c) for p, c in zip(positions, chains)):
        live = [i for i, c in enumerate(chains) if positions[i] < len(c)]
        i = rng.choice(live)
        merged.append(chains[i][positions[i]])
        positions[i] += 1
    return merged


def _vt_prompt(
    cfg: VariableTrackingConfig,
    *,
    seed: str,
    codec: TextCodec,
    budget: int,
    var_len: int,
    task: str,
    prefix_text: str = "",
) -> tuple[Filled, list[str]]:
    rng = random.Random(seed)
    variables, chains, value = _variable_chains(
        rng, num_chains=cfg.num_chains, num_hops=cfg.num_hops, var_len=var_len
    )
    statements = _interleave(rng, chains)
    if cfg.type_haystack == "essay":
        statements = [s.strip() + "." for s in statements]
    depths = _default_depths(rng, cfg.type_haystack, len(statements))
    stream, joiner = _haystack_stream(
        cfg.type_haystack, seed=seed, essay_text=None, avoid_keys=set(), cfg=None
    )
    count_tokens = TokenCounter(codec)
    statement_tokens = [count_tokens(s) for s in statements]
    fields = {"query": value, "num_v": cfg.num_hops + 1}

    def build(n: int) -> Filled:
        units = stream.take(n)
        pieces = place_at_depths(
            units, [count_tokens(u) for u in units], statements, statement_tokens, depths
        )
        context = joiner.join(pieces).replace(". \n", ".\n")
        filled = render(VT_TEMPLATE, VT_ANSWER_PREFIX, context=context, **fields)
        start, end = filled.context_span
        return Filled(
            prefix_text + filled.input,
            filled.answer_prefix,
            (start + len(prefix_text), end + len(prefix_text)),
            tuple(statements),
            tuple(depths),
        )

    return _fit_and_fill(build, codec=codec, budget=budget, task=task), variables[0]


def generate_variable_tracking(
    cfg: VariableTrackingConfig,
    *,
    task: str,
    seed: str,
    codec: TextCodec,
    budget: int,
) -> tuple[Filled, list[str]]:
    """One VT prompt (with RULER's one-shot example first) fitting ``budget``; references = chain 0."""
    prefix_text = ""
    if cfg.add_fewshot:
        example, example_answer = _vt_prompt(
            cfg,
            seed=f"{seed}:icl",
            codec=codec,
            budget=VT_ICL_TOKENS,
            var_len=VT_ICL_VAR_LEN,
            task=task,
        )
        prefix_text = example.prompt + " " + " ".join(example_answer) + "\n" + "\n"
    return _vt_prompt(
        cfg,
        seed=seed,
        codec=codec,
        budget=budget,
        var_len=VT_VAR_LEN,
        task=task,
        prefix_text=prefix_text,
    )
