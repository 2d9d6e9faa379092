"""Offline text for RULER: word lists, filler haystacks and random needle values.

RULER reads Paul Graham essays and the ``wonderwords`` lists from disk/network; we generate
everything from fixed word lists and a seeded ``random.Random`` so nothing is downloaded and the
same seed always gives the same text. What differs from RULER, and why it does not matter for
what the tasks measure:

* "essay" haystack: grammatical, topic-free sentences from templates instead of real essays
  (a caller may pass its own essay text to :func:`split_sentences` instead);
* "words" needles: ``adjective-noun`` pairs from the lists below (~60k pairs) instead of
  wonderwords' ~10M; generators make real keys distinct from distractor keys explicitly;
* CWE beyond the real-word list: pronounceable pseudo-words, as RULER falls back to its
  ``english_words.json`` when it needs more words than wonderwords has.
"""

from __future__ import annotations

import math
import random
import re
import uuid

# RULER's noise haystack, verbatim.
NOISE_SENTENCE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)

ADJECTIVES = tuple(
    """
    able absent active actual afraid agile alert ample ancient angry anxious arctic ashamed
    awake aware bad bare basic bitter blank bland blind bold brave brief bright brisk broad
    broken busy calm careful casual cheap cheerful chief civil clean clear clever close cloudy
    clumsy coarse cold common cool cozy crisp cruel curious damp dark dear decent deep dense
    direct distant divine dizzy dry dull dusty eager early earnest easy elastic elder empty
    equal exact exotic faint fair false famous fancy fast fearless feeble fierce filthy final
    fine firm flat fluffy fond foolish formal fragile frank free fresh friendly frozen full
    funny gentle giant glad glossy golden good graceful grand grateful great greedy grim gross
    handy happy hard harsh healthy heavy helpful hidden hollow honest huge humble hungry icy
    ideal idle immense innocent jolly juicy keen kind large late lazy lean light little lively
    lonely long loose loud lovely loyal lucky mad magic major mature meek mellow mild minor
    modern modest moist narrow nasty neat nervous new nice noble noisy normal odd old open
    orange ordinary pale patient perfect plain pleasant plump polite poor precious pretty proud
    pure quick quiet rapid rare raw ready real rich rigid ripe rough round royal rude rural
    sad safe salty scarce secret selfish serious sharp shiny short shy silent silly simple
    slender slim slow small smart smooth snug soft solid sour spare spicy splendid steady steep
    stiff still strange strict strong sturdy subtle sudden sunny super sweet swift tall tame
    tender tense thick thin tidy tight timid tiny tired tough tricky true ugly unique upset
    urban useful vague valid vast violet vital vivid warm wary weak wealthy weary wet wide wild
    wise witty wooden young zealous
    """.split()
)
NOUNS = tuple(
    """
    acorn actor airport album anchor angle animal ankle answer apple apron arch arena army
    arrow artist atlas attic aunt autumn avenue badge bakery balloon banana band banner barn
    basket battery beach beacon bean bear bed bee bell belt bench berry bicycle bird blanket
    boat bone book boot bottle bowl box branch bread brick bridge broom brother brush bucket
    bug building bull button cabin cable cactus cake camel camera camp candle canoe canyon
    captain card carpet carrot castle cat cave cellar chain chair chalk channel cheese cherry
    chest chicken child chimney church circle city clock cloud coat coffee coin comet compass
    cookie copper corner cotton country cousin cow crab crayon creek crown cup curtain cushion
    daisy dancer desert desk diamond dinner doctor dog doll dolphin donkey door dragon drawer
    dream drum duck eagle earth engine envelope eraser falcon farm feather fence field finger
    fire fish flag flute forest fork fountain fox frog garden garlic gate ghost giraffe glacier
    glove goat grape grass guitar hammer harbor hat hawk helmet hill hive honey horse hotel
    house island jacket jar jelly jungle kettle key kitchen kite knife ladder lake lamp lantern
    leaf lemon letter library lighthouse lily lion lizard lobster lock map marble market meadow
    melon mirror monkey moon mountain mouse museum needle nest net ocean office onion orchard
    otter owl paddle palace panda paper parrot peach pearl pencil pepper piano pickle pillow
    pilot pine pipe planet plate plum pocket pond potato puppet puzzle quilt rabbit radio
    rainbow raven ribbon river robot rocket roof rope rose sail salad sandal saucer scarf
    school seal shadow sheep shell ship shoe shovel silver singer skate sled snail snake
    spider spoon squirrel stable stamp star statue stone storm stove street sugar suitcase
    sunflower swan sweater table teapot temple tent thunder tiger toast tomato tower town toy
    tractor train tree trumpet tulip tunnel turtle umbrella valley vase violin volcano wagon
    wallet walrus wand whale wheel whistle window wizard wolf yacht zebra
    """.split()
)
VERBS = tuple(
    """
    accept admire allow arrange arrive ask attach avoid bake balance behave borrow bounce
    breathe build burn calculate carry change chase check cheer clean climb collect compare
    complain cook count cover crawl cross dance decide deliver describe design dig discover
    divide drag draw drift earn enjoy escape examine explain fetch fill finish fix float fold
    follow gather glow grab greet grow guard guess hammer handle hang help hide hover hunt
    imagine improve invent join juggle jump kick knit knock laugh learn lift listen locate
    march measure melt mend mix move notice obey offer open order paint pause perform plant
    play polish pour practice pray prefer prepare print protect pull push question race reach
    read record relax remember repair repeat rescue return ride roll rush sail scatter search
    shake share shine shout sing sketch skip sleep slide smile sort spill splash spray squeeze
    start steer stir stretch study swim swing teach thank throw travel trust twist visit walk
    wander wash watch wave weave whisper wink wish wonder wrap write yawn
    """.split()
)

# Grammatical but content-free sentences for the essay-like haystack; slots are filled from
# the word lists above, so no needle phrase ("special magic") can appear by accident.
_ESSAY_TEMPLATES = (
    "The {a1} {n1} did not expect the {n2} to {v1} so early in the day.",
    "Most people who {v1} a {n1} learn that the {a1} part is rarely the hard one.",
    "In the end, the {n1} near the {n2} was {a1} enough for everyone.",
    "It is easy to {v1} a {a1} {n1}, but much harder to {v2} one well.",
    "When the {n1} began to {v1}, the {a1} {n2} simply waited.",
    "Nobody in the village could explain why the {n1} was so {a1}.",
    "A {a1} {n1} and a {a2} {n2} rarely {v1} together.",
    "Over the years the {n1} has become more {a1} than anyone imagined.",
    "If you want to {v1} the {n1}, start with the {a1} {n2}.",
    "The best way to understand a {n1} is to watch it {v1}.",
    "Every {a1} {n1} eventually learns to {v1} without help.",
    "There was a {a1} {n1} behind the {n2}, and it seemed to {v1}.",
)

# RULER's needle depths: np.round(np.linspace(0, 100, 40)) in percent.
RULER_DEPTHS_PERCENT = tuple(round(100 * i / 39) for i in range(40))

_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def essay_sentences(rng: random.Random, num_sentences: int) -> list[str]:
    """``num_sentences`` essay-like filler sentences drawn with ``rng``."""
    sentences = []
    for _ in range(num_sentences):
        template = rng.choice(_ESSAY_TEMPLATES)
        sentences.append(
            template.format(
                a1=rng.choice(ADJECTIVES),
                a2=rng.choice(ADJECTIVES),
                n1=rng.choice(NOUNS),
                n2=rng.choice(NOUNS),
                v1=rng.choice(VERBS),
                v2=rng.choice(VERBS),
            )
        )
    return sentences


def split_sentences(text: str) -> list[str]:
    """Split caller-supplied essay text into sentences (a light stand-in for nltk's sent_tokenize)."""
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    """A ``num_digits``-digit decimal string without a leading zero (RULER: 7 digits)."""
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_word(rng: random.Random) -> str:
    """An ``adjective-noun`` key or value, as RULER builds its "words" needles."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID string from 128 random bits of ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str) -> str:
    """A needle key/value of ``kind`` in {"numbers", "words", "uuids"}."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_word(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"needle type must be 'numbers', 'words' or 'uuids', got {kind!r}")


def word_pool(rng: random.Random, num_words: int) -> list[str]:
    """``num_words`` distinct single words: real ones when enough, else pseudo-words.

    Mirrors RULER's CWE, which samples from wonderwords and switches to a bigger list when the
    context needs more distinct words than that holds.
    """
    real = sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS))
    if num_words <= len(real):
        return rng.sample(real, num_words)
    words: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < num_words:
        word = "".join(
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4))
        )
        if word not in words:
            words.add(word)
            ordered.append(word)
    return ordered


def riemann_zeta(alpha: float) -> float:
    """zeta(alpha) for alpha > 1 (FWE's Zipf normalizer), by Euler-Maclaurin to ~1e-12."""
    if alpha <= 1:
        raise ValueError(f"zeta needs alpha > 1, got {alpha}")
    n = 50
    head = math.fsum(k**-alpha for k in range(1, n))
    # Tail sum_{k>=n} k^-a ~ n^(1-a)/(a-1) + n^-a/2 + a n^(-a-1)/12 - a(a+1)(a+2) n^(-a-3)/720.
    tail = (
        n ** (1 - alpha) / (alpha - 1)
        + n**-alpha / 2
        + alpha * n ** (-alpha - 1) / 12
        - alpha * (alpha + 1) * (alpha + 2) * n ** (-alpha - 3) / 720
    )
    return head + tail
