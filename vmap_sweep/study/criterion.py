"""The criterion that classes a fine-tune: its labels, the criteria a study may follow, their options, and the
scoring the store applies to each trained cell (DESIGN.md, "Definitions the science depends on").

Classes are always recomputed from stored per-step losses (never by re-training), so a study can be classed again
under another criterion at no cost. This module sits below the store: the store labels each record as it commits.

Labels: "converged", "not_converged" (shown as "not converged") and, for the threshold criterion, "marginal".
"Not converged" is a class; it is not the trainer's `unstable` flag (a run stopped for a non-finite or runaway
loss), which forces it.

Three criteria:

* ``"ratio"`` (Sohl-Dickstein): ``v = losses / initial_loss``; non-finite values become 1e6 and everything is
  clipped at 1e6; converged iff the mean of the last ``min(20, len)`` values of ``v`` is < 1. Score: ``-sum(v)`` if
  converged, else ``sum(1 / v)``. Guard (changes no real cross-entropy value): ``v`` is floored at 1e-12 so that
  ``1 / v`` is finite and a converged score is strictly negative even for a zero loss.
* ``"threshold"`` (seed plan): not converged if any loss is non-finite or the final loss is > ``not_converged_above``;
  converged if the final loss is < ``converged_below``; marginal between. Score (for colour):
  ``log(final / converged_below) / log(not_converged_above / converged_below)`` clipped to [-1, 2], and 2 for a
  non-finite trajectory or an unstable cell. So the score is < 0 exactly when converged, in [0, 1] when marginal
  and > 1 when not converged.
* ``"last20"`` (the plan author's fine-tuning, fractal-llm ``src/finetune.py``): trainable iff the run stayed
  finite and the mean of its last ``min(20, n)`` training losses is below its first, over the ``n`` losses taken
  before each update (the stored trajectory without its final after-the-last-update value; ``steps_done`` says how
  many). Score: mean / first - 1 (< 0 iff trainable), ``RATIO_CAP`` for a run that did not stay finite. A one-step
  cell has one such loss, the first: it is never trainable by this rule.

A cell flagged ``unstable`` is labelled not converged whatever its losses. A cell stopped before its first step has
an empty trajectory and ``unstable=True``; its score is the criterion's worst value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from vmap_sweep.errors import ConfigError
from vmap_sweep.study.config import renamed

CONVERGED = "converged"
NOT_CONVERGED = "not_converged"
MARGINAL = "marginal"
LABELS = (CONVERGED, NOT_CONVERGED, MARGINAL)
DISPLAY = {CONVERGED: "converged", NOT_CONVERGED: "not converged", MARGINAL: "marginal"}
# Studies written before "not converged" was named apart from the trainer's unstable flag stored it as "diverged",
# and the threshold criterion's upper threshold as "diverged_above".
LEGACY_LABELS = {"diverged": NOT_CONVERGED}
OLDER_OPTIONS = {"diverged_above": "not_converged_above"}

# Each criterion's name and the options it takes.
OPTIONS: dict[str, tuple[str, ...]] = {"ratio": (), "threshold": ("converged_below", "not_converged_above"),
                                       "last20": ()}
NAMES = tuple(OPTIONS)
KEY = "criterion"  # the study's extra holding its criterion
DEFAULT = {"criterion": "ratio"}  # the criterion every study starts with
NOT_CONVERGED_ABOVE = 10.0  # the threshold criterion's default: a final loss above it is not converged

RATIO_CAP = 1e6  # Sohl-Dickstein's replacement for non-finite ratios and upper clip
RATIO_FLOOR = 1e-12  # keeps 1/v finite; a cross-entropy ratio is never this small in practice
RATIO_WINDOW = 20  # converged iff mean of the last min(20, len) ratios < 1
THRESHOLD_SCORE_MIN = -1.0
THRESHOLD_SCORE_MAX = 2.0
_LABEL_DTYPE = "<U13"


def _unknown(name: Any, spelling: dict[str, str] | None = None) -> ConfigError:
    return ConfigError(f"{(spelling or {}).get('criterion', 'criterion=')}{name!r:.40}: unknown; use one of "
                       f"{', '.join(NAMES)}")


def _check_thresholds(converged_below: Any, not_converged_above: Any, spelling: dict[str, str]) -> tuple[float, float]:
    def named(name: str, v: Any) -> str:
        return f"{spelling.get(name, name + '=')}{v!r:.40}"

    for name, v in (("converged_below", converged_below), ("not_converged_above", not_converged_above)):
        if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
            raise ConfigError(f"{named(name, v)}: must be a loss (a number)")
    c, d = float(converged_below), float(not_converged_above)
    if not (np.isfinite(c) and c > 0):
        raise ConfigError(f"{named('converged_below', converged_below)}: must be a finite positive loss")
    if not (np.isfinite(d) and d > c):
        raise ConfigError(f"{named('not_converged_above', not_converged_above)}: must be finite and above "
                          f"{named('converged_below', c)}")
    return c, d


def check_name(criterion: Any, spelling: dict[str, str] | None = None) -> None:
    """A ConfigError unless `criterion` names a criterion (before its options are judged)."""
    if not isinstance(criterion, str) or criterion not in OPTIONS:
        raise _unknown(criterion, spelling)


def check(criterion: str, spelling: dict[str, str] | None = None, **options: Any) -> dict:
    """{"criterion": name, **options} with its defaults filled in, checked before anything is classified.
    An option given as None takes its default; a criterion without options ignores those given. spelling: how
    the caller names each option in a message, e.g. {"converged_below": "--converged-below "} (default:
    "converged_below=")."""
    check_name(criterion, spelling)
    if criterion != "threshold":
        return {"criterion": criterion}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - set(OPTIONS[criterion])
    if unknown or "converged_below" not in given:
        raise ConfigError("criterion='threshold' needs converged_below=<loss> (and optionally "
                          "not_converged_above=<loss>)"
                          + (f"; unknown options {sorted(unknown)}" if unknown else ""))
    c, d = _check_thresholds(given["converged_below"], given.get("not_converged_above", NOT_CONVERGED_ABOVE),
                             spelling or {})
    return {"criterion": "threshold", "converged_below": c, "not_converged_above": d}


def as_options(value: dict) -> str:
    """A stored criterion as `classify` takes it, e.g. "--criterion threshold --converged-below 2.5 ..."."""
    value = newer_form(value)
    return " ".join([f"--criterion {value['criterion']}"]
                    + [f"--{k.replace('_', '-')} {value[k]!r}" for k in OPTIONS[value["criterion"]] if k in value])


def newer_form(value: dict) -> dict:
    """A stored criterion under today's option names (a copy)."""
    return renamed(value, OLDER_OPTIONS)


def is_stored_form(value: Any) -> bool:
    """Whether `value` is a criterion as a study stores it (what `check` returns, or an older subset of it)."""
    if not isinstance(value, dict):
        return False
    name = value.get("criterion")
    return (isinstance(name, str) and name in OPTIONS and set(value) - {"criterion"} <= set(OPTIONS[name])
            and all(isinstance(v, int | float) and not isinstance(v, bool)
                    for k, v in value.items() if k != "criterion"))


def stored_label(text: Any) -> Any:
    """A label as read from a study, in today's vocabulary (an older study's "diverged" is "not_converged")."""
    return LEGACY_LABELS.get(text, text)


def _check_initial_loss(initial_loss: float) -> float:
    value = float(initial_loss)
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(
            f"initial_loss={initial_loss!r}: must be a finite positive loss (the loss before any update); "
            "check the stored record of the base model"
        )
    return value


def _pad(trajectories: Sequence[ArrayLike], flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ragged trajectories -> (n, T) float matrix padded with NaN, plus the true lengths."""
    rows = []
    for t, f in zip(trajectories, flags, strict=True):
        arr = np.asarray(t, dtype=np.float64).reshape(-1)
        if arr.size == 0 and not f:
            raise ConfigError(
                "empty loss trajectory: a cell with no steps must be passed with unstable=True "
                "(it was stopped before its first step); otherwise it has not been trained yet"
            )
        rows.append(arr)
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    width = int(lengths.max()) if lengths.size else 0
    mat = np.full((len(rows), max(width, 1)), np.nan)
    for i, r in enumerate(rows):
        mat[i, : r.size] = r
    return mat, lengths


def classify(
    trajectories: Sequence[ArrayLike] | np.ndarray,
    initial_losses: ArrayLike,
    criterion: str | dict = "ratio",
    unstable: ArrayLike | None = None,
    references: Sequence[ArrayLike] | None = None,
    steps_done: ArrayLike | None = None,
    **options: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Class many trajectories at once -> (labels: str array (n,), scores: float array (n,)); score < 0 iff
    converged.

    ``criterion``: a name with its ``options`` (``converged_below``, ``not_converged_above`` for "threshold"), or a
    stored criterion dict. ``trajectories``: 1-D loss arrays (lengths may differ: a run stopped as unstable is
    shorter) or an (n, steps) array. ``initial_losses``: one per trajectory or a scalar shared by all.
    ``unstable``: the trainer's flags, forcing "not converged". ``references`` (ratio only): per-step reference
    losses, one array per trajectory of its length, replacing the scalar initial loss (v = losses / reference):
    with minibatches that differ from step to step, the base model's loss on the same batch is the fair "before
    any update" for that step. ``steps_done`` (last20, required): each trajectory's losses taken before an update.
    """
    if isinstance(criterion, dict):
        options = {**{k: v for k, v in criterion.items() if k != "criterion"}, **options}
        criterion = criterion.get("criterion")
    if criterion in OPTIONS and criterion != "threshold" and options:
        raise ConfigError(f"criterion={criterion!r} takes no options, got {sorted(options)}")
    checked = check(criterion, **options)  # type: ignore[arg-type]
    name = checked["criterion"]
    n = len(trajectories)
    init = np.asarray(initial_losses, dtype=np.float64).reshape(-1)
    if init.size == 1 and n != 1:
        init = np.full(n, init[0])
    if init.size != n:
        raise ConfigError(f"initial_losses: {init.size} values for {n} trajectories; pass one per trajectory")
    init = np.array([_check_initial_loss(x) for x in init], dtype=np.float64)
    flags = np.zeros(n, dtype=bool) if unstable is None else np.asarray(unstable, dtype=bool).reshape(-1)
    if flags.size != n:
        raise ConfigError(f"unstable: {flags.size} flags for {n} trajectories; pass one per trajectory")
    if n == 0:
        return np.array([], dtype=_LABEL_DTYPE), np.array([], dtype=np.float64)

    mat, lengths = _pad(trajectories, flags)
    cols = np.arange(mat.shape[1])[None, :]
    valid = cols < lengths[:, None]
    if name == "ratio":
        ref = init[:, None]
        if references is not None:
            if len(references) != n:
                raise ConfigError(f"references: {len(references)} arrays for {n} trajectories; pass one per trajectory")
            ref = np.ones_like(mat)
            for r, (t, a) in enumerate(zip(trajectories, references, strict=True)):
                a = np.asarray(a, dtype=np.float64).reshape(-1)
                if a.size != np.asarray(t).size:
                    raise ConfigError(f"references[{r}]: {a.size} values for a trajectory of {np.asarray(t).size}")
                ref[r, : a.size] = a
        return _ratio(mat, lengths, valid, cols, ref, flags)
    if name == "last20":
        if steps_done is None:
            raise ConfigError("criterion='last20' needs steps_done: each trajectory's losses before an update")
        done = np.asarray(steps_done, dtype=np.int64).reshape(-1)
        if done.size != n:
            raise ConfigError(f"steps_done: {done.size} values for {n} trajectories; pass one per trajectory")
        return _last20(mat, np.minimum(done, lengths), cols, flags)
    return _threshold(mat, lengths, valid, flags, checked["converged_below"], checked["not_converged_above"])


def label(criterion: dict, record: Any) -> tuple[str, float]:
    """The labeller the store applies: one trained record's (label, score) by the study's criterion, as
    `classify` recomputes it from the stored row."""
    name = criterion.get("criterion")
    initial = record.initial_loss
    if name != "ratio" and (initial is None or not np.isfinite(initial)):
        initial = 1.0  # only the ratio criterion reads the initial loss
    steps_done = record.steps_done if record.steps_done is not None else len(record.losses)
    labels, scores = classify([record.losses], [initial], criterion, unstable=[bool(record.unstable)],
                              references=[record.base_losses] if name == "ratio" and record.base_losses is not None
                              else None, steps_done=[steps_done] if name == "last20" else None)
    return str(labels[0]), float(scores[0])


def _ratio(mat: np.ndarray, lengths: np.ndarray, valid: np.ndarray, cols: np.ndarray, ref: np.ndarray,
           flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        v = mat / ref
    v = np.where(np.isfinite(v), v, RATIO_CAP)
    v = np.clip(v, RATIO_FLOOR, RATIO_CAP)
    v = np.where(valid, v, 0.0)
    window = np.minimum(RATIO_WINDOW, lengths)
    in_tail = valid & (cols >= (lengths - window)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        tail_mean = (v * in_tail).sum(axis=1) / window
    converged = (lengths > 0) & (tail_mean < 1.0) & ~flags
    inv = np.where(valid, 1.0 / np.where(valid, v, 1.0), 0.0)
    scores = np.where(converged, -v.sum(axis=1), inv.sum(axis=1))
    labels = np.where(converged, CONVERGED, NOT_CONVERGED).astype(_LABEL_DTYPE)
    return labels, scores.astype(np.float64)


def _last20(mat: np.ndarray, lengths: np.ndarray, cols: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = cols < lengths[:, None]
    stable = ~flags & (lengths > 0) & ~(valid & ~np.isfinite(mat)).any(axis=1)
    first = mat[:, 0]
    window = np.maximum(np.minimum(RATIO_WINDOW, lengths), 1)
    in_tail = valid & (cols >= (lengths - window)[:, None])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        tail_mean = np.where(in_tail, mat, 0.0).sum(axis=1) / window
        ratio = tail_mean / first
    ok = stable & np.isfinite(ratio) & (first > 0)
    trainable = ok & (ratio < 1.0)
    scores = np.where(ok, np.clip(ratio - 1.0, -1.0, RATIO_CAP), RATIO_CAP)
    labels = np.where(trainable, CONVERGED, NOT_CONVERGED).astype(_LABEL_DTYPE)
    return labels, scores.astype(np.float64)


def _threshold(mat: np.ndarray, lengths: np.ndarray, valid: np.ndarray, flags: np.ndarray, c: float,
               d: float) -> tuple[np.ndarray, np.ndarray]:
    nonfinite = (valid & ~np.isfinite(mat)).any(axis=1)
    final = mat[np.arange(mat.shape[0]), np.maximum(lengths - 1, 0)]
    bad = flags | nonfinite | (lengths == 0)
    safe_final = np.where(bad, c, final)
    not_converged = bad | (safe_final > d)
    converged = ~not_converged & (safe_final < c)
    with np.errstate(divide="ignore"):
        raw = np.log(np.maximum(safe_final, 0.0) / c) / np.log(d / c)
    scores = np.clip(raw, THRESHOLD_SCORE_MIN, THRESHOLD_SCORE_MAX)
    scores = np.where(bad, THRESHOLD_SCORE_MAX, scores)
    labels = np.where(converged, CONVERGED, np.where(not_converged, NOT_CONVERGED, MARGINAL)).astype(_LABEL_DTYPE)
    return labels, scores.astype(np.float64)
