"""Load a nanochat model and its tokenizer from any of the places a user has one; save the project's format.

Sources `load_model` understands:
  (a) a native nanochat folder: model_XXXXXX.pt + meta_XXXXXX.json (+ tokenizer.pkl nearby),
  (b) a Hugging Face transformers folder: config.json (model_type "nanochat"), *.safetensors, tokenizer.json,
  (c) a Hub repo id "owner/name", resolved through huggingface_hub's cache into (a) or (b),
  (d) the project's own folder: model.safetensors + vmap_sweep.json (written by `save_model`).
Every format ends in the one strict `_load_state`: the weights must fill the model exactly.

A folder or Hub repo holding both (a) and (b) loads (a) unless `model_format="transformers"` says otherwise:
the native weights are what a nanochat user trained, while the port is a conversion (bf16 weights, another
norm epsilon). Which one loaded, and why, is printed once per process.

A transformers folder saved without a tokenizer still loads: its tokenizer is None, and a MissingTokenizerWarning
says so (pass `tokenizer=PATH` to load one from elsewhere).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from vmap_sweep.errors import CheckpointError, TokenizerError
from vmap_sweep.model import hf_names
from vmap_sweep.model.gpt import ARCH_2026, GPT, GPTConfig
from vmap_sweep.model.tokenizer import BYTES, ByteTokenizer, Tokenizer, load_tokenizer
from vmap_sweep.model.validate import (
    check_config,
    check_weights,
    layer_count,
    padded_vocab_rows,
    parse_json,
    vocab_rows,
)
from vmap_sweep.study.config import MODEL_FORMATS

OWN_FORMAT = "vmap-sweep"
OWN_META = "vmap_sweep.json"
OWN_WEIGHTS = "model.safetensors"

_NATIVE_MODEL = re.compile(r"model_(\d+)\.pt")
_NATIVE_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
# parameters only the 2026 architecture has (besides value_embeds.* and ve_gate), and its fixed RoPE base
_KEYS_2026 = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")
ROPE_BASE_2026 = 100000.0
# GPTConfig's fields as a transformers config.json spells them, to name the file's own field in an error.
_HF_NAMES = {"sequence_len": "max_position_embeddings", "vocab_size": "vocab_size", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
             "norm_eps": "rms_norm_eps", "rope_base": "rope_theta", "softcap": "final_logit_softcapping"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TOLD: set[tuple[str, str]] = set()  # (source, layout) choices already printed

class LoadedModel(NamedTuple):
    model: GPT
    tokenizer: Tokenizer | None  # None only for a transformers folder saved without one (a warning says so)
    config: GPTConfig


class MissingTokenizerWarning(UserWarning):
    """A model loaded without a tokenizer: fine for its weights, not for anything that reads text."""


# ---------------------------------------------------------------------------------------------- public


def load_model(source: str | Path, device: str | torch.device = "cpu", step: int | None = None, *,
               tokenizer: str | Path | None = None, revision: str | None = None,
               model_format: str | None = None) -> LoadedModel:
    """Model (float32, eval mode, on `device`), tokenizer and config from a folder, a file or a Hub id.

    `step` picks a native checkpoint's model_{step:06d}.pt; by default the newest one. `tokenizer`: a tokenizer
    file (or folder) to use instead of the one stored with the weights. `revision`: a Hub id's branch, tag or
    commit (default: its main branch). `model_format`: "native" or "transformers", the layout to load where the
    folder or repo holds both (default: native); one it does not hold is refused.
    """
    loaded = _load_local(locate_model(source, step, revision, model_format), step, tokenizer, model_format)
    loaded.model.to(device).eval()
    return loaded


def locate_model(source: str | Path, step: int | None = None, revision: str | None = None,
                 model_format: str | None = None) -> Path:
    """The local file or folder `source` names: itself, or a Hub id's snapshot in huggingface_hub's cache
    (downloaded as needed; its folder name is the commit it resolved to), the subfolder of the layout
    `model_format` picks (see load_model)."""
    check_model_format(model_format)
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"{source}: a local path has no Hub revision; drop --model-revision {revision}")
        return path
    if is_hub_id(source):
        return _resolve_hub(str(source), step, revision, model_format)
    raise CheckpointError(f"{source}: no such file or folder, and not a Hub repo id like owner/name; check the path")


def is_hub_id(source: str | Path) -> bool:
    """Whether `source` names a Hub repo (owner/name) rather than a local file or folder."""
    return not Path(source).expanduser().exists() and bool(_REPO_ID.fullmatch(str(source))) and ".." not in str(source)


def hub_commit(path: Path) -> str | None:
    """The commit a path inside huggingface_hub's cache (…/snapshots/<commit>/…) belongs to; None elsewhere."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def check_model_format(model_format: str | None) -> None:
    if model_format is not None and model_format not in MODEL_FORMATS:
        raise CheckpointError(f"--model-format {model_format!r}: choose {' or '.join(MODEL_FORMATS)}")


def weight_files(path: Path, step: int | None = None, model_format: str | None = None) -> list[Path]:
    """The files holding the weights of the checkpoint at `path` (as `locate_model` returns it), sorted."""
    if path.is_file():
        m = _NATIVE_MODEL.fullmatch(path.name)
        step = int(m.group(1)) if m and step is None else step
        path = path.parent
    layout = _local_layout(path, model_format, told=False)
    if layout == OWN_FORMAT:
        return [path / OWN_WEIGHTS]
    if layout == "transformers":
        index = path / "model.safetensors.index.json"
        return sorted([*path.glob("*.safetensors"), *([index] if index.is_file() else [])])
    steps = _native_steps(path)
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


def _load_local(path: Path, step: int | None, tokenizer: str | Path | None = None,
                model_format: str | None = None) -> LoadedModel:
    if path.is_file():
        # A file inside a checkpoint folder stands for the folder; model_XXXXXX.pt also names its step.
        m = _NATIVE_MODEL.fullmatch(path.name)
        if m and step is None:
            step = int(m.group(1))
        path = path.parent
    layout = _local_layout(path, model_format)
    if layout == OWN_FORMAT:
        _no_step(step, path / OWN_META)
        return _load_own(path, tokenizer)
    if layout == "transformers":
        _no_step(step, path / "config.json")
        return _load_hf(path, tokenizer)
    return _load_native(path, step, tokenizer)


def _local_layout(folder: Path, model_format: str | None, told: bool = True) -> str:
    """The layout of `folder` to load: OWN_FORMAT, "transformers" or "native" (see _choose_layout)."""
    held = {OWN_FORMAT: (folder / OWN_META).is_file(), "transformers": (folder / "config.json").is_file(),
            "native": bool(_native_steps(folder))}
    if not any(held.values()):
        raise CheckpointError(
            f"{folder}: not a checkpoint: no {OWN_META}, config.json or model_XXXXXX.pt here; "
            "point at the folder that holds the weights"
        )
    return _choose_layout(str(folder), {k for k, v in held.items() if v}, model_format, told)


def _choose_layout(source: str, held: set[str], model_format: str | None, told: bool = True) -> str:
    """Which of the layouts `source` holds to load. Asked for one (model_format), that one, refused where it is
    absent; else the project's own format, then native, then transformers. Where native and transformers are
    both held, a line says which loaded and why (once per source and layout)."""
    check_model_format(model_format)
    both = {"native", "transformers"} <= held
    if model_format is not None:
        if model_format not in held:
            has = " and ".join(_LAYOUT_NAMES[k] for k in sorted(held))
            other = next((k for k in MODEL_FORMATS if k in held), None)
            fix = f"use --model-format {other}" if other else "drop --model-format"
            raise CheckpointError(f"{source}: --model-format {model_format}, but it holds no "
                                  f"{_LAYOUT_NAMES[model_format]}, only {has}; {fix}")
        layout, why = model_format, f"--model-format {model_format}"
    else:
        layout = next(k for k in (OWN_FORMAT, "native", "transformers") if k in held)
        why = "the default: what nanochat trained, not a conversion"
    if both and told and (source, layout) not in _TOLD:
        _TOLD.add((source, layout))
        other = "transformers" if layout == "native" else "native"
        print(f"{source}: holds both {_LAYOUT_NAMES['native']} and a {_LAYOUT_NAMES['transformers']}; loading "
              f"the {layout} one ({why}); --model-format {other} loads the other", file=sys.stderr, flush=True)
    return layout


_LAYOUT_NAMES = {"native": "nanochat's native model_XXXXXX.pt", "transformers": "transformers port "
                 "(config.json + safetensors)", OWN_FORMAT: f"the project's own format ({OWN_META})"}


def _homes(folder: Path) -> set[Path]:
    """Where a model folder's files may lead once links are resolved: the folder itself, and in a Hugging Face
    cache snapshot (REPO/snapshots/COMMIT/) the repo's blobs/ folder, which every file of a snapshot links to."""
    homes = {folder.resolve()}
    if folder.absolute().parent.name == "snapshots":
        homes.add((folder.absolute().parent.parent / "blobs").resolve())
    return homes


def confined(folder: Path, path: Path) -> Path:
    """`path`, a file read for the model in `folder`, refused where a link leads it out of the folder (a shard,
    a config or a tokenizer linked to another model's file, or to any file the user did not mean to hand over)."""
    if path.exists() and path.resolve().parent not in _homes(folder):
        raise CheckpointError(f"{path}: not a file of the model's folder {folder} (a link leading to "
                              f"{path.resolve()}); copy the file itself into the folder")
    return path


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
    weights = confined(folder, steps[step])
    meta_path = confined(folder, weights.with_name(_meta_name(weights.name)))
    meta = _read_json(meta_path, f"every {weights.name} needs its {meta_path.name} beside it")
    # Mapped, so the keys are read without the tensors: which architecture the file holds is in its keys.
    state = _torch_load(weights)
    # torch.compile'd models save their parameters under _orig_mod.
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    config = _native_config(meta, meta_path, set(state), weights)
    tokenizer = load_tokenizer(tokenizer_file or _find_native_tokenizer(folder))
    _check_tokenizer(tokenizer, config, meta_path)
    if config.is_2026 and layer_count(state) == config.n_layer:  # else check_weights refuses, before allocating
        # as nanochat's checkpoint_manager: checkpoints from before these scalars existed held them neutral
        state.setdefault("resid_lambdas", torch.ones(config.n_layer))
        state.setdefault("x0_lambdas", torch.zeros(config.n_layer))
    return LoadedModel(_build(config, _unpad_vocab(config, state), weights), tokenizer, config)


def _unpad_vocab(config: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without nanochat's vocab padding: its rows past vocab_size are never a token (nanochat's forward
    slices them off the logits before the softcap and the loss), so dropping them changes no logit of a token
    and leaves nothing that could ever be sampled, argmaxed or scored but a real token."""
    padded = padded_vocab_rows(config, {k: tuple(v.shape) for k, v in state.items()})
    if padded is None:
        return state
    keys = set(vocab_rows(state))
    return {k: v[: config.vocab_size] if k in keys else v for k, v in state.items()}


def _meta_name(model_name: str) -> str:
    """meta_XXXXXX.json for model_XXXXXX.pt, keeping the digits as written."""
    return "meta_" + model_name.removeprefix("model_").removesuffix(".pt") + ".json"


def _native_config(meta: dict, meta_path: Path, keys: set[str], weights: Path) -> GPTConfig:
    """The config of a native checkpoint: the 2026 architecture where meta names a window_pattern or the weights
    hold its parameters (nanochat's checkpoint_manager patches a missing window_pattern to "L"), else 2025."""
    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise CheckpointError(f"{meta_path}: no model_config object; is this a nanochat meta_XXXXXX.json?")
    missing = [k for k in _NATIVE_CONFIG_KEYS if k not in mc]
    if missing:
        raise CheckpointError(f"{meta_path}: model_config lacks {', '.join(missing)}; the file is incomplete")
    extra = sorted(set(mc) - {*_NATIVE_CONFIG_KEYS, "window_pattern"})
    if extra:
        raise CheckpointError(
            f"{meta_path}: model_config has {', '.join(extra)}, from a nanochat architecture this version does not "
            "know; the Oct-Dec 2025 architecture and nanochat's since 2026-03-14 (window_pattern) load"
        )
    # Native nanochat normalizes with F.rms_norm(eps=None): the dtype's machine epsilon.
    fields = {**{k: mc[k] for k in _NATIVE_CONFIG_KEYS}, "norm_eps": None}
    if "window_pattern" in mc or keys & set(_KEYS_2026) or any(k.startswith("value_embeds.") for k in keys):
        absent = [k for k in _KEYS_2026 if k not in keys and k not in ("resid_lambdas", "x0_lambdas")]
        if absent:
            raise CheckpointError(
                f"{weights}: a 2026 nanochat checkpoint without {', '.join(absent)}: from a version between "
                "January and March 2026 whose forward differs from today's; only the Oct-Dec 2025 architecture "
                "and nanochat's since 2026-03-14 load"
            )
        fields |= {"architecture": ARCH_2026, "window_pattern": mc.get("window_pattern", "L"),
                   "rope_base": ROPE_BASE_2026}
    return check_config(fields, meta_path)


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
            # nanochat's base dir lies above the folder by design; a link there may not lead anywhere else
            return confined(folder, c) if c.parent == folder else confined(c.parent, c)
    raise TokenizerError(
        f"{folder}: no tokenizer.pkl beside the checkpoint, in tokenizer/, or in nanochat's base dir "
        f"({folder.parent.parent / 'tokenizer'}); copy nanochat's tokenizer/tokenizer.pkl next to the weights"
    )


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        # Mapped, not read: the tensors' sizes are bounded by the file's, and their shapes are checked against
        # the config before any memory is spent on them.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{file}: can't be read as a PyTorch state dict ({msg}); is the download complete?"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{file}: holds a {type(state).__name__}, not a state dict; is this a nanochat model file?"
        )
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: holds entries that are not named tensors; is this a nanochat model file?")
    return state


# ---------------------------------------------------------------------------------------------- (b) HF


def _load_hf(folder: Path, tokenizer_file: str | Path | None = None) -> LoadedModel:
    cfg_path = confined(folder, folder / "config.json")
    cfg = _read_json(cfg_path, "the folder looks like a transformers model")
    config = _hf_config(cfg, cfg_path)
    tok_path = Path(tokenizer_file) if tokenizer_file is not None else confined(folder, folder / "tokenizer.json")
    tokenizer: Tokenizer | None = None
    if tok_path.exists() or tokenizer_file is not None:
        tokenizer = load_tokenizer(tok_path)
        _check_tokenizer(tokenizer, config, cfg_path)
    else:  # save_pretrained writes no tokenizer: the weights are all there, so load them
        warnings.warn(f"{folder}: no tokenizer.json beside config.json; loaded the weights without a tokenizer "
                      "(pass tokenizer=PATH, or --tokenizer PATH on the command line)", MissingTokenizerWarning,
                      stacklevel=4)  # the caller of load_model
    files, weights = _safetensors_files(folder)
    tied = bool(cfg.get("tie_word_embeddings"))
    check_weights(config, _tie(tied, {hf_names.ours(k): s for k, s in _safetensors_shapes(files).items()}), weights,
                  _HF_NAMES)
    state = _tie(tied, {hf_names.ours(k): v for k, v in _read_safetensors(files).items()})
    return LoadedModel(_build(config, state, weights, _HF_NAMES), tokenizer, config)


def _tie(tied: bool, entries: dict) -> dict:
    """nanochat unties lm_head from wte; a tied port stores wte only, which stands for both."""
    if tied and "lm_head.weight" not in entries and "transformer.wte.weight" in entries:
        wte = entries["transformer.wte.weight"]
        entries["lm_head.weight"] = wte.clone() if isinstance(wte, torch.Tensor) else wte
    return entries


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
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope_parameters is a {type(rope).__name__}, not an object; "
                              "the config is corrupt")
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{path}: rope_type {rope['rope_type']!r} is not supported; nanochat uses 'default'")
    softcap = cfg.get("final_logit_softcapping", 15.0)
    if softcap is None:
        raise CheckpointError(f"{path}: final_logit_softcapping is null; nanochat models always cap logits")
    kv_heads = cfg.get("num_key_value_heads")
    config = check_config(dict(
        sequence_len=cfg["max_position_embeddings"],
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"],
        n_kv_head=cfg["num_attention_heads"] if kv_heads is None else kv_heads,
        n_embd=cfg["hidden_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=next((t for t in (rope.get("rope_theta"), cfg.get("rope_theta")) if t is not None), 10000.0),
        softcap=softcap,
    ), path, _HF_NAMES)
    intermediate = cfg["intermediate_size"]
    if type(intermediate) is not int or intermediate != 4 * config.n_embd:
        raise CheckpointError(
            f"{path}: intermediate_size {intermediate!r} is not 4 x hidden_size {config.n_embd}, "
            "which nanochat's MLP requires; not a nanochat-shaped model"
        )
    if cfg.get("head_dim") not in (None, config.head_dim):
        raise CheckpointError(f"{path}: head_dim {cfg['head_dim']!r} != hidden_size / num_attention_heads; "
                              "unsupported")
    if cfg.get("hidden_act", "relu2") != "relu2" or cfg.get("attention_bias", False):
        raise CheckpointError(f"{path}: hidden_act must be relu2 and attention_bias false, as in nanochat; unsupported")
    return config


def _safetensors_files(folder: Path) -> tuple[list[Path], Path]:
    """The files of a (possibly sharded) safetensors checkpoint, and the file to name in errors."""
    index = confined(folder, folder / "model.safetensors.index.json")
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map; the index is corrupt")
        names = set(weight_map.values())
        outside = sorted(repr(n) for n in names if not _plain_name(n))
        if outside:
            raise CheckpointError(f"{index}: names shards {', '.join(outside)} outside its folder; "
                                  "the index is corrupt")
        files = [folder / name for name in sorted(names)]
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
    return [confined(folder, f) for f in files], where


def _plain_name(name: object) -> bool:
    """A file name inside its folder: no separator, not '.' or '..'."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the files' headers alone (safetensors checks a header against the file's size)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as opened:
                found = {k: tuple(opened.get_slice(k).get_shape()) for k in opened.keys()}  # noqa: SIM118
        except Exception as e:
            raise CheckpointError(f"{f}: can't be read as safetensors ({e}); is the download complete?") from None
        twice = sorted(set(found) & set(shapes))
        if twice:
            raise CheckpointError(f"{f}: tensor {twice[0]} also appears in another shard; the checkpoint is corrupt")
        shapes |= found
    return shapes


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the files (whose headers _safetensors_shapes has checked: no tensor in two shards)."""
    return {k: v for f in files for k, v in _load_safetensors_file(f).items()}


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


_REACHABLE: dict[str, str | None] = {}  # endpoint -> why it can't be reached (None: it can), probed once a process


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub can't be reached now (no network, no name resolution), or None if a connection opens.

    huggingface_hub retries a refused or unresolvable request with backoff for ~30-40 s before it gives up; one
    plain connection attempt (a few seconds at most) tells first, and the caller goes to the cache at once. Behind
    a proxy (HTTPS_PROXY...) a direct connection proves nothing, so the library is left to try."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint)
        host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[endpoint] = None
        except OSError as e:
            _REACHABLE[endpoint] = f"{host}:{port}: {e.strerror or type(e).__name__}"
    return _REACHABLE[endpoint]


def _resolve_hub(repo_id: str, step: int | None, revision: str | None = None,
                 model_format: str | None = None) -> Path:
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
    unreachable = None if _hub_offline() else hub_unreachable()
    if unreachable:
        listing_error = ConnectionError(unreachable)
    elif not _hub_offline():
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
            subfolder, wanted = _pick_hub_files(repo_id, files, step, model_format)
            snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=wanted, **pinned))
        else:
            snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True, **pinned))
            present = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
            subfolder, _ = _pick_hub_files(repo_id, present, step, model_format)
    except CheckpointError:
        raise
    except LocalEntryNotFoundError:
        why = (f"the Hub can't be reached ({unreachable or type(listing_error).__name__})" if listing_error
               else "HF_HUB_OFFLINE is set")
        raise CheckpointError(
            f"{repo_id}: no such local folder, not in the Hugging Face cache ({cache_dir or 'default cache'}) "
            f"and {why}; download it once online, point --model at a local folder, or run offline with "
            "--preset tiny (the project's own model and synthetic data)"
        ) from None
    except Exception as e:  # the download itself failed (connection lost, Hub error, disk full)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{repo_id}: download from the Hub failed ({type(e).__name__}: {msg}); check the connection and retry"
        ) from None
    return snapshot / subfolder


def _pick_hub_files(repo_id: str, files: list[str], step: int | None,
                    model_format: str | None = None) -> tuple[str, list[str]]:
    """From a repo's file list: the subfolder to load and the files it needs (layout (d), (b) or (a), as
    _choose_layout picks among those the repo holds)."""
    names = set(files)
    root = [f for f in files if "/" not in f]
    held = {k for k, v in {
        OWN_FORMAT: OWN_META in names,
        "transformers": "config.json" in names and any(f.endswith(".safetensors") for f in root),
        "native": any(_NATIVE_MODEL.fullmatch(f.rpartition("/")[2]) for f in files)}.items() if v}
    if not held:
        raise CheckpointError(
            f"{repo_id}: the repo holds neither config.json + *.safetensors nor model_XXXXXX.pt; "
            "not a nanochat checkpoint repo"
        )
    layout = _choose_layout(repo_id, held, model_format)
    if layout == OWN_FORMAT:
        return "", root
    if layout == "transformers":
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
    meta_path = confined(folder, folder / OWN_META)
    meta = _read_json(meta_path, "it should be written by save_model")
    if meta.get("format") != OWN_FORMAT:
        raise CheckpointError(
            f"{meta_path}: format is {meta.get('format')!r}, not {OWN_FORMAT!r}; not written by save_model"
        )
    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise CheckpointError(f"{meta_path}: no model_config object; the file is corrupt")
    # fields added after a folder was saved take their defaults, which are what the folder held
    missing = [k for k in GPTConfig.__dataclass_fields__ if k not in mc and k not in ("architecture", "window_pattern")]
    if missing:
        raise CheckpointError(f"{meta_path}: model_config lacks {', '.join(missing)}; the file is corrupt")
    config = check_config(mc, meta_path)
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
    else:
        tokenizer = _own_tokenizer(folder, meta.get("tokenizer"), meta_path)
    _check_tokenizer(tokenizer, config, meta_path)
    weights = confined(folder, folder / OWN_WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing beside {OWN_META}; save the model again")
    check_weights(config, _safetensors_shapes([weights]), weights)
    return LoadedModel(_build(config, _load_safetensors_file(weights), weights), tokenizer, config)


def _own_tokenizer(folder: Path, name: object, meta_path: Path) -> Tokenizer:
    """The tokenizer vmap_sweep.json names: 'bytes', or a file of this folder. A link may point only where the
    folder's own files are (a Hugging Face cache links every file of a snapshot to its blobs/ folder)."""
    if name == BYTES:
        return ByteTokenizer()
    if not _plain_name(name):
        raise TokenizerError(f"{meta_path}: tokenizer must be 'bytes' or a file name in this folder, not {name!r}")
    path = folder / name
    homes = _homes(folder)
    if path.exists() and not (path.is_file() and path.resolve().parent in homes):
        raise TokenizerError(f"{path}: the tokenizer {OWN_META} names is not a file of this folder (it leads to "
                             f"{path.resolve()}); copy the tokenizer file into {folder}")
    return load_tokenizer(path)


# ---------------------------------------------------------------------------------------------- shared


def _read_json(path: Path, hint: str) -> dict:
    try:
        data = parse_json(path.read_text(encoding="utf-8"), path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); is the file complete?") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; is this the right file?")
    return data


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


def _build(config: GPTConfig, state: dict, source_file: Path, names: dict | None = None) -> GPT:
    """GPT(config) filled from `state` exactly: same keys, same shapes (checked before the model is allocated),
    floating tensors (stored as float32)."""
    check_weights(config, {k: tuple(v.shape) for k, v in state.items()}, source_file, names)
    converted = {}
    for key, t in state.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{source_file}: {key} is not a floating-point tensor; the file is corrupt")
        converted[key] = t.to(torch.float32)  # wte is bf16 in native checkpoints, everything is bf16 on the Hub
    model = GPT(config)
    model.load_state_dict(converted, strict=True)
    return model
