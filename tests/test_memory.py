import pytest
import torch
from helpers import RandomStream, tiny_model, train_batch

from vmap_sweep.errors import OutOfMemoryForOneModel
from vmap_sweep.train.memory import probe_models_per_batch, train_splitting_on_oom
from vmap_sweep.train.trainer import TrainConfig

CFG = TrainConfig(batch_size=2, seq_len=16)


def test_out_of_memory_splits_the_batch_and_loses_nothing():
    base, stream = tiny_model(), RandomStream()
    cells = [{"lr": lr, "tokens": 96} for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)]
    calls = []

    def train(batch):
        calls.append(len(batch))
        if len(batch) > 2:  # pretend more than two models don't fit
            raise torch.OutOfMemoryError("CUDA out of memory")
        return train_batch(base, stream, batch, CFG)

    split = train_splitting_on_oom(train, cells)
    whole = train_batch(base, stream, cells, CFG)
    assert calls == [5, 2, 3, 1, 2]
    assert [r.losses for r in split] == [r.losses for r in whole]  # each cell once, in order, same result


def test_out_of_memory_with_one_model_is_a_clear_error():
    def train(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfMemoryForOneModel, match="one model does not fit"):
        train_splitting_on_oom(train, [{"lr": 1e-3, "tokens": 10}])


def test_probe_on_cpu_is_bounded_by_the_limit():
    assert probe_models_per_batch(tiny_model(), CFG, "cpu", limit=3) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_finds_a_fitting_k_on_gpu():
    k = probe_models_per_batch(tiny_model(), CFG, "cuda", limit=16)
    assert k == 16  # 16 copies of a 2-layer, 32-wide model take a few MB: a probe that stops short is wrong


def test_after_a_split_later_batches_are_cut_to_what_fitted(monkeypatch):
    from vmap_sweep.run import worker as runner
    from vmap_sweep.study.config import preset
    from vmap_sweep.study.settings import RunSettings

    base, stream = tiny_model(), RandomStream()
    data = runner.StudyData(base, None, stream, [])
    monkeypatch.setattr(runner, "load_study_data", lambda cfg, device: data)
    worker = runner.Worker(preset("tiny").with_overrides(batch_size=2, seq_len=16), "cpu", RunSettings())
    sizes = []
    real = runner.StackedTrainer

    class SmallMemory(real):
        def __init__(self, model, cells, cfg, device, base_cache=None):
            sizes.append(len(cells))
            if len(cells) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            super().__init__(model, cells, cfg, device, base_cache)

    monkeypatch.setattr(runner, "StackedTrainer", SmallMemory)
    cells = [{"lr": lr, "tokens": 64} for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
    lanes = [[c] for c in cells]  # each cell its own stacked model
    first, second = worker.train(lanes), worker.train(lanes)
    assert sizes == [4, 2, 2, 2, 2]  # the second batch goes straight to the size that fitted
    whole = real(base, cells, worker.train_cfg, "cpu", {}).run(stream, [])  # the 4 cells at once, never split
    for split in (first, second):
        assert [r.losses for r in split] == [r.losses for r in whole]


def test_the_probe_measures_a_training_step_of_the_whole_stack(monkeypatch):
    """Step 0 runs one model per token budget; the memory that decides K is that of a later, K-wide step."""
    from vmap_sweep.train import memory, trainer

    passes = []
    real = trainer._block_stage
    monkeypatch.setattr(trainer, "_block_stage", lambda halves, s, f, h, *rest: passes.append(
        (h.shape[0], torch.is_grad_enabled())) or real(halves, s, f, h, *rest))
    assert memory._fits(tiny_model(), 3, TrainConfig(batch_size=2, seq_len=16), torch.device("cpu"))
    assert (3, True) in passes and (1, True) not in passes
