"""Caption scores: CIDEr-D and BLEU-1..4, our own implementation (pure Python + numpy), equal to the COCO / NoCaps
reference code, pycocoevalcap 1.2's ``Cider().compute_score`` and ``Bleu(4).compute_score``, including their quirks.
pycocoevalcap is not imported at run time (its wheel, with its Java jars, is ~104 MB); tests/test_evaluation.py
compares our numbers with it on a fixed caption set and on randomly generated ones.

Both take tokenised, lower-cased strings (words separated by white space). pycocoevalcap's ``PTBTokenizer`` needs
Java; :func:`coco_tokenize` does in Python what it does for captions: lower case, split off and drop the punctuation
PTBTokenizer removes. Both corpus-level scores depend on the whole set being scored (CIDEr's document frequencies,
BLEU's corpus brevity penalty): compare numbers on the same set only.

CIDEr-D (:func:`cider_d`): n-grams of 1..4 words; tf-idf vectors with document frequencies counted over the reference
sets of the images being scored (an n-gram counts once per image whose references hold it), idf ``log(N) -
log(max(1, df))`` with N the number of images; per n-gram order, the candidate's vector against each reference's:
sum of ``min(cand, ref) * ref`` (clipped), divided by the two norms (unless one is zero), times a Gaussian length
penalty ``e ** (-delta**2 / (2 * 6**2))``. As in pycocoevalcap, the "length" in ``delta`` is the number of bigrams of
a sentence (max(0, words - 1)); that gives the same delta as word counts, except where a sentence is empty, and
then the similarity is 0 anyway. An image's score: 10 x the mean over the 4 orders of the
per-order sum over its references, divided by its number of references; the corpus score is the mean over images.

BLEU (:func:`bleu`): corpus-level. Per image: clipped n-gram matches against the maximum count over its references,
and the "closest" reference length (ties: the shorter). Summed over images, the score of order n is
``(prod_{k<=n} (correct_k + 1e-15) / (guess_k + 1e-9)) ** (1/n)``, times ``exp(1 - reflen/testlen)`` where
``(testlen + 1e-15) / (reflen + 1e-9) < 1``. (So an order without a single match scores a small positive number,
not 0, as pycocoevalcap does.) Per-image scores are computed the same way on the image alone.

Scores are computed once, on the gathered captions of every data-parallel rank (cheap next to generation).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

# the tokens pycocoevalcap's PTBTokenizer drops after tokenising (compared after lower-casing, so its "-LRB-" etc.
# survive as "-lrb-": they are listed here in the form PTBTokenizer leaves them)
PUNCTUATIONS = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT = re.compile(r'(\.\.\.|--|[,;:?!()\[\]{}%"])')
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co.", "no.", "ft.", "mt."}
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def coco_tokenize(text: str) -> str:
    """What pycocoevalcap's (Java) PTBTokenizer makes of a caption, in Python: lower case; punctuation split off
    and dropped; brackets as -lrb- / -rrb- ...; "%" split off; contractions split (is n't, man 's); a sentence's
    final period dropped, inner ones (3.5, e.g.) kept; hyphenated words kept whole. Words joined by spaces."""
    text = text.lower().replace("\n", " ").replace("\u2019", "'")
    out = []
    for part in _SPLIT.sub(r" \1 ", text).split():
        if part in _BRACKETS:
            out.append(_BRACKETS[part])
            continue
        if part == '"':
            continue
        if part.endswith(".") and part.count(".") == 1 and len(part) > 1 and part not in _ABBREVIATIONS:
            part = part[:-1]  # "beach." -> "beach" (the "." is dropped)
        if part.startswith("'") and len(part) > 1 and not _CONTRACTION.match(part):
            part = part[1:]
        if part.endswith("'") and len(part) > 1:  # "kids'" -> "kids" "'"
            part = part[:-1]
        if part == "cannot":
            out += ["can", "not"]
            continue
        m = _CONTRACTION.match(part)
        pieces = [m.group(1), m.group(2)] if m else [part]
        out += [p for p in pieces if p and p not in PUNCTUATIONS]
    return " ".join(out)


_TINY = 1e-15  # BLEU's smoothing constants (pycocoevalcap's bleu_scorer): numerator ...
_SMALL = 1e-9  # ... and denominator


def _ngrams(words: list[str], n: int = 4) -> Counter:
    """Counts of the 1..n-grams (tuples) of ``words``, in the order 1-grams first, each order left to right."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _as_inputs(gts: dict, res: dict) -> list[tuple[str, list[str]]]:
    """[(candidate, [references])] in ``gts``'s order; a candidate may be a string or a one-element list."""
    if set(gts) != set(res):
        raise ValueError("references and candidates must have the same ids")
    out = []
    for key, refs in gts.items():
        cand = res[key]
        if not isinstance(cand, str):
            if len(cand) != 1:
                raise ValueError(f"image {key!r}: one candidate caption expected, got {len(cand)}")
            cand = cand[0]
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"image {key!r}: no reference captions")
        out.append((cand, refs))
    return out


def cider_d(gts: dict, res: dict, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised candidates ``res`` {id: str or [str]} against tokenised references ``gts`` {id: [str]}:
    (corpus score, per-image scores in ``gts``'s order), equal to pycocoevalcap 1.2's ``Cider().compute_score``
    (which returns the per-image scores as an array). An empty set scores (0.0, [])."""
    items = _as_inputs(gts, res)
    if not items:
        return 0.0, []
    cooked = [(_ngrams(c.split(), n), [_ngrams(r.split(), n) for r in refs]) for c, refs in items]
    # document frequency: the number of images whose references hold the n-gram
    df: Counter = Counter()
    for _, refs in cooked:
        df.update(set().union(*refs))
    log_n = float(np.log(float(len(items))))
    log_df: dict[int, float] = {}

    def idf(g) -> float:
        d = df.get(g, 0)
        if d not in log_df:
            log_df[d] = float(np.log(max(1.0, float(d))))
        return log_n - log_df[d]

    def tfidf(counts: Counter):
        """Per order: {ngram: tf * idf}, its L2 norm; and the sentence's number of bigrams (CIDEr-D's "length")."""
        vecs = [{} for _ in range(n)]
        for g, tf in counts.items():
            vecs[len(g) - 1][g] = float(tf) * idf(g)
        norms = []
        for v in vecs:
            sq = 0.0
            for w in v.values():  # a plain running sum (Python 3.12's sum() of floats is compensated)
                sq += w ** 2
            norms.append(math.sqrt(sq))
        bigrams = sum(counts[g] for g in vecs[1]) if n > 1 else 0
        return vecs, norms, bigrams

    two_sigma2 = 2 * sigma ** 2
    scores = []
    for cand, refs in cooked:
        cvec, cnorm, clen = tfidf(cand)
        total = np.zeros(n)
        for ref in refs:
            rvec, rnorm, rlen = tfidf(ref)
            penalty = math.e ** (-(float(clen - rlen) ** 2) / two_sigma2)
            for k in range(n):
                sim = 0.0
                for g, w in cvec[k].items():
                    r = rvec[k].get(g, 0.0)
                    sim += min(w, r) * r  # clipped: a candidate n-gram counts at most as often as in the reference
                if cnorm[k] != 0 and rnorm[k] != 0:
                    sim /= cnorm[k] * rnorm[k]
                total[k] += sim * penalty
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(np.array(scores))), scores


def bleu(gts: dict, res: dict, n: int = 4) -> tuple[list[float], list[list[float]]]:
    """BLEU-1..n of tokenised candidates ``res`` {id: str or [str]} against tokenised references ``gts`` {id: [str]}:
    ([corpus BLEU-1, ..., BLEU-n], [[per-image BLEU-k in ``gts``'s order] for k = 1..n]), equal to pycocoevalcap
    1.2's ``Bleu(n).compute_score`` (effective reference length "closest"). An empty set scores ([0.0] * n, [[]] *
    n)."""
    items = _as_inputs(gts, res)
    per_image: list[list[float]] = [[] for _ in range(n)]
    if not items:
        return [0.0] * n, per_image

    def score(correct, guess, testlen, reflen) -> list[float]:
        out, prod = [], 1.0
        for k in range(n):
            prod *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
            out.append(prod ** (1.0 / (k + 1)))
        ratio = (testlen + _TINY) / (reflen + _SMALL)
        if ratio < 1:  # brevity penalty
            bp = math.exp(1 - 1 / ratio)
            out = [b * bp for b in out]
        return out

    tot_correct, tot_guess, tot_test, tot_ref = [0] * n, [0] * n, 0, 0
    for cand, refs in items:
        words = cand.split()
        counts = _ngrams(words, n)
        ref_lens, max_ref = [], Counter()
        for r in refs:
            rw = r.split()
            ref_lens.append(len(rw))
            max_ref |= _ngrams(rw, n)  # per n-gram: the maximum count over the references
        testlen = len(words)
        reflen = min(ref_lens, key=lambda length: (abs(length - testlen), length))  # closest; ties: the shorter
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for g, c in counts.items():
            correct[len(g) - 1] += min(max_ref.get(g, 0), c)
        for k, b in enumerate(score(correct, guess, testlen, reflen)):
            per_image[k].append(b)
        tot_correct = [a + b for a, b in zip(tot_correct, correct)]
        tot_guess = [a + b for a, b in zip(tot_guess, guess)]
        tot_test += testlen
        tot_ref += reflen
    return score(tot_correct, tot_guess, tot_test, tot_ref), per_image


def caption_scores(references: dict, candidates: dict, tokenize: bool = True) -> dict[str, float]:
    """Corpus CIDEr-D and BLEU-1..4 of ``candidates`` {id: caption} against ``references`` {id: [captions]}.
    Returns ``{"cider", "bleu1", ..., "bleu4"}``; an empty set scores 0."""
    if set(references) != set(candidates):
        raise ValueError("references and candidates must have the same ids")
    if not candidates:
        return {"cider": 0.0, "bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}
    norm = coco_tokenize if tokenize else (lambda s: s)
    gts = {k: [norm(r) for r in (v if isinstance(v, (list, tuple)) else [v])] for k, v in references.items()}
    res = {k: [norm(v if isinstance(v, str) else v[0])] for k, v in candidates.items()}
    out = {f"bleu{k + 1}": float(b) for k, b in enumerate(bleu(gts, res, 4)[0])}
    out["cider"] = cider_d(gts, res)[0]
    return out
