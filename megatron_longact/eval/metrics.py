"""Answer-matching metrics of the long-context benchmarks, re-implemented from their official rules.

Every function scores ONE prediction against its references and returns a float in [0, 1];
suites average and scale to percent. Sources of each rule:

* SQuAD normalization, token F1, Chinese character F1, first-integer match: InfiniteBench
  ``src/compute_scores.py`` (``normalize_answer``, ``qa_f1_score``, ``qa_f1_score_zh``,
  ``first_int_match``).
* ROUGE-L / ROUGE-Lsum: Google's ``rouge_score`` as called by HF ``evaluate.load("rouge")``
  (InfiniteBench En.Sum reports ``rougeLsum``): lower case, non-alphanumerics to spaces, no
  stemming; Lsum splits both texts on newlines and uses the union-LCS summary-level score.
* string_match_all / string_match_part and the prediction clean-up: RULER
  ``scripts/eval/synthetic/constants.py`` and ``scripts/eval/evaluate.py``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

# InfiniteBench's Chinese punctuation set (normalize_zh_answer), added to string.punctuation.
_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def _as_refs(references: str | Sequence[str]) -> list[str]:
    return [references] if isinstance(references, str) else list(references)


def strip_thinking(response: str) -> str:
    """Text after the last ``</think>`` (the whole text when there is none).

    Official scorers receive only the answer part of a reasoning model's reply (vLLM's
    reasoning parser splits it off); this does the same for raw generations.
    """
    head, sep, tail = response.rpartition("</think>")
    return tail if sep else response


# ----------------------------------------------------------------------------- normalization
def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation, drop a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalization: lower case, drop English and Chinese punctuation, drop all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ALL_PUNCT)
    return "".join(text.split())


# ----------------------------------------------------------------------------- F1 / EM
def _f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    num_same = sum((Counter(prediction) & Counter(reference)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Max over references of the bag-of-words F1 after SQuAD normalization (En.QA)."""
    pred_tokens = normalize_answer(prediction).split()
    return max(
        (_f1(pred_tokens, normalize_answer(r).split()) for r in _as_refs(references)), default=0.0
    )


def zh_char_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Max over references of the character-level F1 after Chinese normalization (Zh.QA).

    One character is one token, as InfiniteBench's ``qa_f1_score_zh`` (no word segmentation).
    """
    pred_chars = list(normalize_zh_answer(prediction))
    return max(
        (_f1(pred_chars, list(normalize_zh_answer(r))) for r in _as_refs(references)), default=0.0
    )


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the SQuAD-normalized prediction equals any normalized reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_refs(references)))


# ----------------------------------------------------------------------------- ROUGE-L
def rouge_tokenize(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming: lower, non [a-z0-9] runs -> space, split."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _lcs_table(ref: Sequence[str], cand: Sequence[str]) -> list[list[int]]:
    """(len(ref)+1) x (len(cand)+1) LCS length table."""
    table = [[0] * (len(cand) + 1) for _ in range(len(ref) + 1)]
    for i, r_tok in enumerate(ref, start=1):
        row, prev = table[i], table[i - 1]
        for j, c_tok in enumerate(cand, start=1):
            row[j] = prev[j - 1] + 1 if r_tok == c_tok else max(row[j - 1], prev[j])
    return table


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)*len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for a_tok in a:
        cur = [0] * (len(b) + 1)
        for j, b_tok in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if a_tok == b_tok else max(cur[j - 1], prev[j])
        prev = cur
    return prev[-1]


def _f_measure(hits: int, num_pred: int, num_ref: int) -> float:
    if hits == 0 or num_pred == 0 or num_ref == 0:
        return 0.0
    precision, recall = hits / num_pred, hits / num_ref
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """Sentence-level ROUGE-L F: LCS over the whole token sequences (rouge_score ``rougeL``)."""
    pred, ref = rouge_tokenize(prediction), rouge_tokenize(reference)
    return _f_measure(lcs_length(ref, pred), len(pred), len(ref))


def _lcs_indices(ref: Sequence[str], cand: Sequence[str]) -> list[int]:
    """Indices into ``ref`` of one LCS, backtracked as rouge_score's ``_backtrack_norec`` does."""
    table = _lcs_table(ref, cand)
    i, j, picked = len(ref), len(cand), []
    while i > 0 and j > 0:
        if ref[i - 1] == cand[j - 1]:
            picked.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return picked[::-1]


def rouge_lsum(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F (rouge_score ``rougeLsum``), the En.Sum metric.

    Both texts are split into sentences on newlines. For every reference sentence, the union of
    its LCS with each predicted sentence gives hit candidates; a token counts as a hit while both
    sides still have unused occurrences of it. P = hits/|pred tokens|, R = hits/|ref tokens|.
    """
    ref_sents = [rouge_tokenize(s) for s in reference.split("\n") if s]
    pred_sents = [rouge_tokenize(s) for s in prediction.split("\n") if s]
    num_ref, num_pred = sum(map(len, ref_sents)), sum(map(len, pred_sents))
    if num_ref == 0 or num_pred == 0:
        return 0.0
    ref_left = Counter(tok for s in ref_sents for tok in s)
    pred_left = Counter(tok for s in pred_sents for tok in s)
    hits = 0
    for ref_sent in ref_sents:
        union = sorted(set().union(*(_lcs_indices(ref_sent, p) for p in pred_sents)))
        for tok in (ref_sent[k] for k in union):
            if ref_left[tok] > 0 and pred_left[tok] > 0:
                hits += 1
                ref_left[tok] -= 1
                pred_left[tok] -= 1
    return _f_measure(hits, num_pred, num_ref)


# ----------------------------------------------------------------------------- RULER
def ruler_postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters -> newline, strip again."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found (case-insensitive substring) in the prediction (NIAH/VT/CWE/FWE)."""
    refs = list(references)
    if not refs:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any reference is a case-insensitive substring of the prediction (RULER QA)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


# ----------------------------------------------------------------------------- retrieval
def first_int(prediction: str) -> str:
    """The first maximal run of ASCII digits in ``prediction`` ('' when none), as InfiniteBench."""
    match = re.search(r"[0-9]+", prediction)
    return match.group(0) if match else ""


# ----------------------------------------------------------------------------- sampled metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (``k <= n``).

    1 - C(n - c, k) / C(n, k), the estimator of Chen et al. 2021 ("Evaluating Large Language
    Models Trained on Code", Eq. 1), computed as their numerically stable product
    1 - prod_{i = n - c + 1}^{n} (1 - k / i) (the paper's Figure 3).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_ks(n: int) -> list[int]:
    """The k of the pass@k reported for ``n`` samples per prompt: 1, 2, 4, ... up to n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error sd / sqrt(n) (sd with n - 1); NaNs are skipped.

    Applied to per-prompt means of k samples, the prompts are the independent units, so the
    error covers both the finite prompt set and the sampling (samples of one prompt are
    correlated, which a per-sample error would ignore). (nan, nan) when no value; SE nan for
    one value.
    """
    kept = [float(v) for v in values if v == v]
    if not kept:
        return float("nan"), float("nan")
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    return mean, (var / len(kept)) ** 0.5
