"""The models a run trains: a causal LM (random init from a GPT-2 config, or pretrained weights
from the hub, a local path or an MLflow run) and, for AWR, a value head on its last hidden state.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from phf.tokenizer import CONTROL_TOKENS, load_tokenizer
from phf.tracking import resolve_model_source

VALUE_HEAD_FILE = "value_head.safetensors"


def resolve_source(source: str) -> str:
    """A hub id or local path for ``from_pretrained``: MLflow model URIs are downloaded."""
    return resolve_model_source(source)


class ValueHead(nn.Module):
    """One linear layer from the LM's last hidden state to a scalar per position.

    Zero-initialised: it predicts 0 until trained, which makes RWR (AWR with no value training)
    exactly AWR with a zero baseline.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states).squeeze(-1)


class Network(nn.Module):
    """The trained modules as one: the LM and, for AWR, its value head. One module, so that
    DistributedDataParallel can wrap it whole; ``forward`` gives logits and values."""

    def __init__(self, model: PreTrainedModel, value_head: ValueHead | None) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.value_head is None:
            return self.model(input_ids=input_ids).logits, None
        output = self.model(input_ids=input_ids, output_hidden_states=True)
        return output.logits, self.value_head(output.hidden_states[-1])


def _random_gpt2(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    architecture = OmegaConf.to_container(cfg.architecture, resolve=True)
    dropout = architecture.pop("dropout", 0.0)
    # GPT-2's tanh approximation of GELU as one fused kernel: the same function as "gelu_new",
    # which is five elementwise ops (10% of a CPU step of the tiny model).
    architecture.setdefault("activation_function", "gelu_pytorch_tanh")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **architecture,
    )
    return GPT2LMHeadModel(config)


def add_control_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a pretrained model the conditional-training control tokens.

    Tokens the tokenizer lacks are added as special tokens; either way their embeddings (input,
    and output when untied) are set to the mean of the other tokens' embeddings plus small noise,
    so that they start as an average token rather than untrained noise.
    """
    missing = [t for t in CONTROL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(CONTROL_TOKENS))
    others = torch.ones(model.get_input_embeddings().num_embeddings, dtype=torch.bool)
    others[ids] = False
    with torch.no_grad():
        for embedding in {model.get_input_embeddings(), model.get_output_embeddings()}:
            if embedding is None:
                continue
            weight = embedding.weight
            mean, std = weight[others].mean(dim=0), weight[others].std()
            weight[ids] = mean + 0.01 * std * torch.randn(len(ids), weight.size(1))


def load_model_and_tokenizer(
    cfg: DictConfig, block_size: int, control_tokens: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of the ``model`` config.

    ``cfg.pretrained``: a hub id, a local path or an MLflow model URI (runs:/<id>/model), or
    null for a random GPT-2 from ``cfg.architecture``. ``cfg.tokenizer``: ``builtin``, a hub id
    or path, or null for the pretrained model's own. ``control_tokens`` prepares a pretrained
    model for conditional training (see add_control_tokens).
    """
    source = resolve_source(cfg.pretrained) if cfg.pretrained else None
    tokenizer_name = cfg.tokenizer or source
    if tokenizer_name is None:
        raise ValueError("model.tokenizer is null and there is no model.pretrained to take it from")
    tokenizer = load_tokenizer(resolve_source(tokenizer_name))
    if source is None:
        model = _random_gpt2(cfg, tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(source)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        if control_tokens:
            add_control_tokens(model, tokenizer)
    max_positions = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if max_positions is not None and block_size > max_positions:
        raise ValueError(
            f"train.block_size={block_size} exceeds the model's {max_positions} positions; "
            f"lower train.block_size or raise model.architecture.n_positions"
        )
    return model, tokenizer


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position of each row's last real token (mask 1), under left or right padding alike:
    a sequence-level quantity (a reward, a score) belongs there, never on a pad token, which
    may well have the same id as EOS."""
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so that a left-padded row is seen exactly as the
    same row unpadded (what ``generate`` does internally)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
