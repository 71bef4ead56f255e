"""Where the parts of a checkpoint live in memory: the language model, its decoder layers, the towers.

Quantization touches the decoder layers only (by default); everything else (vision and audio towers,
their projectors/mergers, embeddings, final norm, ``lm_head``) is *kept* and must come back bit for
bit. Finding these parts from the model object itself, rather than from name patterns, is what
makes the default safe: in transformers 5 a Qwen2-VL tower lives at ``model.visual`` in memory but
is saved as ``visual``, and an ignore pattern written for one of the two names silently misses the
other. Here nothing is matched by name: llm-compressor is handed the decoder module alone, so a
tower cannot be quantized or smoothed by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omniserve.quantize.errors import QuantizationFailed


@dataclass
class ModelLayout:
    """The parts of one loaded model that quantization needs, with their names in ``model.named_modules()``."""

    model: Any  # the full model as loaded (what is saved)
    lm: Any  # (input_ids, media) -> logits: the thinker of an Omni checkpoint, else the model itself
    decoder: Any  # the text decoder stack (embeddings, layers, final norm), e.g. Qwen2Model
    lm_name: str  # "" or "thinker"
    decoder_name: str  # e.g. "model", "model.language_model", "thinker.model"
    layers_name: str  # the decoder layers' ModuleList, e.g. "thinker.model.layers"

    @property
    def is_multimodal(self) -> bool:
        """Whether the language model holds more than its decoder and head (towers, projectors)."""
        import torch

        inside = {id(m) for m in self.decoder.modules()}
        head = self.lm.get_output_embeddings() if hasattr(self.lm, "get_output_embeddings") else None
        return any(isinstance(m, torch.nn.Linear) and id(m) not in inside and m is not head for m in self.lm.modules())

    def scope(self, quantize_towers: bool) -> tuple[Any, str]:
        """The module handed to llm-compressor and its name: the decoder, or the whole LM with towers."""
        return (self.lm, self.lm_name) if quantize_towers else (self.decoder, self.decoder_name)

    def scope_ignore(self, quantize_towers: bool) -> list[str]:
        """Names (relative to the scope) always kept: ``lm_head``, which is only in scope with the towers, and
        without them, the linear layers a decoder holds outside its layers, kept like its embeddings: towers some
        decoders carry themselves (Phi-4-multimodal's ``embed_tokens_extend``), projections around the layers
        (Gemma 3n's AltUp); most decoders hold none."""
        import torch

        if not quantize_towers:
            layers = self.layers_name.removeprefix(f"{self.decoder_name}.") if self.decoder_name else self.layers_name
            return [
                name
                for name, module in self.decoder.named_modules()
                if isinstance(module, torch.nn.Linear) and name != layers and not name.startswith(f"{layers}.")
            ]
        head = self.lm.get_output_embeddings() if hasattr(self.lm, "get_output_embeddings") else None
        return [name for name, module in self.lm.named_modules() if head is not None and module is head]

    def kept_parameters(self, targeted_modules: set[str]) -> list[str]:
        """Full names of the parameters that must be unchanged by quantization.

        Everything outside the decoder layers that llm-compressor will not quantize. Inside the layers,
        norms may legitimately change (AWQ folds its scales into them), so they are not promised.
        """
        prefix = self.layers_name + "."
        kept = []
        for module_name, module in self.model.named_modules():
            if module_name in targeted_modules or module_name.startswith(prefix) or module_name == self.layers_name:
                continue
            for param_name, _ in module.named_parameters(recurse=False):
                kept.append(f"{module_name}.{param_name}" if module_name else param_name)
        return kept


def find_layout(model: Any) -> ModelLayout:
    """Locate the LM, decoder and decoder layers of ``model`` (any transformers causal or multimodal LM)."""
    import torch

    lm = model.thinker if hasattr(model, "thinker") else model
    if not hasattr(lm, "get_decoder"):
        raise QuantizationFailed(f"{type(lm).__name__} has no get_decoder(): cannot find its text decoder")
    decoder = lm.get_decoder()
    names = {id(m): name for name, m in model.named_modules()}
    if id(decoder) not in names or decoder is lm:
        raise QuantizationFailed(f"cannot locate the text decoder inside {type(model).__name__}")
    expected = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    layers = [
        name
        for name, child in decoder.named_children()
        if isinstance(child, torch.nn.ModuleList) and (expected is None or len(child) == expected)
    ]
    if len(layers) != 1:
        raise QuantizationFailed(
            f"cannot tell the decoder layers of {type(decoder).__name__} apart (candidates: {layers or 'none'})"
        )
    decoder_name = names[id(decoder)]
    return ModelLayout(
        model=model,
        lm=lm,
        decoder=decoder,
        lm_name=names[id(lm)],
        decoder_name=decoder_name,
        layers_name=f"{decoder_name}.{layers[0]}",
    )


def qualified(scope_name: str, name: str) -> str:
    """``name`` inside the module called ``scope_name`` as a full name in the model."""
    return f"{scope_name}.{name}" if scope_name and name else scope_name or name
