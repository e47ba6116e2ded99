"""vmap-sweep: train many fine-tunes of one LLM at once and map where fine-tuning converges."""

from vmap_sweep.errors import VmapSweepError
from vmap_sweep.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "VmapSweepError", "load_model"]


def __getattr__(name):
    # load_model pulls in tokenizers and huggingface_hub; import it only when asked for.
    if name == "load_model":
        from vmap_sweep.model.checkpoint import load_model

        return load_model
    raise AttributeError(name)
