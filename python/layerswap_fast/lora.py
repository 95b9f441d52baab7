"""PEFT LoRA adapters as experts: recognising an adapter folder, and which model its side files come from.

The tensor work (factor statistics, B + ΔW, adapter tensors) is the engine's; this module only deals
with folders and JSON.
"""

from __future__ import annotations

from pathlib import Path

from layerswap_fast.folder import TOKENIZER_FILES

#: The file that makes a folder a PEFT adapter.
CONFIG_FILE = "adapter_config.json"
#: The adapter weights PEFT saves (``adapter_model.bin`` is not read).
WEIGHTS_FILE = "adapter_model.safetensors"


def is_adapter(path: Path) -> bool:
    """True when ``path`` is a PEFT adapter folder (it has ``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def model_of(path: Path, base: Path) -> Path:
    """The model whose config describes ``path``: the base model for an adapter, else ``path`` itself."""
    return Path(base) if is_adapter(path) else Path(path)


def tokenizer_of(path: Path, base: Path) -> Path:
    """Where the tokenizer of ``path`` lives: an adapter folder's own tokenizer files when it has any
    (adapters trained with added tokens save them), else the base model's."""
    p = Path(path)
    if is_adapter(p) and not any((p / name).is_file() for name in TOKENIZER_FILES):
        return Path(base)
    return p
