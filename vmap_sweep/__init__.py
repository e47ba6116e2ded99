"""vmap-sweep: train many fine-tunes of one LLM at once and map where fine-tuning converges."""

from vmap_sweep.errors import VmapSweepError

__all__ = ["GPT", "GPTConfig", "VmapSweepError", "load_model"]


def __getattr__(name):
    # Imported only when asked for: the model pulls in torch, load_model tokenizers and huggingface_hub, and the
    # command line (vmap_sweep.cli) must be able to answer Ctrl-C before any of them has loaded.
    if name in ("GPT", "GPTConfig"):
        from vmap_sweep.model import gpt

        return getattr(gpt, name)
    if name == "load_model":
        from vmap_sweep.model.checkpoint import load_model

        return load_model
    raise AttributeError(name)
