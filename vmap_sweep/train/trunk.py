"""Shared trajectories: K trunks trained at once, each read out at the budget of every cell it stands for.

A dataset of N tokens is the first N tokens of one fixed order, so two cells that differ only in their budget,
under learning-rate multipliers that agree step for step (study/plan.py, `trunks`), take the very same steps
until the shorter one ends: the cell (lr, N1) is a prefix of the cell (lr, N2). A trunk trains the longest cell
of its lane; every other cell of the lane is read out of it:

- a cell whose last step covers as many tokens as the trunk's step (its budget ends where the step ends, or it
  is the longest) shares that step: its record is the trunk's, then its final loss and eval loss are computed
  from the trunk's weights after that step;
- a cell whose last step is partial (its budget ends inside the step) branches from the trunk's state before
  that step: its gradient on the first N tokens, the optimizer's update applied to a one-model copy of the
  lane (weights and optimizer state), its final loss and eval loss on that copy. The trunk is not touched.
  At step 0 every lane still holds the base weights, so such a gradient is computed once per budget and
  applied to every learning rate before the next budget's is taken (memory holds one such gradient, however
  many budgets end inside step 0); and budgets of one step whose extra tokens are all unsupervised learn from
  the same tokens, so one branch serves them all. A partial step computes only the rows its budget reaches.

A trunk that diverges decides every cell it still carries and stops. Every record is the one training that
cell alone gives: bitwise on a CPU (tests/test_trunk.py), since a model's numbers never depend on its
companions in a stack.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vmap_sweep.data.stream import budget_mask
from vmap_sweep.model.gpt import GPT
from vmap_sweep.study.plan import steps_for
from vmap_sweep.study.schedule import lr_multiplier
from vmap_sweep.train.stack import group_of
from vmap_sweep.train.trainer import CellRecord, StackedTrainer, Step, TrainConfig, _grad_norms


@dataclass
class _Member:
    lane: int
    index: int  # position in the flat list of records
    tokens: int
    steps: int


class TrunkTrainer(StackedTrainer):
    """One stacked model per lane (the lane's longest cell), read out at each of its cells' budgets."""

    def __init__(self, model: GPT, lanes: Sequence[Sequence[dict]], cfg: TrainConfig,
                 device: str | torch.device = "cpu", base_cache: dict | None = None):
        """lanes[k]: the hyperparameters of the cells of lane k, which differ only in `tokens`."""
        longest = [max(lane, key=lambda hp: int(hp["tokens"])) for lane in lanes]
        super().__init__(model, longest, cfg, device, base_cache)
        self.members: list[_Member] = []
        for k, lane in enumerate(lanes):
            for hp in lane:
                tokens = int(hp["tokens"])
                if {n: v for n, v in hp.items() if n != "tokens"} != {n: v for n, v in longest[k].items()
                                                                       if n != "tokens"}:
                    raise ValueError(f"lane {k}: its cells differ in more than `tokens`")
                self.members.append(_Member(k, len(self.members), tokens, steps_for(tokens, self.cfg.tokens_per_step)))
        self._check_multipliers()
        self._branch: dict | None = None  # the one-model scratch copy a partial step branches into

    def _check_multipliers(self) -> None:
        """A cell is read out of its trunk only where its own schedule gives the trunk's multipliers."""
        lanes = [m.lane for m in self.members]
        own = torch.tensor([float(m.steps) for m in self.members], dtype=torch.float64)
        steps = own.long()
        for s in range(int(steps.max())):
            mine = lr_multiplier(s, own, self.warmup_ratio[lanes], self.cfg.schedule)
            trunk = lr_multiplier(s, self.total_steps[lanes], self.warmup_ratio[lanes], self.cfg.schedule)
            differ = (mine != trunk) & (s < steps)
            if differ.any():
                m = self.members[int(differ.nonzero()[0])]
                raise ValueError(f"a cell of {m.tokens} tokens does not share its trunk's learning rates at step "
                                 f"{s}; plan it as its own lane")

    # -- a whole run ------------------------------------------------------------------------------------

    def run(self, stream, eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[CellRecord]:
        """One record per cell, lane by lane in the order the lanes list them."""
        cfg, k = self.cfg, self.k
        start_time = time.perf_counter()
        self._eval_batches = eval_batches
        self._stream = stream
        records = [CellRecord(initial_loss=float("nan"), steps=m.steps) for m in self.members]
        self._history: list[CellRecord] = [CellRecord(initial_loss=float("nan"), steps=0) for _ in range(k)]
        undecided = set(range(len(self.members)))
        total_steps = self.total_steps.long()
        active = torch.ones(k, dtype=torch.bool)
        self._lane_evals: dict[int, float | None] = {}  # each lane's eval loss at the current step, once taken
        for step in range(int(total_steps.max())):
            active &= step < total_steps
            if not active.any():
                break
            self._lane_evals.clear()
            host_inputs, host_targets = stream.batch(step, cfg.batch_size, cfg.seq_len)
            inputs, targets = host_inputs.to(self.device), host_targets.to(self.device)
            batch = (step, inputs, targets)
            weights = self._loss_weights(step, targets)
            mult = lr_multiplier(step, self.total_steps, self.warmup_ratio, cfg.schedule)
            ending = [m for m in self.members if m.index in undecided and m.steps - 1 == step and active[m.lane]]
            shared_end = [m for m in ending if self._shares_last_step(m, step)]
            branching = [m for m in ending if m not in shared_end]
            self._read_out_branches(branching, records, batch, host_targets, mult)
            undecided.difference_update(m.index for m in branching)
            self._lane_evals.clear()
            diverged, has_tokens = self._trunk_step(batch, weights, mult, active)
            for m in shared_end:
                self._read_out_shared(m, records[m.index], batch, has_tokens[m.lane], bool(diverged[m.lane]))
                undecided.discard(m.index)
            for lane in torch.nonzero(diverged).flatten().tolist():
                frozen_eval = self._lane_eval(lane)
                for m in self.members:
                    if m.lane == lane and m.index in undecided:
                        self._copy_history(m.lane, records[m.index])
                        records[m.index].eval_loss = frozen_eval
                        undecided.discard(m.index)
            active &= ~diverged
        elapsed = time.perf_counter() - start_time
        for rec in records:
            rec.wall_time = elapsed / len(records)  # a batch's time shared among its cells
        return records

    def _shares_last_step(self, m: _Member, step: int) -> bool:
        """Its last step holds the trunk's tokens of that step: its budget ends where the step, or the trunk, does."""
        return m.tokens >= min(self.tokens[m.lane], (step + 1) * self.cfg.tokens_per_step)

    def _trunk_step(self, batch, weights, mult, active) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of every active trunk, as StackedTrainer.run takes it; the trunks' histories grow. Returns
        which trunks diverged, and which had tokens to learn from."""
        step, inputs, targets = batch
        taken = self._step(step, inputs, targets, weights, mult, active)
        taken.record(self._history, step, active)
        return taken.bad & active & taken.has_tokens, taken.has_tokens

    # -- read-outs ----------------------------------------------------------------------------------------

    def _copy_history(self, lane: int, rec: CellRecord) -> None:
        h = self._history[lane]
        rec.losses, rec.base_losses = list(h.losses), list(h.base_losses)
        rec.grad_norms, rec.lrs = list(h.grad_norms), list(h.lrs)
        rec.steps_done, rec.initial_loss = h.steps_done, h.initial_loss
        rec.unstable, rec.diverged_step = h.unstable, h.diverged_step

    def _read_out_shared(self, m: _Member, rec: CellRecord, batch, has_tokens: bool, diverged: bool) -> None:
        """A cell whose last step is the trunk's: its record is the trunk's history, then its final loss and
        eval loss from the trunk's weights as they are now."""
        self._copy_history(m.lane, rec)
        if not diverged and rec.steps_done > 0:
            step, inputs, targets = batch if has_tokens else self._batch(rec.steps_done - 1)
            stages = self._lane_stages(m.lane)
            w = self._loss_weights(step, targets, [m.tokens])
            with torch.no_grad():
                loss = self._forward_backward(inputs, targets, w, False, stages, self._rows(step, [m.tokens])).cpu()
            rec.losses.append(loss[0].item())
            rec.base_losses.append(rec.base_losses[-1])
        rec.eval_loss = self._lane_eval(m.lane)

    def _read_out_branches(self, members: list[_Member], records: list[CellRecord], batch, host_targets, mult):
        """The cells whose last step is partial, at this step: each takes that step on a copy of its lane.

        Budgets are grouped by the supervised tokens they learn from in this step (a budget holds the first
        supervised tokens of its last step, so budgets with as many of them learn from the very same tokens: one
        branch per lane serves them all). At step 0 every lane still holds the base weights, so a group's
        gradient is the same for every lane: taken once, applied to every lane, and dropped before the next
        group's is taken. Memory holds one branch, however many budgets end in the step."""
        step = batch[0]
        supervised = host_targets != -1
        groups: dict[int, list[_Member]] = {}
        for m in members:
            inside = budget_mask(step, m.tokens, self.cfg.batch_size, self.cfg.seq_len)
            groups.setdefault(int((inside & supervised).sum()), []).append(m)
        for supervised, group in groups.items():
            done: dict[int, CellRecord] = {}  # the record of each lane's branch on these tokens
            gradient = None
            for m in group:
                rec = records[m.index]
                self._copy_history(m.lane, rec)
                if supervised == 0:  # no supervised token in its last step: it ends where the trunk is now
                    self._read_out_unstepped(m, rec)
                elif m.lane in done:
                    _copy_record(done[m.lane], rec)
                else:
                    done[m.lane] = rec
                    gradient = self._read_out_branch(m, rec, batch, mult, gradient)

    def _read_out_branch(self, m: _Member, rec: CellRecord, batch, mult, gradient: tuple | None) -> tuple | None:
        """A cell whose last step is partial: that step taken on a copy of its lane, from the trunk's state
        before the step; the trunk is not touched. Returns the step's (loss, gradients, norm) where another lane
        can take them as `gradient` (at the base weights, where every lane's are the same), else None."""
        step, inputs, targets = batch
        cfg = self.cfg
        w = self._loss_weights(step, targets, [m.tokens])
        rows = self._rows(step, [m.tokens])
        branch = self._load_branch(m.lane)
        base = self._base_losses(step, inputs, targets, w).cpu()
        if gradient is None:
            gradient = self._branch_gradient(branch, batch, w, rows)
        else:  # the optimizers read gradients and never write them: every lane's update can read the same ones
            for p, g in zip(branch["params"].values(), gradient[1], strict=True):
                p.grad = g
        loss, _, norm = gradient
        bad = bool(~torch.isfinite(loss) | (loss > cfg.divergence_ratio * base) | ~torch.isfinite(norm))
        if not bad:
            self._branch_update(branch, m.lane, mult)
        for p in branch["params"].values():
            p.grad = None  # (a shared gradient lives on in `gradient` while other lanes need it)
        bad_weights = not bad and not bool(self._finite([p.detach() for p in branch["params"].values()])[0])
        lane = slice(m.lane, m.lane + 1)
        taken = Step(loss, base, norm, self.base_lr[lane] * mult[lane], torch.ones(1, dtype=torch.bool),
                     torch.tensor([bad or bad_weights]))
        taken.record([rec], step, torch.ones(1, dtype=torch.bool))
        if rec.unstable:
            rec.eval_loss = self._lane_eval(m.lane) if bad else self._eval(branch["stages"], 1)
        else:
            with torch.no_grad():
                final = self._forward_backward(inputs, targets, w, False, branch["stages"], rows).cpu()
            rec.losses.append(final[0].item())
            rec.base_losses.append(rec.base_losses[-1])
            rec.eval_loss = self._eval(branch["stages"], 1)
        return gradient if self.at_base else None

    def _read_out_unstepped(self, m: _Member, rec: CellRecord) -> None:
        """Its last step held no token to learn from: the weights are the trunk's now, its final loss is on the
        batch of its last recorded step."""
        if rec.steps_done > 0 and not rec.unstable:
            step, inputs, targets = self._batch(rec.steps_done - 1)
            w = self._loss_weights(step, targets, [m.tokens])
            with torch.no_grad():
                loss = self._forward_backward(inputs, targets, w, False, self._lane_stages(m.lane),
                                              self._rows(step, [m.tokens])).cpu()
            rec.losses.append(loss[0].item())
            rec.base_losses.append(rec.base_losses[-1])
        rec.eval_loss = self._lane_eval(m.lane)

    # -- the branch: a one-model copy of a lane --------------------------------------------------------------

    def _load_branch(self, lane: int) -> dict:
        """The scratch lane, holding lane `lane`'s weights and optimizer state (allocated once)."""
        if self._branch is None:
            params = {n: torch.empty_like(p[:1]).requires_grad_(True) for n, p in self.stacked.items()}
            adamw, muon = self._optimizers(params)
            self._branch = {"params": params, "adamw": adamw, "muon": muon, "stages": self._stages_of(params)}
        b = self._branch
        with torch.no_grad():
            for n, p in b["params"].items():
                p.copy_(self.stacked[n][lane:lane + 1])
                p.grad = None
            if self.adamw is not None:
                for n in b["adamw"].params:
                    b["adamw"].exp_avg[n].copy_(self.adamw.exp_avg[n][lane:lane + 1])
                    b["adamw"].exp_avg_sq[n].copy_(self.adamw.exp_avg_sq[n][lane:lane + 1])
                b["adamw"].steps = self.adamw.steps[lane:lane + 1].clone()
            if self.muon is not None:
                for n in b["muon"].params:
                    b["muon"].buf[n].copy_(self.muon.buf[n][lane:lane + 1])
        return b

    def _branch_gradient(self, branch: dict, batch, w, rows: int) -> tuple:
        """(1,) loss, the gradient (in the branch's .grad) and (1,) its norm, on the first `rows` rows of the
        branch's partial batch."""
        _, inputs, targets = batch
        params = branch["params"]
        loss = self._forward_backward(inputs, targets, w, True, branch["stages"], rows).cpu()
        grads = [p.grad for p in params.values()]
        return loss, grads, _grad_norms(grads).cpu()

    def _branch_update(self, branch: dict, lane: int, mult: torch.Tensor) -> None:
        """The optimizer's update of the branch, with its lane's learning rates at this step."""
        one = torch.ones(1, dtype=torch.bool)
        group_lrs = {g: lr[lane:lane + 1] * mult[lane:lane + 1] for g, lr in self.group_lr.items()}
        lrs = {n: group_lrs[group_of(n)] for n in branch["params"]}
        if branch["adamw"] is not None:
            branch["adamw"].step(lrs, self.weight_decay[lane:lane + 1], one)
        if branch["muon"] is not None:
            branch["muon"].step(lrs, one)

    # -- shared helpers ---------------------------------------------------------------------------------------

    def _batch(self, step: int):
        inputs, targets = (t.to(self.device) for t in self._stream.batch(step, self.cfg.batch_size, self.cfg.seq_len))
        return step, inputs, targets

    def _lane_stages(self, lane: int):
        """Lane `lane` of the stack as a stack of one (views, no copy)."""
        return self._stages_of({n: p[lane:lane + 1].detach() for n, p in self.stacked.items()})

    def _lane_eval(self, lane: int) -> float | None:
        """The lane's eval loss as its weights are now, taken once however many cells end there."""
        if lane not in self._lane_evals:
            self._lane_evals[lane] = self._eval(self._lane_stages(lane), 1)
        return self._lane_evals[lane]

    def _eval(self, stages, k: int) -> float | None:
        if not self._eval_batches:
            return None
        return self.evaluate(self._eval_batches, stages, k)[0].item()


def _copy_record(src: CellRecord, dst: CellRecord) -> None:
    """dst becomes what src holds (a cell that learnt from the same tokens); each keeps its own lists."""
    dst.losses, dst.base_losses = list(src.losses), list(src.base_losses)
    dst.grad_norms, dst.lrs = list(src.grad_norms), list(src.lrs)
    dst.steps_done, dst.initial_loss, dst.eval_loss = src.steps_done, src.initial_loss, src.eval_loss
    dst.unstable, dst.diverged_step = src.unstable, src.diverged_step
