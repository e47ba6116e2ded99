"""Write a model in the Hugging Face transformers layout that `transformers.NanoChatForCausalLM.from_pretrained`
(and `load_model`) reads: config.json, model.safetensors (float32: a fine-tune's exact weights), and where the
tokenizer can be expressed as one, tokenizer.json with tokenizer_config.json holding nanochat's chat template.

Written without importing transformers: it is an optional extra, and the layout is a few plain files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vmap_sweep.errors import CheckpointError
from vmap_sweep.model import hf_names
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, Tokenizer

WEIGHTS = "model.safetensors"

# nanochat's conversation rendering (data/render.py) as a Jinja chat template; a leading system message is merged
# into the first user message, as nanochat does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}<|user_start|>{{ ns.system }}{{ m['content'] }}<|user_end|>"
    "{% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %}<|assistant_start|>{{ m['content'] }}<|assistant_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)


def save_hf_model(directory: str | Path, model: GPT, tokenizer: Tokenizer) -> list[str]:
    """Write `model` (and its tokenizer where it can be written as tokenizer.json) into `directory`; returns the
    names of the files written. A tiktoken tokenizer has no tokenizer.json here: the folder then loads without
    one (load_model says so), and the study's tokenizer.pkl goes beside it with the project's own format."""
    from safetensors.torch import save_file

    if model.config.is_2026:
        raise CheckpointError("transformers' NanoChat port has the 2025 architecture only: a 2026 nanochat model "
                              "(sliding windows, value embeddings, smear, backout) has no transformers layout")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    state = {_hf_key(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS)
    written = [WEIGHTS]
    tokens = _write_tokenizer(directory, tokenizer)
    written += tokens
    config = {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": 4 * c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "max_position_embeddings": c.sequence_len,
        "hidden_act": "relu2",
        # native nanochat's eps=None is float32's machine epsilon, the dtype these weights are in
        "rms_norm_eps": c.norm_eps if c.norm_eps is not None else torch.finfo(torch.float32).eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "final_logit_softcapping": c.softcap,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "dtype": "float32",
        **({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.special_id("<|assistant_end|>"),
            "pad_token_id": tokenizer.special_id("<|assistant_end|>")} if tokens else {}),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["config.json", *written]


def _hf_key(key: str) -> str:
    name = hf_names.transformers_name(key)
    if name is not None:
        return name
    raise ValueError(f"no transformers name for parameter {key}")  # a GPT with parameters nanochat lacks: a bug


def _write_tokenizer(directory: Path, tokenizer: Tokenizer) -> list[str]:
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(directory)
    elif isinstance(tokenizer, ByteTokenizer):
        byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    else:
        return []
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "model_max_length": 1_000_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def byte_level_tokenizer():
    """ByteTokenizer as a `tokenizers` Tokenizer: byte b is id b (GPT-2's byte-to-character table, no merges),
    nanochat's nine specials are 256..264."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    tok = HFTok(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible table from bytes to printable characters, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
