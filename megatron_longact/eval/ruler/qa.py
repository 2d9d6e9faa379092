"""RULER QA: a question over its gold passage hidden among distractor passages.

RULER builds qa_1 from SQuAD v2 dev and qa_2 from HotpotQA dev. We download nothing: the caller
supplies a :class:`QAPool` -- read from local copies of those files (:func:`load_squad_pool`,
:func:`load_hotpotqa_pool`) or built offline by :func:`synthetic_qa_pool` (invented towns and
facts; good for smoke tests and CI, not comparable to published RULER QA numbers).

Layout follows RULER ``qa.py``: gold documents, then same-article documents (SQuAD), then random
others, shuffled, numbered "Document i:", as many as fit the budget; pools smaller than the
budget are repeated.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_longact.errors import UserError
from megatron_longact.eval.ruler.config import QA_ANSWER_PREFIX, QA_DOCUMENT, QA_TEMPLATE
from megatron_longact.eval.ruler.layout import Filled, fit_count, render
from megatron_longact.eval.ruler.text import ADJECTIVES, NOUNS
from megatron_longact.eval.tokens import TextCodec


@dataclass(frozen=True)
class QAItem:
    """A question, its accepted answers, the documents holding the answer and related ones."""

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...] = ()


@dataclass(frozen=True)
class QAPool:
    """Documents and the questions over them; items refer to documents by index."""

    documents: tuple[str, ...]
    items: tuple[QAItem, ...]

    def __post_init__(self) -> None:
        for i, item in enumerate(self.items):
            if not item.gold or not item.answers:
                raise ValueError(
                    f"QA item {i} ({item.question!r}) needs at least one gold document and answer"
                )
            bad = [d for d in (*item.gold, *item.related) if not 0 <= d < len(self.documents)]
            if bad:
                raise ValueError(
                    f"QA item {i} refers to documents {bad}, but the pool has {len(self.documents)}"
                )


def load_squad_pool(path: str | Path) -> QAPool:
    """SQuAD v2 JSON (``dev-v2.0.json``): answerable questions, other paragraphs of the article related."""
    data = _read_json(path, "SQuAD v2 dev-v2.0.json")
    try:
        docs = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
        index = {doc: i for i, doc in enumerate(docs)}
        items = []
        for article in data["data"]:
            article_docs = [index[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                gold = index[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if qa.get("is_impossible", False):
                        continue
                    items.append(
                        QAItem(
                            question=qa["question"],
                            answers=tuple(a["text"] for a in qa["answers"]),
                            gold=(gold,),
                            related=tuple(d for d in article_docs if d != gold),
                        )
                    )
    except (KeyError, TypeError) as err:
        raise UserError(
            f"{path}: not in SQuAD v2 format (missing {err}); expected data/paragraphs/qas"
        ) from err
    return QAPool(documents=tuple(docs), items=tuple(items))


def load_hotpotqa_pool(path: str | Path) -> QAPool:
    """HotpotQA dev JSON (distractor setting): each question's listed paragraphs are its gold set."""
    data = _read_json(path, "HotpotQA hotpot_dev_distractor_v1.json")
    try:
        docs = sorted(
            {f"{title}\n{''.join(sents)}" for record in data for title, sents in record["context"]}
        )
        index = {doc: i for i, doc in enumerate(docs)}
        items = tuple(
            QAItem(
                question=record["question"],
                answers=(record["answer"],),
                gold=tuple(
                    index[f"{title}\n{''.join(sents)}"] for title, sents in record["context"]
                ),
            )
            for record in data
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{path}: not in HotpotQA format ({err}); expected question/answer/context"
        ) from err
    return QAPool(documents=tuple(docs), items=items)


def _read_json(path: str | Path, what: str) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the local path of {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from err


def synthetic_qa_pool(*, seed: int = 0, num_items: int = 64) -> QAPool:
    """An offline pool: one passage per invented town, one question per passage.

    Passages read like short encyclopedia entries ("Tavoru is a quiet town ... The mayor of
    Tavoru is Lemi Sarko. ..."); the question asks one fact of one town, so every other passage
    is a distractor.
    """
    rng = random.Random(f"synthetic-qa:{seed}")
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

    def name(parts: int) -> str:
        return "".join(rng.choice(syllables) for _ in range(parts)).capitalize()

    towns: list[str] = []
    while len(towns) < num_items:
        town = name(3)
        if town not in towns:
            towns.append(town)
    documents, items = [], []
    for i, town in enumerate(towns):
        mayor = f"{name(2)} {name(3)}"
        landmark = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        river = name(2)
        founded = rng.randint(1100, 1950)
        documents.append(
            f"{town} is a {rng.choice(ADJECTIVES)} town on the banks of the {river} river. It was founded "
            f"in {founded} by traders from the coast. The mayor of {town} is {mayor}. Visitors come to "
            f"see the {landmark}, the oldest landmark in the town."
        )
        question, answer = rng.choice(
            [
                (f"Who is the mayor of {town}?", mayor),
                (f"On which river does {town} lie?", river),
                (f"In which year was {town} founded?", str(founded)),
                (f"What is the oldest landmark in {town}?", landmark),
            ]
        )
        items.append(QAItem(question=question, answers=(answer,), gold=(i,)))
    return QAPool(documents=tuple(documents), items=tuple(items))


def _choose_documents(rng: random.Random, pool: QAPool, item: QAItem, num_docs: int) -> list[str]:
    """RULER's document choice: gold, then related, then random others; repeat when too few."""
    gold, related = list(item.gold), list(item.related)
    if num_docs < len(pool.documents):
        if num_docs - len(gold) > len(related):
            taken = set(gold) | set(related)
            others = [i for i in range(len(pool.documents)) if i not in taken]
            chosen = gold + related + rng.sample(others, num_docs - len(gold) - len(related))
        else:
            chosen = gold + rng.sample(related, num_docs - len(gold))
        docs = [pool.documents[i] for i in chosen]
    else:
        repeats = -(-num_docs // len(pool.documents))
        docs = (list(pool.documents) * repeats)[:num_docs]
    rng.shuffle(docs)
    return docs


def generate_qa(
    pool: QAPool, *, index: int, task: str, seed: str, codec: TextCodec, budget: int
) -> tuple[Filled, list[str]]:
    """The QA prompt for pool item ``index`` with as many documents as fit ``budget`` tokens."""
    if not 0 <= index < len(pool.items):
        raise UserError(
            f"RULER task {task}: sample {index} needs QA item {index}, but the pool has {len(pool.items)}; pass fewer samples or a larger pool"
        )
    item = pool.items[index]

    def build(num_docs: int) -> Filled:
        docs = _choose_documents(random.Random(seed), pool, item, num_docs)
        context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        return render(QA_TEMPLATE, QA_ANSWER_PREFIX, context=context, query=item.question)

    num_docs = fit_count(
        lambda n: build(n).prompt, codec=codec, budget=budget, minimum=len(item.gold), task=task
    )
    return build(num_docs), list(item.answers)
