"""Students made from their teacher by keeping every k-th layer (DistilBERT's recipe).

Sanh et al. (2019) initialise DistilBERT from BERT by taking one layer out of two; the
student keeps the teacher's width, embeddings, final norm and output layer.
:func:`student_from_teacher` does the same for decoder-only ``transformers`` models
(Llama-, Mistral-, Qwen- and GPT-2-style: any model whose decoder layers are one
``nn.ModuleList`` with ``config.num_hidden_layers`` entries).
"""

from __future__ import annotations

import copy
from typing import Any, cast

from torch import nn

__all__ = ["kept_layers", "student_from_teacher"]


def kept_layers(num_layers: int, every_k: int) -> list[int]:
    """Indices of the layers kept: ``0, k, 2k, ...``.

    Example:
        >>> kept_layers(12, 2)
        [0, 2, 4, 6, 8, 10]
        >>> kept_layers(5, 2)
        [0, 2, 4]
    """
    return list(range(0, num_layers, every_k))


def _layer_list(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, ModuleList)`` of the decoder layers."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(found) != 1:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: expected one "
            f"nn.ModuleList of config.num_hidden_layers={num_layers} modules, found "
            f"{[name for name, _ in found]}"
        )
    name, layers = found[0]
    parent_name, _, attribute = name.rpartition(".")
    return model.get_submodule(parent_name), attribute, layers


def student_from_teacher(teacher: nn.Module, every_k: int) -> nn.Module:
    """A new model with the teacher's layers ``0, k, 2k, ...`` and everything else copied.

    The student is a fresh instance of the teacher's class built from the teacher's
    config with ``num_hidden_layers = ceil(L / k)`` (per-layer config lists such as
    ``layer_types`` are cut the same way), loaded with the teacher's weights (strictly:
    every parameter and buffer is accounted for) and in training mode.  The teacher is not
    modified.

    Raises:
        ValueError: ``every_k`` not an integer >= 1, or no single list of decoder layers.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=4, num_attention_heads=2))
        >>> student_from_teacher(teacher, 2).config.num_hidden_layers
        2
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"every_k must be an integer >= 1, got {every_k!r}")
    config: Any = teacher.config  # a transformers PretrainedConfig (untyped package)
    num_layers = int(config.num_hidden_layers)
    keep = kept_layers(num_layers, every_k)
    pruned = copy.deepcopy(teacher)
    parent, attribute, layers = _layer_list(pruned, num_layers)
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():  # attention modules index the KV cache by layer
            if isinstance(getattr(module, "layer_idx", None), int):
                cast(Any, module).layer_idx = new_index  # an int attribute, not a submodule
    setattr(parent, attribute, new_layers)

    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(keep)
    for name, value in list(vars(student_config).items()):
        if isinstance(value, list) and len(value) == num_layers and name != "architectures":
            setattr(student_config, name, [value[i] for i in keep])
    student = type(teacher)(student_config)
    student.load_state_dict(pruned.state_dict(), strict=True)
    first = next(teacher.parameters())
    return student.to(device=first.device, dtype=first.dtype).train()
