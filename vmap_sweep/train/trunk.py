"""The training loop: K trunks trained at once, each read out at the budget of every cell it stands for.

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

A study that shares no trajectory runs lanes of one cell each through this same loop: a lane's one cell is its
longest, so it always shares its trunk's last step. Read-outs that end at one step are one pass of the whole
stack when they serve at least half of it, else one pass of a lane each.

A trunk that diverges decides every cell it still carries and stops. Every record is the one training that
cell alone gives: bitwise on a CPU (tests/test_trunk.py), since a model's numbers never depend on its
companions in a stack.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vmap_sweep.data.stream import budget_mask
from vmap_sweep.model.gpt import GPT
from vmap_sweep.study.plan import steps_for
from vmap_sweep.study.schedule import lr_multiplier
from vmap_sweep.train.trainer import CellRecord, StackedTrainer, Step, TrainConfig, grad_norms


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
        self.members = self._members(lanes, longest)
        self._check_multipliers()
        # a run fills in one record per cell, copied from its trunk's own record (the trunk's trajectory)
        self.records = [CellRecord(initial_loss=float("nan"), steps=m.steps) for m in self.members]
        self._history = [CellRecord(initial_loss=float("nan"), steps=0) for _ in range(self.k)]
        self._undecided = set(range(len(self.members)))
        self._active = torch.ones(self.k, dtype=torch.bool)  # trunks still training
        self._branch: dict | None = None  # the one-model scratch copy a partial step branches into
        self._lane_evals: dict[int, float | None] = {}  # each lane's eval loss at its current weights, once taken
        self._on_device: tuple | None = None  # (step, inputs, targets): the last batch moved to the device
        self.stream, self.eval_batches = None, None  # what `run` reads

    @classmethod
    def separate(cls, model: GPT, cells: Sequence[dict], cfg: TrainConfig, device: str | torch.device = "cpu",
                 base_cache: dict | None = None) -> TrunkTrainer:
        """Each cell its own lane: the cells trained at once, sharing the stacked step and nothing else."""
        return cls(model, [[c] for c in cells], cfg, device, base_cache)

    def _members(self, lanes: Sequence[Sequence[dict]], longest: list[dict]) -> list[_Member]:
        members = []
        for k, lane in enumerate(lanes):
            trunk = {n: v for n, v in longest[k].items() if n != "tokens"}
            for hp in lane:
                if {n: v for n, v in hp.items() if n != "tokens"} != trunk:
                    raise ValueError(f"lane {k}: its cells differ in more than `tokens`")
                tokens = int(hp["tokens"])
                members.append(_Member(k, len(members), tokens, steps_for(tokens, self.cfg.tokens_per_step)))
        return members

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
        """One record per cell, lane by lane in the order the lanes list them. A trainer runs once: training
        moves its weights."""
        self.stream, self.eval_batches = stream, eval_batches
        start_time = time.perf_counter()
        total_steps = self.total_steps.long()
        for step in range(int(total_steps.max())):
            self._active &= step < total_steps
            if not self._active.any():
                break
            self._take_step(step)
        elapsed = time.perf_counter() - start_time
        for rec in self.records:
            rec.wall_time = elapsed / len(self.records)  # a batch's time shared among its cells
        return self.records

    def _take_step(self, step: int) -> None:
        """Step `step` of every active trunk, and the read-outs of the cells whose last step it is: those that end
        inside it branch off before the trunk steps, those that end with it read the trunk after."""
        batch = self._batch(step)
        mult = lr_multiplier(step, self.total_steps, self.warmup_ratio, self.cfg.schedule)
        ending = [m for m in self.members if m.index in self._undecided and m.steps - 1 == step
                  and self._active[m.lane]]
        shared = [m for m in ending if self._shares_last_step(m, step)]
        self._lane_evals.clear()
        self._read_out_branches([m for m in ending if m not in shared], batch, mult)
        self._lane_evals.clear()
        unstable = self._trunk_step(batch, mult)
        # a trunk the trainer stopped (unstable) decides every cell it still carries
        left = [m for m in self.members if m.index in self._undecided and unstable[m.lane] and m not in shared]
        self._read_out_trunks(shared + left)
        self._active &= ~unstable

    def _shares_last_step(self, m: _Member, step: int) -> bool:
        """Its last step holds the trunk's tokens of that step: its budget ends where the step, or the trunk, does."""
        return m.tokens >= min(self.tokens[m.lane], (step + 1) * self.cfg.tokens_per_step)

    def _trunk_step(self, batch, mult) -> torch.Tensor:
        """One step of every active trunk; the trunks' own records grow. Returns which trunks were stopped."""
        step, inputs, targets = batch
        taken = self._step(step, inputs, targets, self._loss_weights(step, targets), mult, self._active)
        taken.record(self._history, step, self._active)
        return taken.bad & self._active & taken.has_tokens

    # -- read-outs ----------------------------------------------------------------------------------------

    def _read_out_trunks(self, members: list[_Member]) -> None:
        """Cells that end where their trunk is now: each record is its trunk's, then, if it finished, its final
        loss from the trunk's weights, and its eval loss."""
        for m in members:
            self.records[m.index].copy_from(self._history[m.lane])
        ends = {m.lane: (self._history[m.lane].steps_done - 1, m.tokens) for m in members
                if not self._history[m.lane].unstable and self._history[m.lane].steps_done > 0}
        finals = self._final_losses(ends)
        evals = self._evals({m.lane for m in members})
        for m in members:
            rec = self.records[m.index]
            if m.lane in finals:
                rec.end_with(finals[m.lane])
            rec.eval_loss = evals[m.lane]
            self._undecided.discard(m.index)

    def _read_out_branches(self, members: list[_Member], batch, mult) -> None:
        """The cells whose last step is partial, at this step: each takes that step on a copy of its lane.

        Budgets are grouped by the supervised tokens they learn from in this step (a budget holds the first
        supervised tokens of its last step, so budgets with as many of them learn from the very same tokens: one
        branch per lane serves them all). At step 0 every lane still holds the base weights, so a group's
        gradient is the same for every lane: taken once, applied to every lane, and dropped before the next
        group's is taken. Memory holds one branch, however many budgets end in the step. A budget whose part
        of the step has no supervised token takes no update: it ends where its trunk is now."""
        step, _, targets = batch
        inside = budget_mask(step, [m.tokens for m in members], *targets.shape, targets.device)
        supervised = (inside & (targets != -1)).flatten(1).sum(1).tolist()
        groups: dict[int, list[_Member]] = {}
        for m, n in zip(members, supervised, strict=True):
            groups.setdefault(n, []).append(m)
        for group in (g for n, g in groups.items() if n > 0):
            done: dict[int, CellRecord] = {}  # the record of each lane's branch on these tokens
            gradient = None
            for m in group:
                rec = self.records[m.index]
                if m.lane in done:
                    rec.copy_from(done[m.lane])
                else:
                    rec.copy_from(self._history[m.lane])
                    done[m.lane] = rec
                    gradient = self._read_out_branch(m, rec, batch, mult, gradient)
                self._undecided.discard(m.index)
        self._read_out_trunks(groups.get(0, []))

    def _read_out_branch(self, m: _Member, rec: CellRecord, batch, mult, gradient: tuple | None) -> tuple | None:
        """A cell whose last step is partial: that step taken on a copy of its lane, from the trunk's state
        before the step; the trunk is not touched. Returns the step's (loss, gradients, norm) where another lane
        can take them as `gradient` (at the base weights, where every lane's are the same), else None.

        The update and the final loss are computed whether or not the step diverged, and read back in one
        transfer: the device never waits on the host in between. A diverged step's update is dropped unread."""
        step, inputs, targets = batch
        w, rows = self._loss_weights(step, targets, [m.tokens]), self._rows(step, [m.tokens])
        branch = self._load_branch(m.lane)
        base = self._base_losses(step, inputs, targets, w)
        if gradient is None:
            gradient = self._branch_gradient(branch, batch, w, rows)
        else:  # the optimizers read gradients and never write them: every lane's update can read the same ones
            for p, g in zip(branch["params"].values(), gradient[1], strict=True):
                p.grad = g
        loss, _, norm = gradient
        bad = ~torch.isfinite(loss) | (loss > self.cfg.divergence_ratio * base) | ~torch.isfinite(norm)
        one, lane = torch.ones(1, dtype=torch.bool), slice(m.lane, m.lane + 1)
        self._optimizer_step(mult, one, lane, (branch["adamw"], branch["muon"]))
        for p in branch["params"].values():
            p.grad = None  # (a shared gradient lives on in `gradient` while other lanes need it)
        finite = self._finite([p.detach() for p in branch["params"].values()])
        final = self._forward_backward(inputs, targets, w, False, branch["stages"], rows)  # its final loss
        read = torch.cat([t.detach().double().view(1) for t in (loss, base, norm, bad, finite, final)]).cpu()
        loss_, base_, norm_, bad_, finite_, final_ = read.split(1)
        stopped = bool(bad_) or not bool(finite_)  # diverged, or its update left a weight non-finite
        taken = Step(loss_, base_, norm_, self.base_lr[lane] * mult[lane], one, torch.tensor([stopped]))
        taken.record([rec], step, one)
        if bool(bad_):  # no update: the lane's weights are the branch's
            rec.eval_loss = self._evals([m.lane])[m.lane]
        else:
            if not rec.unstable:
                rec.end_with(final_.item())
            rec.eval_loss = self._eval_one(branch["stages"])
        return gradient if self.at_base else None

    # -- passes shared by the read-outs -------------------------------------------------------------------

    def _by_lanes(self, lanes, whole: Callable[[], torch.Tensor], one: Callable[[int], float]) -> dict[int, float]:
        """A value for each of `lanes`: whole() for the stack, when they are at least half of it, else one(lane)
        for each. A model's numbers do not depend on its companions, so both give the same."""
        lanes = list(lanes)
        if lanes and 2 * len(lanes) >= self.k:
            values = whole().tolist()
            return {lane: values[lane] for lane in lanes}
        return {lane: one(lane) for lane in lanes}

    @torch.no_grad()
    def _final_losses(self, ends: dict[int, tuple[int, int]]) -> dict[int, float]:
        """Each lane's loss, at its weights now, on the batch of its last step under its cell's budget:
        ends[lane] = (step, tokens)."""
        losses = {}
        for step in sorted({s for s, _ in ends.values()}):
            budgets = {lane: tokens for lane, (s, tokens) in ends.items() if s == step}

            def whole(step=step, budgets=budgets):
                _, inputs, targets = self._batch(step)
                w = self._loss_weights(step, targets, [budgets.get(lane, 0) for lane in range(self.k)])
                return self._forward_backward(inputs, targets, w, False, rows=self._rows(step, budgets.values()))

            def one(lane, step=step, budgets=budgets):
                return self._loss_on(self._lane_stages(lane), step, budgets[lane]).item()

            losses.update(self._by_lanes(budgets, whole, one))
        return losses

    @torch.no_grad()
    def _loss_on(self, stages, step: int, tokens: int) -> torch.Tensor:
        """(1,) the loss of one model (`stages`) on the batch of `step` under a budget of `tokens`, on the device."""
        _, inputs, targets = self._batch(step)
        w = self._loss_weights(step, targets, [tokens])
        return self._forward_backward(inputs, targets, w, False, stages, self._rows(step, [tokens]))

    def _evals(self, lanes) -> dict[int, float | None]:
        """The lanes' eval losses at their weights now, each taken once however many cells end there."""
        if not self.eval_batches:
            return dict.fromkeys(lanes)
        todo = [lane for lane in lanes if lane not in self._lane_evals]
        self._lane_evals.update(self._by_lanes(todo, lambda: self.evaluate(self.eval_batches),
                                               lambda lane: self._eval_one(self._lane_stages(lane))))
        return {lane: self._lane_evals[lane] for lane in lanes}

    def _eval_one(self, stages) -> float | None:
        if not self.eval_batches:
            return None
        return self.evaluate(self.eval_batches, stages, 1)[0].item()

    def _batch(self, step: int) -> tuple:
        """(step, inputs, targets) on the device; the last one is kept, since read-outs read it again."""
        if self._on_device is None or self._on_device[0] != step:
            inputs, targets = self.stream.batch(step, self.cfg.rows_per_step, self.cfg.seq_len)
            self._on_device = (step, inputs.to(self.device), targets.to(self.device))
        return self._on_device

    def _lane_stages(self, lane: int):
        """Lane `lane` of the stack as a stack of one (views, no copy)."""
        return self._stages_of({n: p[lane:lane + 1].detach() for n, p in self.stacked.items()})

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
        branch's partial batch; on the device."""
        _, inputs, targets = batch
        loss = self._forward_backward(inputs, targets, w, True, branch["stages"], rows)
        grads = [p.grad for p in branch["params"].values()]
        return loss, grads, grad_norms(grads)
