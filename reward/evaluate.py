"""How well the reward model agrees with held-out human judgments, and the threshold its accept decisions use.

- Pairwise accuracy: the share of held-out preference pairs whose chosen rationale gets the higher reward
  (ties count half), overall and for judged-vs-judged and reference-vs-candidate pairs separately.
- ROC-AUC of the reward as a score for "a person accepted this candidate" (Mann-Whitney U with mid-ranks).
- The accept threshold: the lowest reward whose precision on the held-out judgments reaches the target;
  its precision and recall there (in-sample, so optimistic), and a 2-fold cross-fit estimate (calibrate on
  half of the held-out examples, measure on the other half, both ways) of what a new round will see.
- The accept probability: Platt scaling, P(accept | reward) = sigmoid(a * reward + b), fitted on the same
  held-out judgments (`fit_platt`); its Brier score and expected calibration error (10 bins) there
  (in-sample) and cross-fit the same way, beside the Brier score of always saying the held-out acceptance
  rate (what a probability must beat to say anything). Too few accepted or rejected candidates: no
  probability, and the report says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from illume import distributed
from illume.data.records import Example
from illume.feedback.verdicts import PreferencePair
from reward.model import RewardModel, accept_probability, score
from reward.pairs import OneSidedJudgments

EVAL_FILE = "reward_eval.json"
PLOT_FILE = "calibration.png"
MIN_PLATT_PER_CLASS = 5
"""Platt scaling needs at least this many accepted and as many rejected candidates: 5 to 9 events per
variable are enough for a logistic regression's estimates (Vittinghoff & McCulloch 2007, Am. J. Epidemiol.
165(6):710), and Platt's has one variable, the reward."""
NUM_ECE_BINS = 10


def _score_texts(rm: RewardModel, texts_by_prompt: dict[tuple[str, str], list[str]],
                 examples_by_id: dict[str, Example], batch_size: int) -> dict[tuple[str, str, str], float]:
    """Reward of every distinct (example_id, prompt, text), each image encoded once per (example, prompt)."""
    keys = list(texts_by_prompt)
    items = [(examples_by_id[example_id], prompt, texts_by_prompt[(example_id, prompt)])
             for example_id, prompt in keys]
    rewards = score(rm, items, batch_size=batch_size)
    return {(example_id, prompt, text): reward
            for (example_id, prompt), texts, item_rewards in zip(keys, texts_by_prompt.values(), rewards)
            for text, reward in zip(texts, item_rewards)}


def pair_margins(rm: RewardModel, pairs: Sequence[PreferencePair], examples_by_id: dict[str, Example],
                 batch_size: int = 64) -> list[float]:
    """r(chosen) - r(rejected) for every pair (each distinct rationale scored once)."""
    texts: dict[tuple[str, str], dict[str, None]] = {}
    for pair in pairs:
        group = texts.setdefault((pair.example_id, pair.prompt), {})
        group[pair.chosen] = group[pair.rejected] = None
    rewards = _score_texts(rm, {key: list(group) for key, group in texts.items()}, examples_by_id, batch_size)
    return [rewards[(p.example_id, p.prompt, p.chosen)] - rewards[(p.example_id, p.prompt, p.rejected)]
            for p in pairs]


def _accuracy(margins: Sequence[float]) -> float | None:
    if not margins:
        return None
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)


def pairwise_accuracy(rm: RewardModel, pairs: Sequence[PreferencePair], examples_by_id: dict[str, Example],
                      batch_size: int = 64) -> float:
    """Share of pairs whose chosen rationale gets the higher reward (a tie counts 1/2).

    Raises:
        ValueError: no pairs.
    """
    if not pairs:
        raise ValueError("pairwise accuracy of no pairs")
    return _accuracy(pair_margins(rm, pairs, examples_by_id, batch_size))


def score_judged(rm: RewardModel, judged: Sequence[tuple[str, str, str, bool]],
                 examples_by_id: dict[str, Example], batch_size: int = 64) -> list[float]:
    """Rewards of `judged_candidates(...)` rows, parallel to them."""
    texts: dict[tuple[str, str], dict[str, None]] = {}
    for example_id, prompt, text, _ in judged:
        texts.setdefault((example_id, prompt), {})[text] = None
    rewards = _score_texts(rm, {key: list(group) for key, group in texts.items()}, examples_by_id, batch_size)
    return [rewards[(example_id, prompt, text)] for example_id, prompt, text, _ in judged]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2.

    Computed as the Mann-Whitney U statistic from mid-ranks: AUC = (R+ - n+(n+ + 1)/2) / (n+ n-), where R+ is
    the sum of the positives' ranks (1 = lowest score, tied scores share their average rank).

    Raises:
        ValueError: lengths differ, or only one class is present.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    num_pos = sum(bool(y) for y in labels)
    num_neg = len(labels) - num_pos
    if not num_pos or not num_neg:
        raise ValueError(f"ROC-AUC needs both classes; got {num_pos} positives and {num_neg} negatives")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in range(start, end + 1):  # ranks start+1 .. end+1 share their mean
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = sum(rank for rank, y in zip(ranks, labels) if y)
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def accept_metrics(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> tuple[float, float]:
    """Precision and recall of accepting every candidate whose score is >= threshold.

    Returns:
        (precision, recall); precision is NaN when nothing is accepted, recall NaN when no label is positive.
    """
    accepted = [s >= threshold for s in scores]
    true_pos = sum(a and bool(y) for a, y in zip(accepted, labels))
    num_accepted, num_pos = sum(accepted), sum(bool(y) for y in labels)
    precision = true_pos / num_accepted if num_accepted else math.nan
    recall = true_pos / num_pos if num_pos else math.nan
    return precision, recall


def _precision_by_threshold(scores: Sequence[float], labels: Sequence[bool]) -> list[tuple[float, float]]:
    """(t, precision of score >= t) for every distinct score t, highest t first."""
    ranked = sorted(zip(scores, labels), key=lambda pair: -pair[0])
    curve, true_pos, i = [], 0, 0
    while i < len(ranked):
        threshold = ranked[i][0]
        while i < len(ranked) and ranked[i][0] == threshold:
            true_pos += bool(ranked[i][1])
            i += 1
        curve.append((threshold, true_pos / i))
    return curve


def calibrate_threshold(scores: Sequence[float], labels: Sequence[bool], target_precision: float) -> float:
    """The lowest score t such that accepting score >= t has precision >= target on these labels.

    When no threshold reaches the target, the one with the highest precision (the lowest such, for recall)
    is returned with a RuntimeWarning.

    Raises:
        ValueError: lengths differ, or no label is positive.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if not any(labels):
        raise ValueError("calibrating an accept threshold needs at least one accepted candidate")
    curve = _precision_by_threshold(scores, labels)
    reaching = [t for t, precision in curve if precision >= target_precision]
    if reaching:
        return min(reaching)
    best = max(precision for _, precision in curve)
    threshold = min(t for t, precision in curve if precision == best)
    warnings.warn(f"no reward threshold reaches precision {target_precision:g} on the {len(scores)} judged "
                  f"candidates; using {threshold:.4g}, whose precision {best:.3f} is the highest",
                  RuntimeWarning, stacklevel=2)
    return threshold


def fit_platt(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, float]:
    """(a, b) of P(accept | score) = sigmoid(a * score + b), by maximum likelihood on these judgments.

    Platt's targets stand in for the labels (Platt 1999, "Probabilistic outputs for support vector
    machines"; Lin, Lin & Weng 2007, Machine Learning 68:267): (N+ + 1) / (N+ + 2) for an accepted
    candidate and 1 / (N- + 2) for a rejected one, so that a held-out set the reward separates perfectly
    still gets finite (a, b) instead of probabilities of exactly 0 and 1 (scikit-learn's
    `CalibratedClassifierCV(method="sigmoid")` does the same). Fitted by Newton's method with step halving
    on the two parameters, in plain Python: the problem is convex and tiny, and scikit-learn is not a
    dependency of illume (nor worth becoming one for two parameters).

    Raises:
        ValueError: lengths differ; fewer than `MIN_PLATT_PER_CLASS` accepted or rejected candidates; every
            score the same (the score then says nothing about acceptance). The message says which.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    num_pos = sum(bool(y) for y in labels)
    num_neg = len(labels) - num_pos
    if min(num_pos, num_neg) < MIN_PLATT_PER_CLASS:
        raise ValueError(f"no accept probability: Platt scaling needs at least {MIN_PLATT_PER_CLASS} accepted "
                         f"and {MIN_PLATT_PER_CLASS} rejected held-out candidates, got {num_pos} and {num_neg}")
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if std == 0:
        raise ValueError(f"no accept probability: all {len(scores)} held-out candidates have the same score")
    z = [(s - mean) / std for s in scores]  # standardised, so that one Newton scale suits any reward range
    target_pos, target_neg = (num_pos + 1) / (num_pos + 2), 1 / (num_neg + 2)
    t = [target_pos if y else target_neg for y in labels]

    def loss(alpha: float, beta: float) -> float:  # -log likelihood; log(1 + e^x) without overflow
        return sum(ti * _softplus(-(alpha * zi + beta)) + (1 - ti) * _softplus(alpha * zi + beta)
                   for zi, ti in zip(z, t))

    alpha, beta, current = 0.0, 0.0, loss(0.0, 0.0)
    for _ in range(100):
        p = accept_probability(z, (alpha, beta))
        g_alpha = sum((pi - ti) * zi for pi, ti, zi in zip(p, t, z))  # the gradient
        g_beta = sum(pi - ti for pi, ti in zip(p, t))
        if abs(g_alpha) + abs(g_beta) < 1e-9 * len(z):
            break
        w = [pi * (1 - pi) for pi in p]
        h_aa = sum(wi * zi * zi for wi, zi in zip(w, z))  # the Hessian [[h_aa, h_ab], [h_ab, h_bb]]
        h_ab = sum(wi * zi for wi, zi in zip(w, z))
        h_bb = sum(w)
        det = h_aa * h_bb - h_ab * h_ab
        d_alpha, d_beta = (h_bb * g_alpha - h_ab * g_beta) / det, (h_aa * g_beta - h_ab * g_alpha) / det
        step = 1.0
        while (new := loss(alpha - step * d_alpha, beta - step * d_beta)) > current and step > 1e-10:
            step /= 2  # halve the Newton step until the loss falls
        if new > current:  # no step lowers it: the minimum, to rounding
            break
        alpha, beta, previous, current = alpha - step * d_alpha, beta - step * d_beta, current, new
        if previous - current < 1e-12 * len(z):
            break
    else:
        raise ValueError("no accept probability: Platt scaling did not converge in 100 Newton steps")
    return alpha / std, beta - alpha * mean / std  # back to the raw score: a * s + b = alpha * z + beta


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def brier_score(probabilities: Sequence[float], labels: Sequence[bool]) -> float:
    """Mean squared difference between the probability and the label (1 accepted, 0 rejected)."""
    if not probabilities or len(probabilities) != len(labels):
        raise ValueError(f"{len(probabilities)} probabilities and {len(labels)} labels")
    return sum((p - float(bool(y))) ** 2 for p, y in zip(probabilities, labels)) / len(labels)


def expected_calibration_error(probabilities: Sequence[float], labels: Sequence[bool],
                               num_bins: int = NUM_ECE_BINS) -> float:
    """ECE: the probabilities in `num_bins` equal-width bins of [0, 1]; the mean over candidates of
    |share accepted in its bin - mean probability in its bin| (Eq. 3 of https://arxiv.org/abs/1706.04599)."""
    if not probabilities or len(probabilities) != len(labels):
        raise ValueError(f"{len(probabilities)} probabilities and {len(labels)} labels")
    bins: dict[int, list[tuple[float, bool]]] = {}
    for p, y in zip(probabilities, labels):
        bins.setdefault(min(int(p * num_bins), num_bins - 1), []).append((p, bool(y)))
    return sum(abs(sum(y for _, y in members) - sum(p for p, _ in members))  # n_b * |acc_b - conf_b|
               for members in bins.values()) / len(labels)


def _probability_report(scores: Sequence[float], labels: Sequence[bool],
                        judged: Sequence[tuple[str, str, str, bool]]) -> tuple[tuple[float, float] | None, dict]:
    """Platt's (a, b) on all of the held-out judgments (None when it cannot be fitted), and the report's
    probability entries: (a, b), in-sample Brier and ECE, the base rate's Brier, and their 2-fold cross-fit
    (fit on one half of the examples, predict the other, both ways; pooled; None when either half has too
    few accepted or rejected candidates to fit)."""
    base_rate = sum(labels) / len(labels)
    report = {"platt_a": None, "platt_b": None, "probability_unavailable": None, "brier": None, "ece": None,
              "brier_base_rate": base_rate * (1 - base_rate), "brier_crossfit": None, "ece_crossfit": None}
    try:
        platt = fit_platt(scores, labels)
    except ValueError as error:
        return None, {**report, "probability_unavailable": str(error)}
    probabilities = accept_probability(scores, platt)
    report.update(platt_a=platt[0], platt_b=platt[1], brier=brier_score(probabilities, labels),
                  ece=expected_calibration_error(probabilities, labels))
    predicted, observed = [], []
    for fold in (0, 1):
        fit = [(s, y) for row, s, y in zip(judged, scores, labels) if _half(row[0]) == fold]
        test = [(s, y) for row, s, y in zip(judged, scores, labels) if _half(row[0]) != fold]
        try:
            half_platt = fit_platt([s for s, _ in fit], [y for _, y in fit])
        except ValueError:  # a half too small to fit: no cross-fit figure
            return platt, report
        predicted += accept_probability([s for s, _ in test], half_platt)
        observed += [y for _, y in test]
    report.update(brier_crossfit=brier_score(predicted, observed),
                  ece_crossfit=expected_calibration_error(predicted, observed))
    return platt, report


def calibration_plot(scores: Sequence[float], labels: Sequence[bool], path: str | Path,
                     threshold: float | None = None, target_precision: float | None = None,
                     platt: tuple[float, float] | None = None) -> Path:
    """A PNG with three panels: reward histograms (counts) of accepted vs rejected candidates; precision and
    recall of "accept if reward >= t" against t; the share accepted by people per reward bin (reliability),
    with Platt's P(accept | reward) over it when `platt` is given."""
    # A bare Figure draws on the Agg canvas: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    low, high = min(scores), max(scores)
    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)

    ax = axes[0]
    edges = [low + (high - low) * k / 30 for k in range(31)] if high > low else 10
    ax.hist(neg, bins=edges, alpha=0.6, color="tab:red", label=f"rejected by people ({len(neg)})")
    ax.hist(pos, bins=edges, alpha=0.6, color="tab:green", label=f"accepted by people ({len(pos)})")
    ax.set(xlabel="reward", ylabel="candidates", title="Rewards of held-out candidates")

    ax = axes[1]
    grid = sorted(set(scores))
    metrics = [accept_metrics(scores, labels, t) for t in grid]
    ax.plot(grid, [p for p, _ in metrics], color="tab:blue", label="precision")
    ax.plot(grid, [r for _, r in metrics], color="tab:orange", label="recall")
    if target_precision is not None:
        ax.axhline(target_precision, color="tab:blue", linestyle=":", label=f"target precision {target_precision:g}")
    ax.set(xlabel="threshold t (accept if reward >= t)", ylim=(0, 1.02), title="Accept decisions")

    ax = axes[2]
    num_bins = 10  # equal-width reward bins; the number of candidates is written above each point
    width = (high - low) / num_bins or 1.0
    bins: dict[int, list[bool]] = {}
    for s, y in zip(scores, labels):
        bins.setdefault(min(int((s - low) / width), num_bins - 1), []).append(bool(y))
    centers = [low + (k + 0.5) * width for k in sorted(bins)]
    rates = [sum(bins[k]) / len(bins[k]) for k in sorted(bins)]
    ax.plot(centers, rates, marker="o", color="tab:purple", label="share accepted per bin")
    if platt is not None:
        grid = [low + (high - low) * k / 100 for k in range(101)]
        ax.plot(grid, accept_probability(grid, platt), color="tab:gray",
                label=f"P(accept) = sigmoid({platt[0]:.3g} reward {platt[1]:+.3g})")
    for x, y, k in zip(centers, rates, sorted(bins)):
        ax.annotate(str(len(bins[k])), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xlabel="reward (bin centre)", ylabel="share accepted by people", ylim=(-0.02, 1.08),
           title="Reliability (candidates per bin above points)")

    for ax in axes:
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8, loc="lower left")
    axes[2].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _half(example_id: str) -> int:
    return hashlib.sha256(f"crossfit/{example_id}".encode()).digest()[0] % 2


def _crossfit(judged: Sequence[tuple[str, str, str, bool]], scores: Sequence[float],
              target_precision: float) -> dict[str, float | None]:
    """Calibrate on one half of the examples, measure on the other, both ways; pooled counts."""
    true_pos = num_accepted = num_pos = 0
    for fold in (0, 1):
        fit = [(s, row[3]) for row, s in zip(judged, scores) if _half(row[0]) == fold]
        test = [(s, row[3]) for row, s in zip(judged, scores) if _half(row[0]) != fold]
        if not any(y for _, y in fit) or not test:
            return {"precision_crossfit": None, "recall_crossfit": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            threshold = calibrate_threshold([s for s, _ in fit], [y for _, y in fit], target_precision)
        true_pos += sum(s >= threshold and y for s, y in test)
        num_accepted += sum(s >= threshold for s, _ in test)
        num_pos += sum(bool(y) for _, y in test)
    return {"precision_crossfit": true_pos / num_accepted if num_accepted else None,
            "recall_crossfit": true_pos / num_pos if num_pos else None}


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def check_heldout_labels(judged_heldout: Sequence[tuple]) -> None:
    """A threshold is calibrated on held-out candidates of both kinds.

    Raises:
        OneSidedJudgments: the held-out judgments (`labelled_candidates` rows) lack accepted or rejected ones.
    """
    labels = [bool(row[3]) for row in judged_heldout]
    if not any(labels) or all(labels):
        raise OneSidedJudgments(
            f"the held-out judgments ({len(labels)} candidates, {sum(labels)} accepted) need both accepted and "
            "rejected candidates to calibrate a threshold: judge more items or raise reward.heldout_fraction")


def evaluate_reward_model(rm: RewardModel, pairs_heldout: Sequence[PreferencePair],
                          judged_heldout: Sequence[tuple[str, str, str, bool]],
                          examples_by_id: dict[str, Example], target_precision: float,
                          out_dir: str | Path, batch_size: int = 64) -> dict:
    """Score the held-out pairs and judged candidates, calibrate `rm.threshold` and `rm.platt`, write the
    report and plot.

    Sets `rm.threshold`, `rm.target_precision` and `rm.platt` (save the model afterwards to keep them).

    Returns:
        The report written to `out_dir/reward_eval.json` (pairwise accuracies, ROC-AUC, threshold, precision
        and recall at it, cross-fit precision and recall, Platt's (a, b) or why there is none, Brier score
        and ECE of its probability in-sample and cross-fit, the base rate's Brier score, counts);
        `out_dir/calibration.png` is the plot.

    Raises:
        OneSidedJudgments: the held-out judgments lack accepted or rejected candidates.
    """
    check_heldout_labels(judged_heldout)
    labels = [bool(row[3]) for row in judged_heldout]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    margins = pair_margins(rm, pairs_heldout, examples_by_id, batch_size)
    scores = score_judged(rm, judged_heldout, examples_by_id, batch_size)
    threshold = calibrate_threshold(scores, labels, target_precision)
    precision, recall = accept_metrics(scores, labels, threshold)
    platt, probability = _probability_report(scores, labels, judged_heldout)
    rm.threshold, rm.target_precision, rm.platt = threshold, target_precision, platt
    report = {
        "pairwise_accuracy": _accuracy(margins),
        "pairwise_accuracy_judged": _accuracy([m for m, p in zip(margins, pairs_heldout) if p.source == "judged"]),
        "pairwise_accuracy_reference": _accuracy(
            [m for m, p in zip(margins, pairs_heldout) if p.source == "reference"]),
        "roc_auc": roc_auc(scores, labels),
        "threshold": threshold,
        "target_precision": target_precision,
        "precision": _finite(precision),
        "recall": _finite(recall),
        **_crossfit(judged_heldout, scores, target_precision),
        **probability,
        "num_pairs": len(pairs_heldout),
        "num_pairs_judged": sum(p.source == "judged" for p in pairs_heldout),
        "num_pairs_reference": sum(p.source == "reference" for p in pairs_heldout),
        "num_candidates": len(labels),
        "num_accepted": sum(labels),
        "num_examples": len({row[0] for row in judged_heldout}),
        "mean_reward_accepted": sum(s for s, y in zip(scores, labels) if y) / sum(labels),
        "mean_reward_rejected": sum(s for s, y in zip(scores, labels) if not y) / (len(labels) - sum(labels)),
    }
    if distributed.is_main():  # every rank computed the same report; one writes it
        (out_dir / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
        calibration_plot(scores, labels, out_dir / PLOT_FILE, threshold, target_precision, platt)
    return report
