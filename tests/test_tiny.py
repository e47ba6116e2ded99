"""The embedded tiny base model: it has learned the synthetic text, is cached safely, and fine-tunes."""

import copy
import math
import time
from dataclasses import replace

import pytest
import torch

from vmap_sweep.data.stream import EvalSet, TokenStream
from vmap_sweep.data.synthetic import synthetic_docqa, synthetic_documents
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import ByteTokenizer
from vmap_sweep.train import tiny

QUICK = tiny.TinyRecipe(steps=5, n_docs=50)  # for cache mechanics: the recipe, not the quality


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not collapse when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("VMAP_SWEEP_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def base(cache):
    t = time.perf_counter()
    loaded = tiny.tiny_base_model()
    print(f"\ntiny base model pretrained and cached in {time.perf_counter() - t:.1f}s")
    return loaded


@pytest.fixture
def quick_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMAP_SWEEP_CACHE", str(tmp_path))
    return tmp_path


def held_out_text_loss(model: GPT) -> float:
    stream = tiny.document_stream(synthetic_documents(200, seed=99), ByteTokenizer())  # not the pretraining seed
    x, y = tiny.lm_batch(stream, 0, 8, 256)
    with torch.no_grad():
        return model(x, y).item()


def state(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tiny_model_is_a_small_byte_level_nanochat_gpt(base):
    model, tokenizer, config = base
    assert isinstance(model, GPT) and isinstance(tokenizer, ByteTokenizer)
    assert config == tiny.TINY_CONFIG and model.config == config
    assert config.vocab_size == tokenizer.vocab_size == 265
    assert config.n_layer == 2 and config.n_embd == 64 and config.head_dim % 2 == 0
    assert config.sequence_len == 256


def test_pretrained_loss_is_far_below_chance_and_init(base):
    init = GPT(tiny.TINY_CONFIG).init_weights(0)
    loss, init_loss = held_out_text_loss(base.model), held_out_text_loss(init)
    assert init_loss == pytest.approx(math.log(265), abs=1e-3)  # nanochat init: zero lm_head = uniform
    assert loss < 0.4 * math.log(265) and loss < init_loss - 2


def test_second_call_reads_the_cache_bitwise(base, cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again instead of reading the cache")

    monkeypatch.setattr(tiny, "pretrain_tiny", no_training)
    again = tiny.tiny_base_model()
    first = base.model.state_dict()
    assert again.model.state_dict().keys() == first.keys()
    assert all(torch.equal(v, first[k]) for k, v in again.model.state_dict().items())
    entries = [p.name for p in (cache / "models").iterdir()]
    assert entries == [f"tiny-base-v{tiny.TINY_VERSION}-{tiny.TinyRecipe().digest()}"]  # no temp dirs left


def test_pretraining_is_deterministic(quick_cache):
    torch.set_num_threads(2)
    a, b = tiny.pretrain_tiny(QUICK), tiny.pretrain_tiny(QUICK)
    assert torch.get_num_threads() == 2  # the single-thread pretraining restores the caller's setting
    torch.set_num_threads(1)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_cache_name_follows_the_recipe(quick_cache):
    assert QUICK.digest() == tiny.TinyRecipe(steps=5, n_docs=50).digest()
    assert QUICK.digest() != replace(QUICK, lr=1e-3).digest()
    assert QUICK.digest() != QUICK.digest(documents=["changed generator"])
    tiny.tiny_base_model(recipe=QUICK)
    tiny.tiny_base_model(recipe=replace(QUICK, init_seed=1))
    assert len(list((quick_cache / "models").iterdir())) == 2


def test_crash_while_saving_leaves_no_cache_entry(quick_cache, monkeypatch):
    real_save = tiny.save_model

    def crash(directory, model, tokenizer):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny.tiny_base_model(recipe=QUICK)
    assert list((quick_cache / "models").iterdir()) == []
    monkeypatch.setattr(tiny, "save_model", real_save)
    assert tiny.tiny_base_model(recipe=QUICK).config == tiny.TINY_CONFIG


def test_corrupt_cache_entry_is_rebuilt(quick_cache):
    first = state(tiny.tiny_base_model(recipe=QUICK).model)
    (entry,) = (quick_cache / "models").iterdir()
    (entry / "model.safetensors").write_bytes(b"garbage")
    rebuilt = tiny.tiny_base_model(recipe=QUICK).model.state_dict()
    assert all(torch.equal(v, rebuilt[k]) for k, v in first.items())


def supervised_eval_loss(model: GPT, ev: EvalSet) -> float:
    total = count = 0
    with torch.no_grad():
        for x, y in ev.batches(8, 256):
            n = int((y != -1).sum())
            total, count = total + model(x, y).item() * n, count + n
    return total / count


def test_sft_on_synthetic_docqa_lowers_the_supervised_loss(base):
    model = copy.deepcopy(base.model)  # the session's base model stays as pretrained
    tok = ByteTokenizer()
    stream = TokenStream.build(synthetic_docqa(1000, seed=1), tok, seed=0)
    ev = EvalSet.build(synthetic_docqa(60, seed=2), tok)
    before = supervised_eval_loss(model, ev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(100):
        x, y = stream.batch(step, 4, 256)
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = supervised_eval_loss(model, ev)
    assert after < 0.6 * before, (before, after)
