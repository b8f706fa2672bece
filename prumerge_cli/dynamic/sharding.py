"""FSDP (PyTorch's `fully_shard`) for runs that train the LM on several processes: every module the decoder
loop calls that holds trained weights is sharded on its own, so that the loop's direct calls gather and free
them; the frozen vision tower stays whole on every process."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import PrumergeError
from .model import DynamicLlava


def shard_trained_parts(dynamic: DynamicLlava, train_projector: bool, dtype: torch.dtype | None) -> list[nn.Module]:
    """Shard the LM's layers, embeddings, norm and head, the predictors and (if trained) the projector; weights
    are gathered in `dtype` (fp32 if None), gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = dynamic.lm.model
    if model.config.text_config.tie_word_embeddings:
        raise PrumergeError("training the LM with FSDP needs untied embeddings and LM head")
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    decoder = dynamic.decoder
    modules = [*decoder.layers, decoder.embed_tokens, decoder.norm, model.lm_head, *dynamic.predictors.children()]
    if train_projector:
        modules.append(model.model.multi_modal_projector)
    for module in modules:
        fully_shard(module, mp_policy=policy)
    return modules


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every process must call it), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
