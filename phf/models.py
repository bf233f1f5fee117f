"""Build the causal language model a run trains: random init from a GPT-2 config or pretrained."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from phf.tokenizer import load_tokenizer


def build_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The model config's tokenizer, or the pretrained model's own when none is named."""
    name = cfg.tokenizer or cfg.pretrained
    if name is None:
        raise ValueError("model.tokenizer is null and there is no model.pretrained to take it from")
    return load_tokenizer(name)


def build_model(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> PreTrainedModel:
    if cfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        architecture = OmegaConf.to_container(cfg.architecture, resolve=True)
        dropout = architecture.pop("dropout", 0.0)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **architecture,
        )
        model = GPT2LMHeadModel(config)
    max_positions = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if max_positions is not None and block_size > max_positions:
        raise ValueError(
            f"train.block_size={block_size} exceeds the model's {max_positions} positions; "
            f"lower train.block_size or raise model.architecture.n_positions"
        )
    return model
