"""LoRA adapters (PEFT) for the finetuning stages: sft, dpo, reward and ppo.

With ``model.lora.r > 0`` the model's target modules get low-rank adapters and only those (and
a task head: a reward model's score, PPO's value head) train. A checkpoint holds the adapters
(``adapter_model.safetensors``; the base weights are ``model.pretrained``, which a resume must
name again: its config is compared); the published model is merged, a plain ``from_pretrained``
model, so every ``runs:/<id>/model`` reference works on it as on any other. Where a frozen
copy of the starting model is needed (DPO's reference, PPO's), the adapters are switched off
instead: the base weights are the starting model, and no second copy is kept in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

ADAPTER_FILE = "adapter_model.safetensors"


def enabled(lora: DictConfig) -> bool:
    return int(lora.r) > 0


def with_lora(model: PreTrainedModel, lora: DictConfig, task_type: str) -> PreTrainedModel:
    """``model`` with adapters (PEFT's ``CAUSAL_LM`` or ``SEQ_CLS`` task: the latter keeps the
    classification head trainable), or ``model`` itself when LoRA is off."""
    if not enabled(lora):
        return model
    targets = OmegaConf.to_container(lora.target_modules) if lora.target_modules else None
    config = LoraConfig(
        r=int(lora.r),
        lora_alpha=float(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=targets,
        task_type=task_type,
        # GPT-2's attention and MLP are Conv1D layers, whose weights are stored transposed.
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def base_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside, a LoRA model computes with its base weights only (the adapters switched off);
    any other model is left as it is."""
    if is_lora(model):
        with model.disable_adapter():
            yield
    else:
        yield


def save_adapters(model: PeftModel, directory: Path) -> None:
    model.save_pretrained(directory)  # adapter_config.json + adapter_model.safetensors


def load_adapters(model: PeftModel, directory: Path) -> None:
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_FILE), device=str(device)))


def merged(model: torch.nn.Module) -> PreTrainedModel:
    """The plain model with the adapters merged into its weights (in place)."""
    return model.merge_and_unload() if is_lora(model) else model


def trainable(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
