"""The invariants the science rests on: stacked = separate, isolation, packing invariance, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    RandomStream,
    budget_weights,
    newton_schulz_single,
    reference_adamw,
    reference_nanochat,
    tiny_model,
    train_batch,
)
from torch.nn.attention import SDPBackend

from vmap_sweep.study.schedule import lr_multiplier
from vmap_sweep.train.optim import newton_schulz
from vmap_sweep.train.stack import GROUPS
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig, ce_chunk_rows, group_lrs
from vmap_sweep.train.trunk import TrunkTrainer

B, T = 2, 16
# A tight divergence cap (2x the base loss), so that the large-LR cells below pass it.
CFG = TrainConfig(optimizer="adamw", schedule="linear", rows_per_step=B, seq_len=T, divergence_ratio=2.0)


def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a whole tensor: Adam divides by sqrt(v), so single elements with a tiny v turn a
    last-bit difference in the gradient (vmap's batched matmul vs a plain one) into a larger one."""
    return float((a - b).norm() / b.norm())


def rel_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool(((a - b).abs() / b.abs().clamp(min=1e-6)).max() <= tol)


def test_stacked_adamw_equals_separate_runs():
    base, stream = tiny_model(), RandomStream()
    # LRs over four decades, the last diverges; budgets differ so step counts and a partial last step differ.
    cells = [
        {"lr": 1e-4, "tokens": 200},
        {"lr": 1e-3, "tokens": 96, "weight_decay": 0.1},
        {"lr": 1e-2, "tokens": 160},
        {"lr": 30.0, "tokens": 200},
    ]
    trainer = TrunkTrainer.separate(base, cells, CFG)
    records = trainer.run(stream)
    assert records[3].unstable and not any(r.unstable for r in records[:3])
    for i, cell in enumerate(cells):
        ratio = CFG.divergence_ratio
        ref_losses, ref_model, ref_diverged = reference_adamw(base, stream, cell, B, T, divergence_ratio=ratio)
        assert records[i].unstable == ref_diverged
        got = torch.tensor(records[i].losses)
        want = torch.tensor(ref_losses)
        assert got.shape == want.shape, (i, got, want)
        if not ref_diverged:
            assert rel_close(got, want, 1e-6), (i, got, want)
            state = trainer.state_dict_of(i)
            for name, p in ref_model.named_parameters():
                assert norm_rel(state[name], p.detach()) <= 1e-6, (i, name)
        else:
            # the diverging model agrees up to its last finite step, then is frozen
            assert rel_close(got[:-1], want[:-1], 1e-6)
            assert records[i].steps_done < records[i].steps


def test_stacked_nanochat_optimizer_equals_separate_runs():
    base, stream = tiny_model(), RandomStream(seed=3)
    # Newton-Schulz in float32 here: in bf16 any float32 rounding difference between two implementations
    # is amplified to bf16 precision. That the stack equals a loop bitwise in bf16 is tested below.
    cfg = TrainConfig(optimizer="nanochat", schedule="linear", rows_per_step=B, seq_len=T, muon_ns_dtype="float32")
    cells = [{"lr": 1e-4, "tokens": 160}, {"lr": 1e-3, "tokens": 160}, {"lr": 1e-2, "tokens": 96}]
    trainer = TrunkTrainer.separate(base, cells, cfg)
    records = trainer.run(stream)
    for i, cell in enumerate(cells):
        ref_losses, ref_model = reference_nanochat(base, stream, cell, B, T, ns_dtype=torch.float32)
        assert len(records[i].losses) == len(ref_losses) + 1  # plus the loss after the last update
        got = torch.tensor(records[i].losses[: len(ref_losses)])
        assert rel_close(got, torch.tensor(ref_losses), 1e-6), (i, got, ref_losses)
        state = trainer.state_dict_of(i)
        for name, p in ref_model.named_parameters():
            assert norm_rel(state[name], p.detach()) <= 1e-6, (i, name)


def test_stacked_newton_schulz_equals_a_loop_bitwise_in_bf16():
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 64, 32), (3, 32, 128)]:
        g = torch.randn(shape, generator=gen)
        loop = torch.stack([newton_schulz_single(m) for m in g])
        assert torch.equal(newton_schulz(g), loop)


def test_divergence_is_isolated_bitwise():
    base, stream = tiny_model(), RandomStream()
    good = [{"lr": 1e-3, "tokens": 200}, {"lr": 3e-3, "tokens": 128}]
    capped = {"lr": 1e4, "tokens": 200}  # its loss passes the cap
    non_finite = {"lr": 1e39, "tokens": 200}  # inf in float32: NaN weights and losses after one step
    with_bad = TrunkTrainer.separate(base, [good[0], capped, non_finite, good[1]], CFG)
    records_with = with_bad.run(stream)
    without = TrunkTrainer.separate(base, good, CFG)
    records_without = without.run(stream)
    for bad in records_with[1:3]:
        assert bad.unstable and bad.unstable_step is not None and bad.unstable_step < bad.steps
    for a, b, ia, ib in [(records_with[0], records_without[0], 0, 0), (records_with[3], records_without[1], 3, 1)]:
        assert a.losses == b.losses and a.grad_norms == b.grad_norms and a.lrs == b.lrs
        sa, sb = with_bad.state_dict_of(ia), without.state_dict_of(ib)
        assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_non_finite_weights_freeze_the_model():
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 200}, {"lr": 1e39, "tokens": 200}]  # inf in float32
    trainer = TrunkTrainer.separate(base, cells, TrainConfig(rows_per_step=B, seq_len=T, divergence_ratio=1e9))
    records = trainer.run(stream)
    assert records[1].unstable and records[1].unstable_step == 0
    assert not records[0].unstable and records[0].steps_done == records[0].steps
    # frozen: its weights stay those of its one update, bit for bit (NaNs included), while its companion trains
    one_step = TrunkTrainer.separate(base, [{"lr": 1e39, "tokens": B * T}], TrainConfig(rows_per_step=B, seq_len=T,
                                                                                 divergence_ratio=1e9))
    one_step.run(stream)
    frozen, after_one = trainer.state_dict_of(1), one_step.state_dict_of(0)
    assert any(not t.isfinite().all() for t in frozen.values())
    assert all(torch.equal(frozen[n].view(torch.int32), after_one[n].view(torch.int32)) for n in frozen)


# companions with the cell's step 0 (shared), and one whose budget ends inside step 0 (the whole stack runs it)
@pytest.mark.parametrize("companions", [[{"lr": 1e-2, "tokens": 64}], [{"lr": 1e-5, "tokens": 300}] * 4,
                                        [{"lr": 1e-2, "tokens": 20}]])
def test_packing_invariance_bitwise(companions):
    base, stream = tiny_model(), RandomStream()
    cell = {"lr": 2e-3, "tokens": 160, "warmup_ratio": 0.2}
    evals = [stream.batch(1000 + i, B, T) for i in range(2)]
    alone = train_batch(base, stream, [cell], CFG, evals)[0]
    packed = train_batch(base, stream, [*companions, cell], CFG, evals)[-1]
    assert packed.losses == alone.losses
    assert packed.grad_norms == alone.grad_norms
    assert packed.eval_loss == alone.eval_loss


def test_packing_invariance_bitwise_over_several_loss_chunks():
    """640 rows per model: the loss runs in chunks of 512 rows and 128, which must not depend on the companions."""
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(optimizer="adamw", schedule="linear", rows_per_step=40, seq_len=T, divergence_ratio=2.0)
    assert cfg.ce_chunk is None and ce_chunk_rows(base.config.n_embd) < 40 * T
    cell = {"lr": 2e-3, "tokens": 1600}
    evals = [stream.batch(100, 40, T)]
    alone = train_batch(base, stream, [cell], cfg, evals)[0]
    packed = train_batch(base, stream, [{"lr": 1e-2, "tokens": 1600}, {"lr": 1e-4, "tokens": 900}, cell], cfg,
                         evals)[-1]
    assert len(alone.losses) > 2
    assert packed.losses == alone.losses and packed.grad_norms == alone.grad_norms
    assert packed.eval_loss == alone.eval_loss


def test_micro_batches_accumulate_to_the_full_batch():
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 256}, {"lr": 1e-2, "tokens": 256}]
    full = train_batch(base, stream, cells, TrainConfig(rows_per_step=4, seq_len=T))
    micro = train_batch(base, stream, cells, TrainConfig(rows_per_step=4, seq_len=T, micro_batch_size=1))
    for a, b in zip(full, micro, strict=True):
        assert rel_close(torch.tensor(a.losses), torch.tensor(b.losses), 1e-5)


def test_records_and_budgets():
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 40}, {"lr": 1e-3, "tokens": 64}, {"lr": 1e-3, "tokens": 80}]
    records = train_batch(base, stream, cells, CFG, [stream.batch(500, B, T)])
    assert [r.steps for r in records] == [2, 2, 3]  # ceil(N / 32 tokens per step)
    for r in records:
        assert r.steps_done == r.steps
        assert len(r.losses) == r.steps + 1 and len(r.grad_norms) == r.steps == len(r.lrs)
        assert r.initial_loss == r.losses[0] and math.isfinite(r.eval_loss)
        assert r.lrs[0] == pytest.approx(1e-3) and r.lrs[-1] < r.lrs[0]  # linear decay
    # base_losses: the untouched base model on exactly the tokens of each recorded loss
    for r, cell in zip(records, cells, strict=True):
        assert len(r.base_losses) == len(r.losses)
        for step in range(r.steps):
            x, y = stream.batch(step, B, T)
            want = base(x, y, budget_weights(step, cell["tokens"], y)).item()
            assert r.base_losses[step] == pytest.approx(want, rel=1e-6)
        assert r.base_losses[0] == pytest.approx(r.losses[0], rel=1e-6)
    # the first two cells see the same first step; the 40-token cell's second step has only 8 tokens
    assert records[0].losses[0] == records[1].losses[0] and records[0].losses[1] != records[1].losses[1]


def test_frozen_groups_are_shared_not_stacked_and_do_not_move():
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(rows_per_step=B, seq_len=T, trainable=("attn", "mlp", "unembedding"))
    trainer = TrunkTrainer.separate(base, [{"lr": 1e-2, "tokens": 96}] * 3, cfg)
    assert "transformer.wte.weight" in trainer.frozen and "transformer.wte.weight" not in trainer.stacked
    assert trainer.frozen["transformer.wte.weight"].ndim == 2
    trainer.run(stream)
    assert torch.equal(trainer.state_dict_of(1)["transformer.wte.weight"], base.transformer.wte.weight)
    assert not torch.equal(trainer.state_dict_of(1)["lm_head.weight"], base.lm_head.weight)


def test_rerun_is_identical():
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 128}, {"lr": 5e-3, "tokens": 96}]
    a = train_batch(base, stream, cells, CFG)
    b = train_batch(base, stream, cells, CFG)
    assert [r.losses for r in a] == [r.losses for r in b]


def test_group_learning_rates_follow_overrides():
    lrs = group_lrs({"lr": 1e-3, "matrix_lr": 2e-3, "mlp_lr": 3e-3}, "adamw", 768)
    assert lrs == {"embedding": 1e-3, "unembedding": 1e-3, "attn": 2e-3, "mlp": 3e-3}
    nano = group_lrs({"lr": 0.02}, "nanochat", 768)
    assert nano["attn"] == 0.02 and nano["embedding"] == pytest.approx(0.2)
    assert nano["unembedding"] == pytest.approx(0.004)


def test_schedules():
    total, warm = torch.tensor([10.0, 4.0]), torch.tensor([0.2, 0.0])
    assert lr_multiplier(0, total, warm, "linear").tolist() == [0.5, 1.0]
    assert lr_multiplier(2, total, warm, "linear").tolist() == [1.0, 0.5]
    assert lr_multiplier(3, total, warm, "constant").tolist() == [1.0, 1.0]
    assert lr_multiplier(2, total, warm, "cosine")[0].item() == pytest.approx(1.0)
    assert lr_multiplier(6, total, warm, "cosine")[0].item() == pytest.approx(0.5)


def test_bf16_optimizer_state_stays_close_to_float32():
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 160}, {"lr": 1e-2, "tokens": 160}]
    exact = train_batch(base, stream, cells, CFG)
    half = train_batch(base, stream, cells, TrainConfig(**{**CFG.__dict__, "optimizer_state_dtype": "bfloat16"}))
    for a, b in zip(exact, half, strict=True):
        assert a.losses != b.losses  # really a different state precision
        assert rel_close(torch.tensor(b.losses), torch.tensor(a.losses), 2e-2)


def test_active_slices_cover_exactly_the_active_models():
    from vmap_sweep.train import optim

    active = torch.tensor([True, True, False, True, True, True])
    assert optim.active_slices(active, 10) == [slice(0, 2), slice(3, 6)]
    old = optim.MAX_SLICE_ELEMENTS
    try:
        optim.MAX_SLICE_ELEMENTS = 20  # two models per slice at most
        assert optim.active_slices(active, 10) == [slice(0, 2), slice(3, 5), slice(5, 6)]
    finally:
        optim.MAX_SLICE_ELEMENTS = old
    assert optim.active_slices(torch.tensor([False, False]), 10) == []


@pytest.mark.parametrize("trainable", [GROUPS, ("attn", "mlp"), ("unembedding",)])
def test_activation_checkpointing_gives_the_same_trajectory_bitwise(trainable):
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 160}, {"lr": 1e-2, "tokens": 96}, {"lr": 30.0, "tokens": 160}]
    plain = TrainConfig(rows_per_step=B, seq_len=T, trainable=trainable, divergence_ratio=2.0)
    want = train_batch(base, stream, cells, plain)
    for blocks in (None, 1):  # every block recomputed, or only the first
        ckpt = TrainConfig(**{**plain.__dict__, "checkpoint_activations": True, "checkpoint_blocks": blocks})
        for a, b in zip(want, train_batch(base, stream, cells, ckpt), strict=True):
            assert a.losses == b.losses and a.grad_norms == b.grad_norms and a.unstable == b.unstable


@pytest.mark.parametrize(("blocks", "recomputed"), [(None, 2), (1, 1), (0, 0), (5, 2)])
def test_checkpoint_blocks_says_how_many_blocks_recompute(monkeypatch, blocks, recomputed):
    from vmap_sweep.train import trainer as trainer_module

    calls = []
    real = trainer_module.checkpoint
    monkeypatch.setattr(trainer_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = TrainConfig(rows_per_step=B, seq_len=T, checkpoint_activations=True, checkpoint_blocks=blocks)
    trainer = StackedTrainer(tiny_model(), [{"lr": 1e-3, "tokens": 32}] * 2, cfg)
    x, y = RandomStream().batch(0, B, T)
    trainer._forward_backward(x, y, trainer._loss_weights(0, y), with_grad=True)
    assert len(calls) == recomputed  # of the tiny model's 2 blocks
    for bad in ({"checkpoint_activations": True, "checkpoint_blocks": -1}, {"checkpoint_blocks": 4}):
        with pytest.raises(ValueError, match="checkpoint_blocks"):
            TrainConfig(**bad)


def test_loss_chunk_follows_the_model_width_unless_set():
    assert [ce_chunk_rows(c) for c in (32, 256, 768, 1280, 2048)] == [512, 512, 1024, 2048, 4096]
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 96}]
    assert StackedTrainer(base, cells, CFG).ce_chunk == 512
    chunked = TrainConfig(**{**CFG.__dict__, "ce_chunk": 8})  # 4 chunks of the 32-row batch
    trainer = TrunkTrainer.separate(base, cells, chunked)
    assert trainer.ce_chunk == 8
    a, b = trainer.run(stream)[0], train_batch(base, stream, cells, CFG)[0]
    assert a.losses != b.losses  # the chunking really changed: it sets the order of the sums
    assert rel_close(torch.tensor(a.losses), torch.tensor(b.losses), 1e-6)
    with pytest.raises(ValueError, match="ce_chunk"):
        TrainConfig(ce_chunk=0)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_step_follows_the_eager_trajectory(checkpointed):
    """torch.compile'd stages (full-logit loss) and fused optimizer updates: the same training, to rounding."""
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 160}, {"lr": 1e-2, "tokens": 96, "weight_decay": 0.1}, {"lr": 30.0, "tokens": 160}]
    eager = TrainConfig(rows_per_step=B, seq_len=T, divergence_ratio=2.0, checkpoint_activations=checkpointed)
    compiled = TrainConfig(**{**eager.__dict__, "compile": True})
    for a, b in zip(train_batch(base, stream, cells, eager), train_batch(base, stream, cells, compiled), strict=True):
        assert a.unstable == b.unstable and a.steps_done == b.steps_done
        assert rel_close(torch.tensor(b.losses), torch.tensor(a.losses), 1e-5), (a.losses, b.losses)


@pytest.mark.parametrize("compiled", [False, True])
def test_block_weights_receive_gradients_in_their_own_layout(compiled):
    """Under vmap a linear weight's gradient comes out of the batched matmul transposed; the blocks hand it over
    contiguous, so that autograd does not copy it into .grad with a strided copy (slow on a GPU)."""
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(**{**CFG.__dict__, "compile": compiled})
    trainer = StackedTrainer(base, [{"lr": 1e-3, "tokens": 64}] * 3, cfg)
    arriving = {}
    for name, p in trainer.stacked.items():
        if ".h." in name:  # the blocks' weights; a hook on a leaf sees the gradient before it is accumulated
            p.register_hook(lambda g, name=name: arriving.__setitem__(name, g.is_contiguous()))
    x, y = stream.batch(0, B, T)
    trainer._forward_backward(x, y, trainer._loss_weights(0, y), with_grad=True)
    assert len(arriving) == sum(".h." in n for n in trainer.stacked) >= 6 and all(arriving.values()), arriving


def test_attention_runs_once_per_block_for_the_whole_stack(monkeypatch):
    """Outside vmap, on every model's heads at once (the models folded into the batch), with any SDPA kernel."""
    from vmap_sweep.train import trainer as trainer_module

    calls = []
    real = trainer_module.causal_attention
    monkeypatch.setattr(trainer_module, "causal_attention", lambda q, k, v: calls.append(q.shape) or real(q, k, v))
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 64}, {"lr": 1e-2, "tokens": 64}, {"lr": 1e-4, "tokens": 32}]
    trainer = StackedTrainer(base, cells, CFG)
    x, y = stream.batch(0, B, T)
    trainer._forward_backward(x, y, trainer._loss_weights(0, y), with_grad=True)
    cfg = base.config
    assert calls == [(3 * B, cfg.n_head, T, cfg.head_dim)] * cfg.n_layer
    assert SDPBackend.CUDNN_ATTENTION in trainer_module.SDPA_BACKENDS


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_compiled_step_keeps_packing_and_isolation_bitwise(micro_batch_size):
    """Compiled, a cell's numbers still do not depend on its companions, diverging ones included."""
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(**{**CFG.__dict__, "compile": True, "micro_batch_size": micro_batch_size})
    cell = {"lr": 2e-3, "tokens": 160, "warmup_ratio": 0.2}
    # (a budget ending inside step 0 too: companions' budgets decide how step 0 runs)
    companions = [{"lr": 1e4, "tokens": 200}, {"lr": 1e39, "tokens": 20}, {"lr": 1e-3, "tokens": 96},
                  {"lr": 1e-2, "tokens": 24}]
    evals = [stream.batch(1000 + i, B, T) for i in range(2)]
    alone_trainer = TrunkTrainer.separate(base, [cell], cfg)
    alone = alone_trainer.run(stream, evals)[0]
    packed_trainer = TrunkTrainer.separate(base, [*companions, cell], cfg)
    packed = packed_trainer.run(stream, evals)
    assert packed[0].unstable and packed[1].unstable and not packed[4].unstable
    assert packed[4].losses == alone.losses and packed[4].grad_norms == alone.grad_norms
    assert packed[4].eval_loss == alone.eval_loss
    sa, sb = alone_trainer.state_dict_of(0), packed_trainer.state_dict_of(4)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_fused_adamw_update_equals_the_eager_one(state):
    from vmap_sweep.train.optim import AdamWHparams, StackedAdamW

    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(3, *shape, generator=gen) for n, shape in [("a", (64, 32)), ("b", (48,))]}
    hp = AdamWHparams((0.9, 0.95), 1e-8, getattr(torch, state))
    runs = {}
    for compiled in (False, True):
        ps = {n: p.clone() for n, p in params.items()}
        opt = StackedAdamW(ps, hp, compile=compiled)
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            for p in ps.values():
                p.grad = torch.randn(p.shape, generator=g)
            active = torch.tensor([True, step != 1, True])  # a model that sits a step out keeps its state
            if step == 1:
                before = {n: (p[1].clone(), opt.exp_avg[n][1].clone()) for n, p in ps.items()}
                for p in ps.values():
                    p.grad[1] = float("nan")  # ... even when its gradients are NaN
            opt.step({n: torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64) for n in ps},
                     torch.tensor([0.0, 0.1, 0.0], dtype=torch.float64), active)
            if step == 1:
                assert all(torch.equal(p[1], before[n][0]) and torch.equal(opt.exp_avg[n][1], before[n][1])
                           for n, p in ps.items())
        runs[compiled] = (ps, opt)
    (eager, e_opt), (fused, f_opt) = runs[False], runs[True]
    assert torch.equal(e_opt.steps, f_opt.steps)
    tol = 1e-6 if state == "float32" else 1e-2  # bf16 moments: the fused pass rounds once, eager at each op
    for n in params:
        assert norm_rel(fused[n], eager[n]) < tol
        assert norm_rel(f_opt.exp_avg[n].float(), e_opt.exp_avg[n].float()) < tol
        assert not torch.equal(fused[n], params[n])


def test_base_model_reference_is_computed_once_per_step_across_trainers(monkeypatch):
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 160}, {"lr": 1e-2, "tokens": 96}]
    alone = TrunkTrainer.separate(base, cells, CFG).run(stream)
    calls = []
    real = type(base).token_losses
    monkeypatch.setattr(type(base), "token_losses", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    cache: dict = {}
    first = TrunkTrainer.separate(base, cells, CFG, base_cache=cache).run(stream)
    computed = len(calls)
    second = TrunkTrainer.separate(base, cells[::-1], CFG, base_cache=cache).run(stream)
    assert computed == 5 and len(calls) == computed  # 160 tokens = 5 steps of 32; the second batch reuses them
    for a, b in zip(alone, first, strict=True):
        assert a.base_losses == b.base_losses and a.losses == b.losses
    assert [r.base_losses for r in second] == [r.base_losses for r in first[::-1]]


def test_first_step_runs_one_model_per_distinct_budget_and_equals_the_whole_stack():
    """Every model starts from the base weights on the same tokens: step 0 runs a stack of one per distinct
    loss-weights row (here two: a 20-token budget ends inside the 32-token step) and gives each model the
    losses and gradients the whole stack's pass would."""
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": 1e-3, "tokens": 200}, {"lr": 1e-2, "tokens": 20}, {"lr": 3e-3, "tokens": 200},
             {"lr": 1e-4, "tokens": 20}]
    trainer = TrunkTrainer.separate(base, cells, CFG)
    x, y = stream.batch(0, B, T)
    w = trainer._loss_weights(0, y)
    whole = trainer._forward_backward(x, y, w, with_grad=True)
    whole_grads = {n: p.grad.clone() for n, p in trainer.stacked.items()}
    seen = []

    def record_stack_sizes(trainer):
        stage = trainer._block_stage
        trainer._block_stage = lambda halves, s, f, h, *rest: seen.append(h.shape[0]) or stage(halves, s, f, h,
                                                                                                  *rest)

    record_stack_sizes(trainer)
    shared = trainer._first_forward_backward(x, y, w)
    n_layer = base.config.n_layer
    assert seen == [1] * (2 * n_layer)
    assert torch.allclose(shared, whole, rtol=1e-6, atol=0) and shared[0] != shared[1]
    assert shared[0] == shared[2] and shared[1] == shared[3]
    for n, p in trainer.stacked.items():
        assert torch.allclose(p.grad, whole_grads[n], rtol=1e-5, atol=1e-7), n
        assert torch.equal(p.grad[0], p.grad[2]) and not torch.equal(p.grad[0], p.grad[1])
    # in a run, only step 0 is shared; later steps (and the final losses) run the whole stack
    seen.clear()
    trainer.run(stream)
    assert seen[: 2 * n_layer] == [1] * (2 * n_layer) and set(seen[2 * n_layer:]) == {4}
    # more distinct budgets than half the stack: one pass of the whole stack is cheaper than one per budget
    trainer = StackedTrainer(base, cells[:2], CFG)
    seen.clear()
    record_stack_sizes(trainer)
    losses = trainer._first_forward_backward(x, y, w[:2])
    assert seen == [2] * n_layer and torch.equal(losses, whole[:2])
