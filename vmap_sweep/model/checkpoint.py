"""Load a nanochat model and its tokenizer from any of the places a user has one; save the project's format.

Sources `load_model` understands:
  (a) a native nanochat folder: model_XXXXXX.pt + meta_XXXXXX.json (+ tokenizer.pkl nearby),
  (b) a Hugging Face transformers folder: config.json (model_type "nanochat"), *.safetensors, tokenizer.json,
  (c) a Hub repo id "owner/name", resolved through huggingface_hub's cache into (a) or (b),
  (d) the project's own folder: model.safetensors + vmap_sweep.json (written by `save_model`).
Every format ends in the one strict `_load_state`: the weights must fill the model exactly.

A transformers folder saved without a tokenizer still loads: its tokenizer is None, and a MissingTokenizerWarning
says so (pass `tokenizer=PATH` to load one from elsewhere).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from vmap_sweep.errors import CheckpointError, TokenizerError
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.model.tokenizer import BYTES, ByteTokenizer, Tokenizer, load_tokenizer

OWN_FORMAT = "vmap-sweep"
OWN_META = "vmap_sweep.json"
OWN_WEIGHTS = "model.safetensors"

_NATIVE_MODEL = re.compile(r"model_(\d+)\.pt")
_NATIVE_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# transformers' NanoChat parameter names -> ours. Unmatched keys pass through unchanged, so the strict
# check reports them under the name the file uses.
_HF_KEY_MAP: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"model\.embed_tokens\.weight", "transformer.wte.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"transformer.h.\1.attn.c_q.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"transformer.h.\1.attn.c_k.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"transformer.h.\1.attn.c_v.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"transformer.h.\1.attn.c_proj.weight"),
        (r"model\.layers\.(\d+)\.mlp\.fc1\.weight", r"transformer.h.\1.mlp.c_fc.weight"),
        (r"model\.layers\.(\d+)\.mlp\.fc2\.weight", r"transformer.h.\1.mlp.c_proj.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    ]
]


class LoadedModel(NamedTuple):
    model: GPT
    tokenizer: Tokenizer | None  # None only for a transformers folder saved without one (a warning says so)
    config: GPTConfig


class MissingTokenizerWarning(UserWarning):
    """A model loaded without a tokenizer: fine for its weights, not for anything that reads text."""


# ---------------------------------------------------------------------------------------------- public


def load_model(source: str | Path, device: str | torch.device = "cpu", step: int | None = None, *,
               tokenizer: str | Path | None = None, revision: str | None = None) -> LoadedModel:
    """Model (float32, eval mode, on `device`), tokenizer and config from a folder, a file or a Hub id.

    `step` picks a native checkpoint's model_{step:06d}.pt; by default the newest one. `tokenizer`: a tokenizer
    file (or folder) to use instead of the one stored with the weights. `revision`: a Hub id's branch, tag or
    commit (default: its main branch).
    """
    loaded = _load_local(locate_model(source, step, revision), step, tokenizer)
    loaded.model.to(device).eval()
    return loaded


def locate_model(source: str | Path, step: int | None = None, revision: str | None = None) -> Path:
    """The local file or folder `source` names: itself, or a Hub id's snapshot in huggingface_hub's cache
    (downloaded as needed; its folder name is the commit it resolved to)."""
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"{source}: a local path has no Hub revision; drop --model-revision {revision}")
        return path
    if is_hub_id(source):
        return _resolve_hub(str(source), step, revision)
    raise CheckpointError(f"{source}: no such file or folder, and not a Hub repo id like owner/name; check the path")


def is_hub_id(source: str | Path) -> bool:
    """Whether `source` names a Hub repo (owner/name) rather than a local file or folder."""
    return not Path(source).expanduser().exists() and bool(_REPO_ID.fullmatch(str(source))) and ".." not in str(source)


def hub_commit(path: Path) -> str | None:
    """The commit a path inside huggingface_hub's cache (…/snapshots/<commit>/…) belongs to; None elsewhere."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def weight_files(path: Path, step: int | None = None) -> list[Path]:
    """The files holding the weights of the checkpoint at `path` (as `locate_model` returns it), sorted."""
    if path.is_file():
        m = _NATIVE_MODEL.fullmatch(path.name)
        step = int(m.group(1)) if m and step is None else step
        path = path.parent
    if (path / OWN_META).is_file():
        return [path / OWN_WEIGHTS]
    if (path / "config.json").is_file():
        index = path / "model.safetensors.index.json"
        return sorted([*path.glob("*.safetensors"), *([index] if index.is_file() else [])])
    steps = _native_steps(path)
    if not steps:
        raise CheckpointError(f"{path}: not a checkpoint: no {OWN_META}, config.json or model_XXXXXX.pt here")
    chosen = steps.get(max(steps) if step is None else step)
    if chosen is None:
        raise CheckpointError(f"{path}: no model file for step {step}; steps here: {sorted(steps)}")
    return [chosen]


def save_model(directory: str | Path, model: GPT, tokenizer: Tokenizer) -> Path:
    """Write the project's own format into `directory`: model.safetensors, vmap_sweep.json, the tokenizer."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_tokenizer(tokenizer, model.config, directory / OWN_META)
    tokenizer_name = tokenizer.save(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Write to temporary names and rename, so a crash never leaves a folder that looks complete.
    tmp = directory / (OWN_WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / OWN_WEIGHTS)
    meta = {"format": OWN_FORMAT, "model_config": model.config.to_dict(), "tokenizer": tokenizer_name}
    tmp = directory / (OWN_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / OWN_META)
    return directory


# ---------------------------------------------------------------------------------------------- dispatch


def _load_local(path: Path, step: int | None, tokenizer: str | Path | None = None) -> LoadedModel:
    if path.is_file():
        # A file inside a checkpoint folder stands for the folder; model_XXXXXX.pt also names its step.
        m = _NATIVE_MODEL.fullmatch(path.name)
        if m and step is None:
            step = int(m.group(1))
        path = path.parent
    if (path / OWN_META).is_file():
        _no_step(step, path / OWN_META)
        return _load_own(path, tokenizer)
    if (path / "config.json").is_file():
        _no_step(step, path / "config.json")
        return _load_hf(path, tokenizer)
    if _native_steps(path):
        return _load_native(path, step, tokenizer)
    raise CheckpointError(
        f"{path}: not a checkpoint: no {OWN_META}, config.json or model_XXXXXX.pt here; "
        "point at the folder that holds the weights"
    )


def _no_step(step: int | None, file: Path) -> None:
    if step is not None:
        raise CheckpointError(f"{file}: step={step} applies only to native nanochat folders; leave step unset")


# ---------------------------------------------------------------------------------------------- (a) native


def _native_steps(folder: Path) -> dict[int, Path]:
    steps = {}
    for p in folder.glob("model_*.pt"):
        m = _NATIVE_MODEL.fullmatch(p.name)
        if m:
            steps[int(m.group(1))] = p
    return steps


def _load_native(folder: Path, step: int | None, tokenizer_file: str | Path | None = None) -> LoadedModel:
    steps = _native_steps(folder)
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"{folder}: no model file for step {step}; steps here: {sorted(steps)}")
    weights = steps[step]
    meta_path = weights.with_name(_meta_name(weights.name))
    meta = _read_json(meta_path, f"every {weights.name} needs its {meta_path.name} beside it")
    config = _native_config(meta, meta_path)
    tokenizer = load_tokenizer(tokenizer_file or _find_native_tokenizer(folder))
    _check_tokenizer(tokenizer, config, meta_path)
    state = _torch_load(weights)
    # torch.compile'd models save their parameters under _orig_mod.
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    return LoadedModel(_build(config, state, weights), tokenizer, config)


def _meta_name(model_name: str) -> str:
    """meta_XXXXXX.json for model_XXXXXX.pt, keeping the digits as written."""
    return "meta_" + model_name.removeprefix("model_").removesuffix(".pt") + ".json"


def _native_config(meta: dict, meta_path: Path) -> GPTConfig:
    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise CheckpointError(f"{meta_path}: no model_config object; is this a nanochat meta_XXXXXX.json?")
    missing = [k for k in _NATIVE_CONFIG_KEYS if k not in mc]
    if missing:
        raise CheckpointError(f"{meta_path}: model_config lacks {', '.join(missing)}; the file is incomplete")
    extra = sorted(set(mc) - set(_NATIVE_CONFIG_KEYS))
    if extra:
        raise CheckpointError(
            f"{meta_path}: model_config has {', '.join(extra)}, from a later nanochat architecture "
            "(Jan 2026+); only the Oct-Dec 2025 architecture (e.g. nanochat-d20) is supported"
        )
    if not all(type(mc[k]) is int and mc[k] > 0 for k in _NATIVE_CONFIG_KEYS):
        raise CheckpointError(f"{meta_path}: model_config values must be positive integers; the file is corrupt")
    # Native nanochat normalizes with F.rms_norm(eps=None): the dtype's machine epsilon.
    return _make_config(meta_path, **{k: mc[k] for k in _NATIVE_CONFIG_KEYS}, norm_eps=None)


def _find_native_tokenizer(folder: Path) -> Path:
    # Beside the weights, in a tokenizer/ subfolder, or nanochat's base dir (BASE/chatsft_checkpoints/d20/).
    candidates = [
        folder / "tokenizer.pkl",
        folder / "tokenizer" / "tokenizer.pkl",
        folder.parent / "tokenizer" / "tokenizer.pkl",
        folder.parent.parent / "tokenizer" / "tokenizer.pkl",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise TokenizerError(
        f"{folder}: no tokenizer.pkl beside the checkpoint, in tokenizer/, or in nanochat's base dir "
        f"({folder.parent.parent / 'tokenizer'}); copy nanochat's tokenizer/tokenizer.pkl next to the weights"
    )


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{file}: can't be read as a PyTorch state dict ({msg}); is the download complete?"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{file}: holds a {type(state).__name__}, not a state dict; is this a nanochat model file?"
        )
    return state


# ---------------------------------------------------------------------------------------------- (b) HF


def _load_hf(folder: Path, tokenizer_file: str | Path | None = None) -> LoadedModel:
    cfg_path = folder / "config.json"
    cfg = _read_json(cfg_path, "the folder looks like a transformers model")
    config = _hf_config(cfg, cfg_path)
    tok_path = Path(tokenizer_file) if tokenizer_file is not None else folder / "tokenizer.json"
    tokenizer: Tokenizer | None = None
    if tok_path.exists() or tokenizer_file is not None:
        tokenizer = load_tokenizer(tok_path)
        _check_tokenizer(tokenizer, config, cfg_path)
    else:  # save_pretrained writes no tokenizer: the weights are all there, so load them
        warnings.warn(f"{folder}: no tokenizer.json beside config.json; loaded the weights without a tokenizer "
                      "(pass tokenizer=PATH, or --tokenizer PATH on the command line)", MissingTokenizerWarning,
                      stacklevel=4)  # the caller of load_model
    state, weights = _read_safetensors(folder)
    state = {_map_hf_key(k): v for k, v in state.items()}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # nanochat unties; accept a tied port
    return LoadedModel(_build(config, state, weights), tokenizer, config)


def _hf_config(cfg: dict, path: Path) -> GPTConfig:
    if cfg.get("model_type") != "nanochat":
        raise CheckpointError(
            f"{path}: model_type is {cfg.get('model_type')!r}, not 'nanochat'; only nanochat is supported"
        )
    required = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
        "intermediate_size",
    ]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; the config is incomplete")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg["intermediate_size"] != 4 * hidden:
        raise CheckpointError(
            f"{path}: intermediate_size {cfg['intermediate_size']} is not 4 x hidden_size {hidden}, "
            "which nanochat's MLP requires; not a nanochat-shaped model"
        )
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(f"{path}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads; unsupported")
    if cfg.get("hidden_act", "relu2") != "relu2" or cfg.get("attention_bias", False):
        raise CheckpointError(f"{path}: hidden_act must be relu2 and attention_bias false, as in nanochat; unsupported")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{path}: rope_type {rope['rope_type']!r} is not supported; nanochat uses 'default'")
    softcap = cfg.get("final_logit_softcapping", 15.0)
    if softcap is None:
        raise CheckpointError(f"{path}: final_logit_softcapping is null; nanochat models always cap logits")
    return _make_config(
        path,
        sequence_len=cfg["max_position_embeddings"],
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=heads,
        n_kv_head=cfg.get("num_key_value_heads") or heads,
        n_embd=hidden,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
        softcap=float(softcap),
    )


def _map_hf_key(key: str) -> str:
    for pattern, replacement in _HF_KEY_MAP:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return key


def _read_safetensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a (possibly sharded) safetensors checkpoint, and the file to name in errors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map; the index is corrupt")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: names shards {', '.join(absent)} that are missing; finish the download")
        where = index
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{folder}: config.json but no *.safetensors; save the model with safe_serialization=True"
            )
        where = files[0] if len(files) == 1 else folder
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in _load_safetensors_file(f).items():
            if k in state:
                raise CheckpointError(f"{f}: tensor {k} also appears in another shard; the checkpoint is corrupt")
            state[k] = v
    return state, where


def _load_safetensors_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{file}: can't be read as safetensors ({e}); is the download complete?") from None


# ---------------------------------------------------------------------------------------------- (c) Hub


def _hub_cache_dir() -> str | None:
    # huggingface_hub reads its environment once, at import; read it per call so the current setting wins.
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache and env.get("HF_HOME"):
        cache = os.path.join(env["HF_HOME"], "hub")
    return os.path.expandvars(os.path.expanduser(cache)) if cache else None


def hub_cache_dir() -> str | None:
    """huggingface_hub's cache folder as the environment names it now (None: the library's default)."""
    return _hub_cache_dir()


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now."""
    return _hub_offline()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    def true(v: str | None) -> bool:
        return (v or "").upper() in {"1", "ON", "YES", "TRUE"}

    env = os.environ
    return true(env.get("HF_HUB_OFFLINE")) or true(env.get("TRANSFORMERS_OFFLINE")) or constants.HF_HUB_OFFLINE


def _resolve_hub(repo_id: str, step: int | None, revision: str | None = None) -> Path:
    """The folder in huggingface_hub's cache holding repo_id's checkpoint (at `revision`, default the main
    branch), downloading what is needed."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache_dir = _hub_cache_dir()
    pinned = {} if revision is None else {"revision": revision}  # left out unset: the library's own default
    files: list[str] | None = None
    listing_error: Exception | None = None
    if not _hub_offline():
        try:
            files = HfApi().list_repo_files(repo_id, **pinned)
        except RevisionNotFoundError:
            raise CheckpointError(f"{repo_id}: the Hub repo has no revision {revision!r}; give a branch, tag or "
                                  "commit hash it holds") from None
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise CheckpointError(
                f"{repo_id}: no such local folder, and no accessible Hub repo of that name ({type(e).__name__}); "
                "check the path or id, or log in with `hf auth login` for a private/gated repo"
            ) from None
        except Exception as e:  # no network, Hub down: try the cache
            listing_error = e
    try:
        if files is not None:
            subfolder, wanted = _pick_hub_files(repo_id, files, step)
            snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=wanted, **pinned))
        else:
            snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True, **pinned))
            present = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
            subfolder, _ = _pick_hub_files(repo_id, present, step)
    except CheckpointError:
        raise
    except LocalEntryNotFoundError:
        why = f"the Hub can't be reached ({type(listing_error).__name__})" if listing_error else "HF_HUB_OFFLINE is set"
        raise CheckpointError(
            f"{repo_id}: no such local folder, not in the Hugging Face cache ({cache_dir or 'default cache'}) "
            f"and {why}; download it once online, or point at a local folder"
        ) from None
    except Exception as e:  # the download itself failed (connection lost, Hub error, disk full)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{repo_id}: download from the Hub failed ({type(e).__name__}: {msg}); check the connection and retry"
        ) from None
    return snapshot / subfolder


def _pick_hub_files(repo_id: str, files: list[str], step: int | None) -> tuple[str, list[str]]:
    """From a repo's file list: the subfolder to load and the files it needs (layout (d), (b) or (a))."""
    names = set(files)
    root = [f for f in files if "/" not in f]
    if OWN_META in names:
        return "", root
    if "config.json" in names and any(f.endswith(".safetensors") for f in root):
        wanted = [
            f
            for f in root
            if f.endswith(".safetensors")
            or f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")
        ]
        return "", wanted
    models = [
        (f.rpartition("/")[0], int(m.group(1)), f)
        for f in files
        if (m := _NATIVE_MODEL.fullmatch(f.rpartition("/")[2]))
    ]
    if not models:
        raise CheckpointError(
            f"{repo_id}: the repo holds neither config.json + *.safetensors nor model_XXXXXX.pt; "
            "not a nanochat checkpoint repo"
        )
    folders = sorted({d for d, _, _ in models})
    # Prefer the root, then nanochat's most-trained stage.
    preference = ["", *[f for stage in ("chatsft", "chatrl", "mid", "base") for f in folders if stage in f]]
    folder = next(f for f in [*preference, *folders] if f in folders)
    steps = {s: f for d, s, f in models if d == folder}
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"{repo_id}: no model file for step {step} in '{folder or '/'}'; steps: {sorted(steps)}")
    model_file = steps[step]
    meta_file = posixpath.join(folder, _meta_name(posixpath.basename(model_file)))
    tokenizers = [f for f in files if f.rpartition("/")[2] == "tokenizer.pkl"]
    return folder, [model_file, meta_file, *tokenizers]


# ---------------------------------------------------------------------------------------------- (d) own


def _load_own(folder: Path, tokenizer_file: str | Path | None = None) -> LoadedModel:
    meta_path = folder / OWN_META
    meta = _read_json(meta_path, "it should be written by save_model")
    if meta.get("format") != OWN_FORMAT:
        raise CheckpointError(
            f"{meta_path}: format is {meta.get('format')!r}, not {OWN_FORMAT!r}; not written by save_model"
        )
    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise CheckpointError(f"{meta_path}: no model_config object; the file is corrupt")
    config = _make_config(meta_path, **mc)
    name = meta.get("tokenizer")
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
    elif name == BYTES:
        tokenizer: Tokenizer = ByteTokenizer()
    elif isinstance(name, str) and name and Path(name).name == name:
        tokenizer = load_tokenizer(folder / name)
    else:
        raise TokenizerError(f"{meta_path}: tokenizer must be 'bytes' or a file name in this folder, not {name!r}")
    _check_tokenizer(tokenizer, config, meta_path)
    weights = folder / OWN_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing beside {OWN_META}; save the model again")
    return LoadedModel(_build(config, _load_safetensors_file(weights), weights), tokenizer, config)


# ---------------------------------------------------------------------------------------------- shared


def _read_json(path: Path, hint: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); is the file complete?") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; is this the right file?")
    return data


def _make_config(source_file: Path, **fields) -> GPTConfig:
    try:
        config = GPTConfig(**fields)
        config.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source_file}: invalid model config ({e}); the file is corrupt") from None
    return config


def _check_tokenizer(tokenizer: Tokenizer, config: GPTConfig, source_file: Path) -> None:
    where = tokenizer.source or source_file
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}; "
            "it belongs to another model, use the tokenizer saved with these weights"
        )
    missing = tokenizer.missing_specials()
    if missing:
        raise TokenizerError(
            f"{where}: lacks nanochat's special tokens {', '.join(missing)}; use the model's own tokenizer"
        )


def _build(config: GPTConfig, state: dict, source_file: Path) -> GPT:
    model = GPT(config)
    _load_state(model, state, source_file)
    return model


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_state(model: GPT, state: dict, source_file: Path) -> None:
    """Fill `model` from `state` exactly: same keys, same shapes, floating tensors (stored as float32)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = ([f"missing keys {_names(missing)}"] if missing else []) + (
            [f"unexpected keys {_names(extra)}"] if extra else []
        )
        raise CheckpointError(
            f"{source_file}: {'; '.join(parts)}; the weights don't match a nanochat model of this config"
        )
    converted = {}
    for key, ref in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CheckpointError(f"{source_file}: {key} is not a floating-point tensor; the file is corrupt")
        if t.shape != ref.shape:
            raise CheckpointError(
                f"{source_file}: {key} has shape {tuple(t.shape)} but the config implies {tuple(ref.shape)}; "
                "weights and config disagree"
            )
        converted[key] = t.to(torch.float32)  # wte is bf16 in native checkpoints, everything is bf16 on the Hub
    model.load_state_dict(converted, strict=True)
