"""Classify stored fine-tune trajectories as converged / diverged / marginal.

Classes are always recomputed from the stored per-step losses (never by re-training), so a
study can be re-classified under another criterion at no cost.

Two criteria (DESIGN.md, "Definitions the science depends on"):

* ``"ratio"`` (Sohl-Dickstein): ``v = losses / initial_loss``; non-finite values become 1e6 and
  everything is clipped at 1e6; converged iff the mean of the last ``min(20, len)`` values of
  ``v`` is < 1. Score: ``-sum(v)`` if converged, else ``sum(1 / v)``. Labels: converged/diverged.
  Guard (changes no real cross-entropy value): ``v`` is floored at 1e-12 so that ``1 / v`` is
  finite and a converged score is strictly negative even for a zero loss.
* ``"threshold"`` (seed plan): diverged if any loss is non-finite or the final loss is
  > ``diverged_above``; converged if the final loss is < ``converged_below``; marginal between.
  Score (for colour): ``log(final / converged_below) / log(diverged_above / converged_below)``
  clipped to [-1, 2], and 2 for a non-finite trajectory or a forced divergence. So the score is
  < 0 exactly when converged, in [0, 1] when marginal and > 1 when diverged.

* ``"last20"`` (the plan author's fine-tuning, fractal-llm ``src/finetune.py``): trainable iff the run stayed
  finite and the mean of its last ``min(20, n)`` training losses is below its first, over the ``n`` losses taken
  before each update (the stored trajectory without its final after-the-last-update value; ``steps_done`` says
  how many). Losses of different minibatches are compared, with no reference. Score: mean / first - 1 (< 0 iff
  trainable), ``RATIO_CAP`` for a run that did not stay finite. Labels: converged (trainable)/diverged (not).
  A one-step cell has one such loss, the first: it is never trainable by this rule.

Every function takes an optional ``diverged`` flag (the trainer's own divergence verdict); it
forces the label "diverged". A cell that diverged before its first step has an empty trajectory
and ``diverged=True``; its score is the most-diverged value of the criterion (0 for "ratio", 2 for
"threshold").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from vmap_sweep.errors import ConfigError

CONVERGED = "converged"
DIVERGED = "diverged"
MARGINAL = "marginal"
LABELS = (CONVERGED, DIVERGED, MARGINAL)
CRITERIA = ("ratio", "threshold", "last20")

RATIO_CAP = 1e6  # Sohl-Dickstein's replacement for non-finite ratios and upper clip
RATIO_FLOOR = 1e-12  # keeps 1/v finite; a cross-entropy ratio is never this small in practice
RATIO_WINDOW = 20  # converged iff mean of the last min(20, len) ratios < 1
THRESHOLD_SCORE_MIN = -1.0
THRESHOLD_SCORE_MAX = 2.0


def _check_initial_loss(initial_loss: float) -> float:
    value = float(initial_loss)
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(
            f"initial_loss={initial_loss!r}: must be a finite positive loss (the loss before any update); "
            "check the stored record of the base model"
        )
    return value


def _check_thresholds(converged_below: float, diverged_above: float) -> tuple[float, float]:
    for name, v in (("converged_below", converged_below), ("diverged_above", diverged_above)):
        if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
            raise ConfigError(f"{name}={v!r:.40}: must be a loss (a number)")
    c, d = float(converged_below), float(diverged_above)
    if not (np.isfinite(c) and c > 0):
        raise ConfigError(f"converged_below={converged_below!r}: must be a finite positive loss")
    if not (np.isfinite(d) and d > c):
        raise ConfigError(f"diverged_above={diverged_above!r}: must be finite and above converged_below={c}")
    return c, d


def _as_trajectory(losses: ArrayLike, diverged: bool) -> np.ndarray:
    arr = np.asarray(losses, dtype=np.float64).reshape(-1)
    if arr.size == 0 and not diverged:
        raise ConfigError(
            "empty loss trajectory: a cell with no steps must be passed with diverged=True "
            "(it diverged before its first step); otherwise it has not been trained yet"
        )
    return arr


def classify_ratio(
    losses: ArrayLike, initial_loss: float, diverged: bool = False, reference: ArrayLike | None = None
) -> tuple[str, float]:
    """Sohl-Dickstein's criterion on one trajectory -> (label, score); score < 0 iff converged.

    ``reference``: optional per-step reference losses (the base model's loss on each step's batch) used
    instead of the scalar initial loss, v = losses / reference.
    """
    refs = None if reference is None else [reference]
    labels, scores = classify_grid([losses], [initial_loss], criterion="ratio", diverged=[diverged], references=refs)
    return str(labels[0]), float(scores[0])


def classify_threshold(
    losses: ArrayLike,
    initial_loss: float,
    converged_below: float,
    diverged_above: float = 10.0,
    diverged: bool = False,
) -> tuple[str, float]:
    """Absolute-threshold criterion on one trajectory -> (label, score); score < 0 iff converged.

    ``initial_loss`` is validated but not used by the rule (the thresholds are absolute); it is
    accepted so both criteria share one call signature.
    """
    labels, scores = classify_grid(
        [losses],
        [initial_loss],
        criterion="threshold",
        diverged=[diverged],
        converged_below=converged_below,
        diverged_above=diverged_above,
    )
    return str(labels[0]), float(scores[0])


def _pad(trajectories: Sequence[ArrayLike], flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ragged trajectories -> (n, T) float matrix padded with NaN, plus the true lengths."""
    rows = [_as_trajectory(t, bool(f)) for t, f in zip(trajectories, flags, strict=True)]
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    width = int(lengths.max()) if lengths.size else 0
    mat = np.full((len(rows), max(width, 1)), np.nan)
    for i, r in enumerate(rows):
        mat[i, : r.size] = r
    return mat, lengths


def classify_grid(
    trajectories: Sequence[ArrayLike] | np.ndarray,
    initial_losses: ArrayLike,
    criterion: str = "ratio",
    diverged: ArrayLike | None = None,
    references: Sequence[ArrayLike] | None = None,
    steps_done: ArrayLike | None = None,
    **kw: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Classify many trajectories at once -> (labels: str array (n,), scores: float array (n,)).

    ``trajectories`` is a list of 1-D loss arrays (lengths may differ: a run stopped at divergence
    is shorter) or an (n, steps) array. ``initial_losses`` is one value per trajectory or a scalar
    shared by all. ``diverged`` optionally flags cells the trainer saw diverge. ``kw`` go to the
    criterion: ``converged_below`` (required) and ``diverged_above`` for "threshold".
    ``references`` (ratio only): per-step reference losses, one array per trajectory of the same length,
    replacing the scalar initial loss: v = losses / reference. With minibatches that differ from step to
    step, the base model's loss on the same batch is the fair "before any update" for that step.
    ``steps_done`` (last20 only, required): each trajectory's count of losses taken before an update.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion={criterion!r}: unknown; use one of {', '.join(CRITERIA)}")
    n = len(trajectories)
    init = np.asarray(initial_losses, dtype=np.float64).reshape(-1)
    if init.size == 1 and n != 1:
        init = np.full(n, init[0])
    if init.size != n:
        raise ConfigError(f"initial_losses: {init.size} values for {n} trajectories; pass one per trajectory")
    init = np.array([_check_initial_loss(x) for x in init], dtype=np.float64)
    flags = np.zeros(n, dtype=bool) if diverged is None else np.asarray(diverged, dtype=bool).reshape(-1)
    if flags.size != n:
        raise ConfigError(f"diverged: {flags.size} flags for {n} trajectories; pass one per trajectory")
    if n == 0:
        return np.array([], dtype="<U9"), np.array([], dtype=np.float64)

    mat, lengths = _pad(trajectories, flags)
    cols = np.arange(mat.shape[1])[None, :]
    valid = cols < lengths[:, None]
    if criterion == "ratio":
        if kw:
            raise ConfigError(f"criterion='ratio' takes no options, got {sorted(kw)}")
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
    if criterion == "last20":
        if kw:
            raise ConfigError(f"criterion='last20' takes no options, got {sorted(kw)}")
        if steps_done is None:
            raise ConfigError("criterion='last20' needs steps_done: each trajectory's losses before an update")
        done = np.asarray(steps_done, dtype=np.int64).reshape(-1)
        if done.size != n:
            raise ConfigError(f"steps_done: {done.size} values for {n} trajectories; pass one per trajectory")
        return _last20(mat, np.minimum(done, lengths), cols, flags)
    unknown = set(kw) - {"converged_below", "diverged_above"}
    if unknown or "converged_below" not in kw:
        raise ConfigError(
            "criterion='threshold' needs converged_below=<loss> (and optionally diverged_above=<loss>)"
            + (f"; unknown options {sorted(unknown)}" if unknown else "")
        )
    c, d = _check_thresholds(kw["converged_below"], kw.get("diverged_above", 10.0))
    return _threshold(mat, lengths, valid, flags, c, d)


def _ratio(
    mat: np.ndarray,
    lengths: np.ndarray,
    valid: np.ndarray,
    cols: np.ndarray,
    ref: np.ndarray,
    flags: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
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
    labels = np.where(converged, CONVERGED, DIVERGED).astype("<U9")
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
    labels = np.where(trainable, CONVERGED, DIVERGED).astype("<U9")
    return labels, scores.astype(np.float64)


def _threshold(
    mat: np.ndarray,
    lengths: np.ndarray,
    valid: np.ndarray,
    flags: np.ndarray,
    c: float,
    d: float,
) -> tuple[np.ndarray, np.ndarray]:
    nonfinite = (valid & ~np.isfinite(mat)).any(axis=1)
    final = mat[np.arange(mat.shape[0]), np.maximum(lengths - 1, 0)]
    bad = flags | nonfinite | (lengths == 0)
    safe_final = np.where(bad, c, final)
    diverged = bad | (safe_final > d)
    converged = ~diverged & (safe_final < c)
    with np.errstate(divide="ignore"):
        raw = np.log(np.maximum(safe_final, 0.0) / c) / np.log(d / c)
    scores = np.clip(raw, THRESHOLD_SCORE_MIN, THRESHOLD_SCORE_MAX)
    scores = np.where(bad, THRESHOLD_SCORE_MAX, scores)
    labels = np.where(converged, CONVERGED, np.where(diverged, DIVERGED, MARGINAL)).astype("<U9")
    return labels, scores.astype(np.float64)


def converged_mask(labels: ArrayLike) -> np.ndarray:
    """Boolean array, True where the label is "converged" (marginal counts as not converged)."""
    arr = np.asarray(labels)
    if arr.size and not np.isin(arr, LABELS).all():
        bad = sorted({str(x) for x in arr.reshape(-1) if str(x) not in LABELS})[:3]
        raise ConfigError(f"labels: unknown values {bad}; expected {', '.join(LABELS)}")
    return arr == CONVERGED


def study_classes(store) -> np.ndarray:
    """Boolean (ny, nx) grid of a stored study, True = converged; every cell must be done and classified."""
    labels = store.labels_array()
    missing = int((labels == "").sum())
    if missing:
        raise ConfigError(f"{store.directory}: {missing} cells are pending or unclassified; finish the run "
                          f"(same command resumes it) or run `vmap-sweep classify {store.directory}`")
    return converged_mask(labels)


MAPS = ("trainability", "stability")  # what a boundary separates: converged from not, stable from unstable


def stability_mask(store) -> np.ndarray:
    """Boolean (ny, nx) grid of a stored study, True = stable: the trainer never stopped it for a non-finite or
    runaway loss (> divergence_ratio x the base model's), gradient or weights. A stable cell may still be
    untrained (at a low LR its loss never drops below the reference): that is the trainability map's business."""
    diverged = store.grid_arrays("diverged")
    missing = int(np.isnan(diverged).sum())
    if missing:
        raise ConfigError(f"{store.directory}: {missing} cells are pending; finish the run (same command resumes it)")
    return diverged == 0


def map_mask(store, kind: str) -> np.ndarray:
    """The study's boolean grid for one map: trainability (converged) or stability (never stopped as unstable)."""
    if kind not in MAPS:
        raise ConfigError(f"--map {kind!r}: choose {' or '.join(MAPS)}")
    return study_classes(store) if kind == "trainability" else stability_mask(store)


def checked_criterion(criterion: str, **options: float | None) -> dict:
    """{"criterion": name, **options} with its defaults filled in, checked before anything is classified."""
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion={criterion!r}: unknown; use one of {', '.join(CRITERIA)}")
    if criterion in ("ratio", "last20"):
        return {"criterion": criterion}
    if options.get("converged_below") is None:
        raise ConfigError("criterion='threshold' needs converged_below=<loss> (and optionally diverged_above=<loss>)")
    above = options.get("diverged_above")
    c, d = _check_thresholds(options["converged_below"], 10.0 if above is None else above)
    return {"criterion": "threshold", "converged_below": c, "diverged_above": d}


def classify_record(losses: ArrayLike, initial_loss: float, diverged: bool, reference: ArrayLike | None,
                    criterion: dict, steps_done: int | None = None) -> tuple[str, float]:
    """One trained cell's (label, score) by a study's criterion, as `classify` would recompute it."""
    options = {k: v for k, v in criterion.items() if k != "criterion"}
    if criterion["criterion"] == "ratio":
        return classify_ratio(losses, initial_loss, diverged=diverged, reference=reference)
    if criterion["criterion"] == "last20":
        labels, scores = classify_grid([losses], [1.0], criterion="last20", diverged=[diverged],
                                       steps_done=[len(losses) if steps_done is None else steps_done])
        return str(labels[0]), float(scores[0])
    init = initial_loss if np.isfinite(initial_loss) else 1.0
    labels, scores = classify_grid([losses], [init], criterion=criterion["criterion"], diverged=[diverged], **options)
    return str(labels[0]), float(scores[0])


def label_record(criterion: dict, record) -> tuple[str, float]:
    """The labeller a run stores classes with: a trained record's (label, score) by the study's criterion."""
    return classify_record(record.losses, record.initial_loss, record.diverged, record.base_losses, criterion,
                           record.steps_done)


def classify_rows(rows: list[dict], criterion: str = "ratio", **kw) -> dict[tuple[int, int], tuple[str, float]]:
    """(label, score) of every done cell of `rows` (StudyStore.rows(arrays=True))."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return {}
    labels, scores = classify_grid(
        [r["trajectory"] for r in done],
        [r["initial_loss"] if np.isfinite(r["initial_loss"]) else 1.0 for r in done],
        criterion=criterion,
        diverged=[bool(r["diverged"]) for r in done],
        references=[r["base_losses"] for r in done] if criterion == "ratio" else None,
        steps_done=[int(r["steps_done"]) for r in done] if criterion == "last20" else None,
        **kw,
    )
    return {(r["i"], r["j"]): (str(lab), float(s)) for r, lab, s in zip(done, labels, scores, strict=True)}
