"""Load and save models and tokenizers: any local Hugging Face directory, or a built-in tiny model by name.

Built-in names:
  tiny-random[-SHAPE]  a randomly initialised character-level Llama (SHAPE: nano, micro, small, base)
  tiny-base            the shipped pretrained base model of the miniature world (ponder/assets/tiny-base)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ponder.errors import UserError
from ponder.models.tiny import TINY_SHAPES, tiny_random

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def builtin_names() -> list[str]:
    shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file()) if ASSETS.is_dir() else []
    return ["tiny-random"] + [f"tiny-random-{s}" for s in TINY_SHAPES] + shipped


def resolve(path: str) -> Path | str:
    """A local directory, a shipped model's directory, or a tiny-random name (returned as is)."""
    if path.startswith("tiny-random"):
        shape = path[len("tiny-random-"):] if path != "tiny-random" else "nano"
        if shape not in TINY_SHAPES:
            raise UserError(f"unknown built-in model '{path}'; choose one of: {', '.join(builtin_names())}")
        return path
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model directory '{p}' has no config.json; give a Hugging Face model directory")
        return p
    if (ASSETS / path / "config.json").is_file():
        return ASSETS / path
    raise UserError(
        f"model '{path}' not found: give a local Hugging Face model directory or a built-in name "
        f"({', '.join(builtin_names())})"
    )


def load(path: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) for a directory or built-in name. Tokenizers pad on the left for generation."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ponder's own progress display is the one the user watches
    where = resolve(path)
    if isinstance(where, str):
        shape = where[len("tiny-random-"):] if where != "tiny-random" else "nano"
        model, tok = tiny_random(shape, seed)
        return model.to(dtype), tok
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model '{where}': {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:  # many base models ship without one; generation and batching need it
        tok.pad_token = tok.eos_token
    return model, tok


def save(model, tokenizer, directory: str | Path) -> None:
    """Save in Hugging Face format (safetensors), merging LoRA adapters so the result loads anywhere."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # peft: write a plain model; adapters are kept by the trainer state
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def load_trainable(model_cfg, last=None, state: dict | None = None, seed: int = 0, device="cpu"):
    """The model a trainer updates, in train mode on `device`: the checkpoint `last` with its full
    weights, or (LoRA) the base model plus fresh adapters, loaded from `state["adapter"]` on resume."""
    source = str(last) if (last is not None and model_cfg.lora is None) else model_cfg.path
    model, tok = load(source, seed=seed)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if model_cfg.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError("model.lora needs peft: pip install 'ponder[lora]'") from None
        lc = model_cfg.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules))
        if state is not None:
            model.load_state_dict(state["adapter"], strict=False)
    return model.to(device).train(), tok
