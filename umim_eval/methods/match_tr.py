"""Drive a method whose knob is not in tokens (LLMLingua's rate, a self-information threshold) to
a target token reduction by bisection on the knob."""

from __future__ import annotations

from typing import Callable

from umim.errors import UserError


def match_tr(make: Callable[[float], object], target_tr: float, measure: Callable[[object], float],
             lo: float = 0.0, hi: float = 1.0, tol: float = 0.005, max_iter: int = 30) -> tuple[float, object, float]:
    """Find a knob value whose method reaches ``target_tr`` (monotone in the knob, either direction).

    Parameters
    ----------
    make : knob -> method (a compressor or policy instance).
    target_tr : the TR to match, in the target LM's tokens.
    measure : method -> achieved TR on the evaluation inputs (e.g. mean over prompts).
    lo, hi : knob bracket; TR(lo) and TR(hi) must lie on either side of the target.
    tol : stop when ``|TR - target_tr| <= tol``.

    Returns
    -------
    ``(knob, method, achieved_tr)`` of the closest evaluated knob (the TR of a token-dropping
    method moves in steps, so the target may not be hit within ``tol``: check the returned TR).
    """
    tr_lo, tr_hi = measure(m_lo := make(lo)), measure(m_hi := make(hi))
    best = min([(abs(tr_lo - target_tr), lo, m_lo, tr_lo), (abs(tr_hi - target_tr), hi, m_hi, tr_hi)],
               key=lambda r: r[0])
    if not min(tr_lo, tr_hi) - tol <= target_tr <= max(tr_lo, tr_hi) + tol:
        raise UserError(f"target TR {target_tr} is outside [{tr_lo:.4f}, {tr_hi:.4f}] "
                        f"reached on the knob bracket [{lo}, {hi}]")
    increasing = tr_hi >= tr_lo
    for _ in range(max_iter):
        if best[0] <= tol:
            break
        mid = (lo + hi) / 2
        tr = measure(m := make(mid))
        best = min(best, (abs(tr - target_tr), mid, m, tr), key=lambda r: r[0])
        if (tr < target_tr) == increasing:
            lo = mid
        else:
            hi = mid
    return best[1], best[2], best[3]
