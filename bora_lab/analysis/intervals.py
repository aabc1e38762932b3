"""Intervals and paired comparisons for method-vs-baseline results (numpy and the standard library only).

* ``t_cdf``, ``t_quantile``, ``normal_quantile``: Student-t and normal distributions, own implementation
  (regularized incomplete beta by continued fraction, inverted by safeguarded Newton steps).
* ``mean_interval``: mean and t interval of repeated measurements (e.g. one metric over seeds).
* ``paired_difference``: method A minus baseline B on per-example scores ``[seeds, examples]``, with a
  two-level bootstrap (seeds, then test examples; paired on both).
* ``paired_t``: paired t-test on per-seed metric values (the simpler seeds-only comparison).
* ``verdict``: one sentence from a comparison, e.g. ``"+3.1 points [+1.2, +5.0]: better than LoRA"``.
* ``band``: mean and pointwise t band of per-seed curves (NaN-aware, aligned by step).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

_EPS = 1e-16
_TINY = 1e-300


def _check_level(level: float, name: str = "level") -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {level}")
    return level


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 20000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta I_x(a, b); ``y`` is 1 - x, passed separately to keep its precision."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _t_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0."""
    if math.isinf(t):
        return 0.0
    t2 = t * t
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


def _t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


def _check_df(df: float) -> float:
    df = float(df)
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return df


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` > 0 degrees of freedom (``df = inf`` gives the normal CDF)."""
    df, x = _check_df(df), float(x)
    if math.isnan(x):
        return math.nan
    if math.isinf(df):
        return 0.5 * math.erfc(-x / math.sqrt(2.0))
    return _t_tail(-x, df) if x < 0 else 1.0 - _t_tail(x, df)


def normal_quantile(p: float) -> float:
    """Standard normal quantile Φ⁻¹(p) for p in (0, 1): Acklam's approximation refined by one Halley step
    (relative error near machine precision). Raises ValueError outside (0, 1)."""
    p = _check_level(p, "p")
    q = min(p, 1.0 - p)  # work in the lower tail, where Φ is computed accurately
    if q < 0.02425:
        r = math.sqrt(-2.0 * math.log(q))
        x = (((((-7.784894002430293e-03 * r - 3.223964580411365e-01) * r - 2.400758277161838e+00) * r
               - 2.549732539343734e+00) * r + 4.374664141464968e+00) * r + 2.938163982698783e+00) / \
            ((((7.784695709041462e-03 * r + 3.224671290700398e-01) * r + 2.445134137142996e+00) * r
              + 3.754408661907416e+00) * r + 1.0)
    else:
        r = q - 0.5
        s = r * r
        x = (((((-3.969683028665376e+01 * s + 2.209460984245205e+02) * s - 2.759285104469687e+02) * s
               + 1.383577518672690e+02) * s - 3.066479806614716e+01) * s + 2.506628277459239e+00) * r / \
            (((((-5.447609879822406e+01 * s + 1.615858368580409e+02) * s - 1.556989798598866e+02) * s
               + 6.680131188771972e+01) * s - 1.328068155288572e+01) * s + 1.0)
    e = 0.5 * math.erfc(-x / math.sqrt(2.0)) - q
    u = e * math.sqrt(2.0 * math.pi) * math.exp(x * x / 2.0)
    x -= u / (1.0 + x * u / 2.0)
    return -x if p > 0.5 else x


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile: the t with P(T <= t) = p, for p in (0, 1) and ``df`` > 0 (may be fractional;
    ``df = inf`` gives the normal quantile). Exact closed forms for df = 1 and 2; otherwise the tail
    probability (incomplete beta) is inverted by Newton steps on its logarithm, safeguarded by bisection,
    to about 1e-14 relative error."""
    p, df = _check_level(p, "p"), _check_df(df)
    if p == 0.5:
        return 0.0
    if math.isinf(df):
        return normal_quantile(p)
    sign, q = (1.0, 1.0 - p) if p > 0.5 else (-1.0, p)  # solve P(T > t) = q for t > 0
    if df == 1.0:
        return sign * math.tan(math.pi * (0.5 - q))
    if df == 2.0:
        return sign * (1.0 - 2.0 * q) / math.sqrt(2.0 * q * (1.0 - q))
    z = -normal_quantile(q)  # Cornish-Fisher start
    t = z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    lo, hi = 0.0, max(2.0 * t, 1.0)
    while _t_tail(hi, df) > q:
        lo, hi = hi, 2.0 * hi
    t = t if lo < t < hi else 0.5 * (lo + hi)
    log_q = math.log(q)
    for _ in range(200):
        tail = _t_tail(t, df)
        lo, hi = (t, hi) if tail > q else (lo, t)
        step = (math.log(tail) - log_q) * tail / _t_pdf(t, df) if tail > 0 else -0.5 * (t - lo)
        if abs(step) <= 1e-12 * t:  # a Newton step this small leaves an error of order step**2
            return sign * (t + step)
        t = t + step if lo < t + step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * hi:
            break
    return sign * t


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean and two-sided Student-t confidence interval of independent measurements (e.g. seeds).

    NaN (and None) values are dropped first; infinities are kept. ``std`` is the sample standard
    deviation (ddof=1) and the interval is ``mean ± t_{(1+level)/2, n-1} · std / √n``.

    Returns:
        ``{"mean", "std", "n", "low", "high", "half_width"}`` as floats (``n`` an int). With a single
        value (n = 1) there is no spread to estimate: ``std``, ``low``, ``high`` and ``half_width`` are None.

    Raises:
        ValueError: no values (or only NaN), values not 1-D, or level outside (0, 1).
    """
    level = _check_level(level)
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {x.shape}")
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        raise ValueError("mean_interval needs at least one non-NaN value, got none")
    res = {"mean": float(x.mean()), "std": None, "n": n, "low": None, "high": None, "half_width": None}
    if n > 1:
        res["std"] = std = float(x.std(ddof=1))
        res["half_width"] = half = t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
        res["low"], res["high"] = res["mean"] - half, res["mean"] + half
    return res


def _score_matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [seeds, examples] (or [examples] for one seed), got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): need at least one seed and one example")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return arr


def paired_difference(a, b, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                      metric: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Difference A − B between two methods scored on the same seeds and the same test examples.

    ``a`` and ``b`` hold per-example scores (e.g. 0/1 correctness) of shape ``[seeds, examples]``; row s
    of ``a`` and row s of ``b`` come from the same seed, column j from the same test example. A 1-D array
    is one seed. The metric of a run is the mean over its examples (accuracy for 0/1 scores) unless
    ``metric`` is given: a vectorised callable mapping an array ``[..., examples]`` to the metric over the
    last axis (``[...]``), e.g. ``lambda x: np.median(x, axis=-1)``.

    The difference is the seed-averaged ``metric(A_s) − metric(B_s)``, in the metric's units. Its
    uncertainty comes from a two-level bootstrap: each replicate draws seeds with replacement and, for
    each drawn seed, test examples with replacement; A and B always share the drawn indices (paired on
    both levels). With one seed only examples are resampled. Resampling both levels counts the example
    noise twice (once inside the seed spread), which makes the interval a little conservative when
    seeds hardly differ; but a bootstrap over very few seeds (say < 5) underestimates a real
    seed-to-seed spread, and the interval is then too narrow: cross-check with ``paired_t``.

    Returns:
        dict with ``difference``, ``low``/``high`` (equal-tailed percentile interval at ``level``), ``se``
        (standard deviation of the bootstrap replicates), ``p_value`` (two-sided bootstrap p-value:
        ``2·min(#{rep ≤ 0}+1, #{rep ≥ 0}+1)/(n_boot+1)`` capped at 1, i.e. about the smallest level at which
        the percentile interval would exclude 0; it cannot go below ``2/(n_boot+1)``), ``distinguishable``
        (the interval excludes 0), ``per_seed`` (list of per-seed differences), ``mean_a``, ``mean_b``,
        ``level``, ``n_seeds``, ``n_examples``, ``n_boot`` and ``method``.

    Raises:
        ValueError: empty input, shapes that differ, non-finite scores, n_boot < 10, a bad level,
        or a metric returning the wrong shape.
    """
    level = _check_level(level)
    a, b = _score_matrix(a, "a"), _score_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape [seeds, examples], got {a.shape} and {b.shape}")
    n_boot = int(n_boot)
    if n_boot < 10:
        raise ValueError(f"n_boot must be at least 10, got {n_boot}")
    n_seeds, n_ex = a.shape

    def run_metric(x: np.ndarray) -> np.ndarray:
        out = np.asarray(metric(x), dtype=float)
        if out.shape != x.shape[:-1]:
            raise ValueError(f"metric must reduce the last axis: got shape {out.shape} for input {x.shape}")
        return out

    if metric is None:
        d = a - b
        per_seed = d.mean(axis=1)
        mean_a, mean_b = float(a.mean()), float(b.mean())
    else:
        ma, mb = run_metric(a), run_metric(b)
        per_seed, mean_a, mean_b = ma - mb, float(ma.mean()), float(mb.mean())

    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    chunk = max(1, 2_000_000 // (n_seeds * n_ex))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        si = rng.integers(0, n_seeds, size=(m, n_seeds, 1)) if n_seeds > 1 else np.zeros((m, 1, 1), dtype=np.intp)
        ei = rng.integers(0, n_ex, size=(m, n_seeds, n_ex))
        if metric is None:
            reps[start:start + m] = d[si, ei].mean(axis=(1, 2))
        else:
            reps[start:start + m] = (run_metric(a[si, ei]) - run_metric(b[si, ei])).mean(axis=1)

    alpha = 1.0 - level
    low, high = (float(v) for v in np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0]))
    n_le, n_ge = int(np.count_nonzero(reps <= 0)), int(np.count_nonzero(reps >= 0))
    p_value = min(1.0, 2.0 * (min(n_le, n_ge) + 1) / (n_boot + 1))
    return {
        "difference": float(per_seed.mean()), "low": low, "high": high, "se": float(reps.std(ddof=1)),
        "p_value": p_value, "distinguishable": bool(low > 0 or high < 0), "per_seed": per_seed.tolist(),
        "mean_a": mean_a, "mean_b": mean_b, "level": level, "n_seeds": n_seeds, "n_examples": n_ex,
        "n_boot": n_boot, "method": "hierarchical bootstrap" if n_seeds > 1 else "example bootstrap",
    }


def paired_t(a, b, level: float = 0.95) -> dict:
    """Paired t-test of A − B on per-seed metric values (seed s of A paired with seed s of B).

    ``a`` and ``b`` are 1-D per-seed values of equal length; 2-D per-example scores ``[seeds, examples]``
    are first averaged over examples. Pairs with a NaN on either side are dropped. The statistic is
    ``t = mean(d) / (std(d, ddof=1)/√n)`` with n − 1 degrees of freedom (as ``scipy.stats.ttest_rel``);
    the p-value is two-sided. If all differences are equal (zero spread) the interval collapses to the
    difference, ``t`` is ±inf (or NaN for a zero difference) and ``p_value`` is 0 (or 1).

    Returns:
        ``{"difference", "low", "high", "se", "t", "df", "p_value", "distinguishable", "n", "level",
        "method"}``; ``distinguishable`` means the interval excludes 0.

    Raises:
        ValueError: empty input, shapes that differ, fewer than 2 complete pairs, or a bad level.
    """
    level = _check_level(level)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("paired_t needs per-seed values for both methods, got an empty input")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a.mean(axis=1), b.mean(axis=1)
    elif a.ndim != 1:
        raise ValueError(f"a and b must be 1-D per-seed values or 2-D [seeds, examples], got shape {a.shape}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    n = int(d.size)
    if n < 2:
        raise ValueError(f"paired_t needs at least 2 complete pairs (seeds), got {n}")
    mean, se, df = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n), n - 1
    if se > 0:
        t = mean / se
        p_value = min(1.0, 2.0 * _t_tail(abs(t), df))  # P(|T| >= |t|) without cancellation
    else:
        t = math.nan if mean == 0 else math.copysign(math.inf, mean)
        p_value = 1.0 if mean == 0 else 0.0
    half = t_quantile((1.0 + level) / 2.0, df) * se
    low, high = mean - half, mean + half
    return {"difference": mean, "low": low, "high": high, "se": se, "t": t, "df": df, "p_value": p_value,
            "distinguishable": bool(low > 0 or high < 0), "n": n, "level": level, "method": "paired t"}


def _signed(v: float, digits: int) -> str:
    s = f"{v:+.{digits}f}"
    if float(s) == 0.0:
        return f"{0.0:.{digits}f}"
    return s.replace("-", "\u2212")


def verdict(diff: Mapping, baseline_name: str, unit: str = "points", scale: float = 100, *,
            digits: int = 1, higher_is_better: bool = True) -> str:
    """One sentence from a comparison returned by ``paired_difference`` or ``paired_t``.

    The difference and its interval are multiplied by ``scale`` (100 turns accuracy fractions into
    percentage points) and shown with ``digits`` decimals and explicit signs, e.g.
    ``"+0.8 points [−0.6, +2.2]: not distinguishable from LoRA at this budget"``,
    ``"+3.1 points [+1.2, +5.0]: better than LoRA"`` or ``"… : worse than LoRA"``. "Better" means an
    interval entirely above 0 when ``higher_is_better`` (below 0 otherwise). Without an interval
    (``low``/``high`` None) the sentence says the comparison cannot be judged.
    """
    unit_s = f" {unit}" if unit else ""
    head = _signed(float(diff["difference"]) * scale, digits) + unit_s
    low, high = diff.get("low"), diff.get("high")
    if low is None or high is None:
        return f"{head} (no interval): cannot be judged against {baseline_name}"
    head += f" [{_signed(float(low) * scale, digits)}, {_signed(float(high) * scale, digits)}]"
    if low > 0 or high < 0:
        better = (low > 0) == higher_is_better
        return f"{head}: {'better' if better else 'worse'} than {baseline_name}"
    return f"{head}: not distinguishable from {baseline_name} at this budget"


def band(curves: Sequence, steps: Sequence | None = None, *, level: float = 0.95) -> dict:
    """Mean curve and pointwise t band (``mean_interval`` at each step) of per-seed series.

    Args:
        curves: one series per seed; each a 1-D sequence of values or a mapping ``{step: value}``.
        steps: optional, one sequence of steps per series (same length as its values). Without it a
            sequence's i-th value is at step i, so series of unequal length align at their start.
        level: confidence level of the band.

    Series are aligned on the sorted union of their steps; a step a series lacks, or a NaN value,
    counts as missing. At each step ``n`` counts the present values; the mean is over them, and
    ``low``/``high`` are the t interval with n − 1 degrees of freedom. Where n = 1 ``std``, ``low`` and
    ``high`` are NaN; where n = 0 the mean is NaN too.

    Returns:
        ``{"step", "mean", "std", "low", "high", "n"}``: numpy arrays of the union's length.

    Raises:
        ValueError: no series, ``steps`` not matching ``curves``, or a step repeated within a series.
    """
    level = _check_level(level)
    curves = list(curves)
    if not curves:
        raise ValueError("band needs at least one series, got none")
    if steps is not None and len(steps) != len(curves):
        raise ValueError(f"steps must hold one sequence per series: {len(steps)} for {len(curves)} series")
    pairs = []
    for i, c in enumerate(curves):
        if isinstance(c, Mapping):
            st, vals = np.asarray(list(c.keys())), np.asarray(list(c.values()), dtype=float)
        else:
            vals = np.asarray(c, dtype=float).reshape(-1)
            st = np.arange(vals.size) if steps is None else np.asarray(steps[i]).reshape(-1)
            if st.size != vals.size:
                raise ValueError(f"series {i} has {vals.size} values but {st.size} steps")
        if np.unique(st).size != st.size:
            raise ValueError(f"series {i} repeats a step")
        pairs.append((st, vals))
    union = np.unique(np.concatenate([st for st, _ in pairs]))
    m = np.full((len(pairs), union.size), np.nan)
    for i, (st, vals) in enumerate(pairs):
        m[i, np.searchsorted(union, st)] = vals
    present = ~np.isnan(m)
    n = present.sum(axis=0)
    filled = np.where(present, m, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, filled.sum(axis=0) / n, np.nan)
        var = np.where(present, (m - mean) ** 2, 0.0).sum(axis=0) / (n - 1)
    std = np.where(n > 1, np.sqrt(np.where(n > 1, var, 0.0)), np.nan)
    tq = np.full(union.size, np.nan)
    for k in np.unique(n[n > 1]):
        tq[n == k] = t_quantile((1.0 + level) / 2.0, int(k) - 1)
    half = tq * std / np.sqrt(np.maximum(n, 1))
    return {"step": union, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}
