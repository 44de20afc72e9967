"""stats.py: the statistics every evaluation reports (a leaf: imports nothing from the project,
nor numpy or torch, so a results script can read evaluation JSONs without the learner).

- Wilson's score interval of a success rate (95%: z = 1.96), sensible at 0/n and n/n;
- the exact McNemar test for two policies evaluated on the same episodes (same reset seeds): only
  the discordant pairs carry information, b episodes where A succeeds and B fails, c the reverse;
  under "same success rate" b ~ Binomial(b + c, 1/2). Stratified over training seeds, the
  discordant counts of the strata add up (each stratum's pairs are matched within it);
- Holm's step-down correction of several p-values (family-wise error at most alpha);
- Fisher's exact test, for two rates measured on different episodes.
"""

import math

WILSON_Z = 1.959964  # 95%, two-sided


def wilson_interval(successes, n, z=WILSON_Z):
    """95% Wilson score interval of a success rate: inside [0, 1] and sensible at 0/n and n/n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    zz = z * z
    center = (p + zz / (2 * n)) / (1 + zz / n)
    half = z / (1 + zz / n) * math.sqrt(p * (1 - p) / n + zz / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def discordant(a, b):
    """(episodes where a succeeds and b fails, the reverse) of two paired outcome lists."""
    if len(a) != len(b):
        raise ValueError(f"stats.py: paired outcomes of different lengths, {len(a)} and {len(b)}")
    return sum(1 for x, y in zip(a, b) if x and not y), sum(1 for x, y in zip(a, b) if y and not x)


def mcnemar_exact_p(b, c):
    """Two-sided exact McNemar p-value from the discordant counts b and c: twice the binomial
    tail P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), at most 1; 1 when no pair is discordant."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(p_values):
    """Holm-adjusted p-values, in the order given: the i-th smallest is multiplied by (m - i)
    (i from 0), then made non-decreasing in that order and capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def fisher_exact_p(k1, n1, k2, n2):
    """Two-sided p-value of Fisher's exact test that k1 of n1 and k2 of n2 episodes come from one
    success rate: the probability, under the hypergeometric law of the 2x2 table with its margins
    fixed, of every table no more likely than the observed one."""
    successes = k1 + k2
    total = math.comb(n1 + n2, successes)

    def probability(k):  # k of the successes in the first sample
        return math.comb(n1, k) * math.comb(n2, successes - k) / total

    observed = probability(k1)
    low = max(0, successes - n2)
    high = min(successes, n1)
    # 1 + 1e-7: tables as likely as the observed one, up to rounding, count (as in R and SciPy)
    tail = [probability(k) for k in range(low, high + 1)]
    return min(1.0, sum(q for q in tail if q <= observed * (1 + 1e-7)))
