import pytest
import torch
from helpers import RandomStream, tiny_model, train_batch

from vmap_sweep.errors import OutOfMemoryForOneModel
from vmap_sweep.train.memory import probe_models_per_batch, train_splitting_on_oom
from vmap_sweep.train.trainer import TrainConfig

CFG = TrainConfig(rows_per_step=2, seq_len=16)


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
    worker = runner.Worker(preset("tiny").with_overrides(rows_per_step=2, seq_len=16), "cpu", RunSettings())
    sizes = []
    real = runner.TrunkTrainer

    class SmallMemory(real):
        def __init__(self, model, lanes, cfg, device, base_cache=None):
            sizes.append(len(lanes))
            if len(lanes) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            super().__init__(model, lanes, cfg, device, base_cache)

    monkeypatch.setattr(runner, "TrunkTrainer", SmallMemory)
    cells = [{"lr": lr, "tokens": 64} for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
    lanes = [[c] for c in cells]  # each cell its own stacked model
    first, second = worker.train(lanes), worker.train(lanes)
    assert sizes == [4, 2, 2, 2, 2]  # the second batch goes straight to the size that fitted
    whole = real.separate(base, cells, worker.train_cfg, "cpu", {}).run(stream, [])  # the 4 cells at once, never split
    for split in (first, second):
        assert [r.losses for r in split] == [r.losses for r in whole]


def test_the_probe_measures_a_step_of_the_whole_stack_and_a_branch_beside_it(monkeypatch):
    """Step 0 runs one model for every lane at the base weights; the memory that decides K is that of a later,
    K-wide step, and of a read-out's one-model branch of the whole batch while the K trunks are resident."""
    from vmap_sweep.train import memory, trainer

    passes = []
    real = trainer._block_stage
    monkeypatch.setattr(trainer, "_block_stage", lambda halves, s, f, h, *rest: passes.append(
        (h.shape[0], h.shape[1], torch.is_grad_enabled())) or real(halves, s, f, h, *rest))
    cfg = TrainConfig(rows_per_step=2, seq_len=16)
    assert memory._fits(tiny_model(), 3, cfg, torch.device("cpu"))
    assert (3, 2, True) in passes  # a training step of the 3 trunks, every row
    blocks = len(tiny_model().transformer.h)
    # step 0 (one model for all three) and each lane's branch: every row, with gradients
    assert passes.count((1, 2, True)) == blocks * (1 + 3)
    assert (1, 2, False) in passes  # the branch's final loss and eval pass


_PEAK_OF_A_RUN = """
import re, sys
import torch
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer
sys.path.insert(0, "tests")
from helpers import RandomStream


def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))


torch.set_num_threads(1)
budgets = int(sys.argv[1])
model = GPT(GPTConfig(sequence_len=64, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)).init_weights(0)
cfg = TrainConfig(schedule="constant", rows_per_step=4, seq_len=64)
tokens = [3 + 6 * i for i in range(budgets)] + [2 * cfg.tokens_per_step]  # all but the last end inside step 0
lanes = [[{"lr": lr, "tokens": n} for n in tokens] for lr in (1e-3, 1e-2)]
stream = RandomStream(length=2000)
# the peak resident memory (Linux) set back to what the process holds now: imports and their transient peaks
# are left out, the trainer's state and the run's own peak counted
open("/proc/self/clear_refs", "w").write("5")
before = peak_kib()
TrunkTrainer(model, lanes, cfg).run(stream)
print(peak_kib() - before)
"""


def test_a_trunks_memory_does_not_grow_with_the_budgets_inside_its_first_step(tmp_path):
    """Budgets that end inside step 0 share one gradient across lanes; it is applied to every lane and dropped
    before the next budget's is taken, so 16 such budgets peak where 2 do (each gradient is a model's size)."""
    import subprocess
    import sys
    from pathlib import Path

    model_bytes = 4 * (2 * 4096 * 256 + 2 * 12 * 256 * 256)  # float32 weights of the model above
    root = Path(__file__).resolve().parents[1]

    def peak_kib(budgets: int) -> int:
        out = subprocess.run([sys.executable, "-c", _PEAK_OF_A_RUN, str(budgets)], cwd=root, check=True,
                             capture_output=True, text=True, env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
        return int(out.stdout.split()[-1])

    few, many = peak_kib(2), peak_kib(16)
    assert few * 1024 > 4 * model_bytes  # the run's own peak shows: stacked weights, gradients, Adam state, branch
    assert (many - few) * 1024 < 3 * model_bytes, (few, many)  # not 14 more gradients


def test_a_failed_attempt_is_freed_before_its_halves_train_down_to_one_lane(monkeypatch):
    """Out of memory inside a run of several trunks: the failed trainer (weights, optimizer state, branch) is gone
    before each half starts, the halves reach one lane, and every cell comes back once, as trained whole."""
    import weakref

    from vmap_sweep.train.trunk import TrunkTrainer

    base, stream = tiny_model(), RandomStream()
    lanes = [[{"lr": lr, "tokens": n} for n in (20, 64, 100)] for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    failed: list[weakref.ref] = []
    sizes = []
    real_step = TrunkTrainer._trunk_step

    def trunk_step(self, *args):
        if self.k > 1 and self._history[0].steps_done == 1:  # mid-run, after read-outs and a step
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_step(self, *args)

    monkeypatch.setattr(TrunkTrainer, "_trunk_step", trunk_step)

    def train(sub):
        assert all(ref() is None for ref in failed), "a failed attempt still holds its tensors"
        sizes.append(len(sub))
        trainer = TrunkTrainer(base, sub, CFG)
        failed.append(weakref.ref(trainer))
        records = trainer.run(stream)
        failed.pop()
        return records

    split = train_splitting_on_oom(train, lanes)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    monkeypatch.setattr(TrunkTrainer, "_trunk_step", real_step)
    whole = TrunkTrainer(base, lanes, CFG).run(stream)
    assert [r.losses for r in split] == [r.losses for r in whole]
