"""PEFT LoRA adapters as experts: recognising an adapter folder, and which model its side files come from.

The tensor work (factor statistics, B + ΔW, adapter tensors) is the engine's; this module only deals
with folders and JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from layerswap_fast.errors import InvalidModelError
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


def _read_config(adapter: Path) -> dict[str, Any]:
    """An adapter's adapter_config.json (the engine has validated it already)."""
    try:
        cfg = json.loads((Path(adapter) / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InvalidModelError(f"{Path(adapter) / CONFIG_FILE}: not valid JSON ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


def write_adapter_config(stage: Path, emitted: dict[str, Any], base: Optional[Path], safety: Path, expert: Path) -> str:
    """Writes the ``adapter_config.json`` of an adapter the engine emitted into ``stage``: every module
    by its exact name, with its own rank and alpha through ``rank_pattern`` / ``alpha_pattern`` (the
    scale is alpha / r: rsLoRA scales were turned into plain ones by the engine). Returns the file name."""
    s_cfg, m_cfg = _read_config(safety), _read_config(expert)
    modules = emitted["modules"]
    # Keys are regular expressions to PEFT: escape the dots so that a key names exactly one module.
    key = re.escape
    first = modules[0] if modules else {"rank": 8, "alpha": 8.0}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": m_cfg.get("task_type") or s_cfg.get("task_type"),
        "base_model_name_or_path": m_cfg.get("base_model_name_or_path") or s_cfg.get("base_model_name_or_path") or (str(base) if base is not None else None),
        "r": first["rank"],
        "lora_alpha": first["alpha"],
        "rank_pattern": {key(m["module"]): m["rank"] for m in modules},
        "alpha_pattern": {key(m["module"]): m["alpha"] for m in modules},
        "target_modules": [m["module"] for m in modules],
        "modules_to_save": emitted["modules_to_save"] or None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": emitted["fan_in_fan_out"],
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return CONFIG_FILE
