"""A two-layer HF Llama classifier (tiny LlamaConfig, random weights, nothing downloaded) for FSDP training tests."""

import torch
import transformers
from torch import nn
from torch.utils.data import TensorDataset

CLASSES, VOCAB, SEQ = 4, 64, 16


class LlamaClassifier(nn.Module):
    """``LlamaForSequenceClassification`` returning the logits tensor (strfx train wants a plain classifier)."""

    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=SEQ,
                                       num_labels=CLASSES, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        self.llama = transformers.LlamaForSequenceClassification(cfg)
        self.llama.config.use_cache = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=ids).logits


def build_model() -> nn.Module:
    return LlamaClassifier()


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randint(3, VOCAB, (2, SEQ)),)


def _split(n: int, seed: int) -> TensorDataset:
    """The class is the most frequent of four marker tokens: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randint(8, VOCAB, (n, SEQ), generator=g)
    x[:, : SEQ // 2] = (3 + y)[:, None]
    return TensorDataset(x, y)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    return _split(256, 1), _split(64, 2)
