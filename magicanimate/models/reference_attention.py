"""Reference attention: the appearance encoder's spatial self-attention inputs joined into the video UNet's.

MagicAnimate runs an appearance encoder (an SD 1.5 UNet) on the clean latent of the reference image and keeps the
input of each fused ``attn1`` (the block's ``norm1`` output). In the video UNet's ``attn1`` of the same name,
conditional rows attend over ``[own tokens ; reference tokens]`` with the video UNet's own ``to_k``/``to_v``, and
unconditional rows do plain self-attention. Both sides are diffusers attention processors, installed by
:class:`ReferenceAttentionControl`; nothing in diffusers is patched.
"""

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

FUSION_BLOCKS = {"midup": ("mid_block", "up_blocks"), "full": ("down_blocks", "mid_block", "up_blocks")}


def reference_layer_names(model: nn.Module, fusion_blocks: str = "midup") -> list[str]:
    """Names of the spatial self-attention layers that take part (``...transformer_blocks.N.attn1``).

    "midup" selects the mid block and up blocks (10 layers in SD 1.5), "full" the whole UNet (16). Motion modules
    also hold ``attn1`` layers; they are never fused.
    """
    if fusion_blocks not in FUSION_BLOCKS:
        raise ValueError(f"fusion_blocks must be one of {sorted(FUSION_BLOCKS)}, got {fusion_blocks!r}")
    prefixes = FUSION_BLOCKS[fusion_blocks]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, Attention)
        and name.endswith("attn1")
        and ".attentions." in name
        and "motion_modules" not in name
        and name.startswith(prefixes)
    ]


class ReferenceWriteProcessor(AttnProcessor2_0):
    """Keeps the input of an appearance-encoder ``attn1`` (the reference tokens), then attends as usual."""

    def __init__(self):
        super().__init__()
        self.bank: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.bank = hidden_states
        return super().__call__(attn, hidden_states, *args, **kwargs)


class ReferenceReadProcessor(AttnProcessor2_0):
    """Self-attention of the video UNet that also attends to the reference tokens, on conditional rows only.

    ``reference`` is ``(1, tokens, C)``, shared by every frame; ``conditional`` is a bool per batch item of the UNet
    call (its rows are ``batch * frames``, frame index fastest). With no reference set it is plain self-attention.
    The reference keys and values are projected once per reference (i.e. once per denoising step) and broadcast to
    every frame and window, instead of projecting a per-frame copy of the reference tokens as the original does.

    With several references (keyframes: ``set_reference`` given ``(K, tokens, C)``), ``banks`` says per row which one
    a conditional row attends to (a tuple of ints, one per row of the call); rows with the same bank in a run are one
    attention call.
    """

    def __init__(self):
        super().__init__()
        self.conditional: tuple[bool, ...] | None = None
        self.banks: tuple[int, ...] | None = None
        self.set_reference(None)

    def set_reference(self, reference: torch.Tensor | None) -> None:
        self.reference = reference
        self._banks = list(reference.split(1)) if reference is not None else []  # (1, tokens, C) each
        self._reference_kv = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        plain = super().__call__
        conditional = self.conditional
        if self.reference is None or not conditional or not any(conditional):
            return plain(attn, hidden_states, attention_mask=attention_mask, temb=temb)
        if self.banks is not None:
            return self.attend_with_banks(attn, hidden_states, plain)
        if all(conditional):
            return self.attend_with_reference(attn, hidden_states)
        # Runs of batch items with the same flag, picked by Python bools: the split is fixed when torch.compile traces
        # the call (no graph break), shapes never depend on tensor values (any device, even "meta"), and no index
        # tensor is copied to the device in every layer. The pipeline's calls are two runs: unconditional, conditional.
        per_item = hidden_states.shape[0] // len(conditional)
        pieces, first = [], 0
        for item in range(1, len(conditional) + 1):
            if item == len(conditional) or conditional[item] != conditional[first]:
                rows = hidden_states[first * per_item : item * per_item]
                pieces.append(self.attend_with_reference(attn, rows) if conditional[first] else plain(attn, rows))
                first = item
        return torch.cat(pieces)

    def attend_with_banks(self, attn: Attention, hidden_states: torch.Tensor, plain) -> torch.Tensor:
        """Runs of rows with the same label (``None``: unconditional, else the bank index), each attended at once."""
        per_item = hidden_states.shape[0] // len(self.conditional)
        labels = [self.banks[row] if self.conditional[row // per_item] else None for row in range(len(self.banks))]
        pieces, first = [], 0
        for row in range(1, len(labels) + 1):
            if row == len(labels) or labels[row] != labels[first]:
                rows = hidden_states[first:row]
                label = labels[first]
                pieces.append(plain(attn, rows) if label is None else self.attend_with_reference(attn, rows, label))
                first = row
        return torch.cat(pieces)

    def attend_with_reference(self, attn: Attention, hidden_states: torch.Tensor, bank: int = 0) -> torch.Tensor:
        """``softmax(q k^T) v`` with keys/values over ``[own tokens ; reference tokens]``, by ``attn``'s weights."""
        if bank not in self._reference_kv:
            reference = self._banks[bank].to(hidden_states.dtype)
            self._reference_kv[bank] = (attn.to_k(reference), attn.to_v(reference))
        reference_key, reference_value = self._reference_kv[bank]
        rows = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = torch.cat([attn.to_k(hidden_states), reference_key.expand(rows, -1, -1)], dim=1)
        value = torch.cat([attn.to_v(hidden_states), reference_value.expand(rows, -1, -1)], dim=1)
        head_dim = query.shape[-1] // attn.heads
        query, key, value = (x.view(rows, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


class ReferenceAttentionControl:
    """Pairs the appearance encoder's fused ``attn1`` layers with the video UNet's, by module name.

    Usage per denoising step: ``control.clear()``; run the appearance encoder; ``control.load_reference()``; then
    for every UNet call ``control.set_conditional(mask)`` (which batch items see the reference) and run the UNet.
    """

    def __init__(self, appearance_encoder: nn.Module, unet: nn.Module, fusion_blocks: str = "midup"):
        names = reference_layer_names(unet, fusion_blocks)
        missing = set(names) - set(reference_layer_names(appearance_encoder, fusion_blocks))
        if missing:
            raise ValueError(f"appearance encoder lacks fused layers {sorted(missing)}")
        self.fusion_blocks = fusion_blocks
        self.appearance_encoder, self.unet = appearance_encoder, unet
        self.writers = {name: ReferenceWriteProcessor() for name in names}
        self.readers = {name: ReferenceReadProcessor() for name in names}
        self.install()

    def install(self) -> None:
        """Put this control's processors on the fused layers (again, if something replaced them)."""
        for name in self.writers:
            self.appearance_encoder.get_submodule(name).set_processor(self.writers[name])
            self.unet.get_submodule(name).set_processor(self.readers[name])

    def load_reference(self, count: int = 1) -> None:
        """Hand the banks the appearance encoder just wrote to the video UNet: its last ``count`` rows (one per
        reference; with one reference the last row, the conditional one of the original's batch of two)."""
        for name, reader in self.readers.items():
            reader.set_reference(self.writers[name].bank[-count:])

    def set_conditional(self, conditional, banks=None) -> None:
        """``conditional``: a bool per batch item of the next UNet call (a tensor or a sequence); only those items
        attend to the reference. Kept as Python bools, read outside any compiled region: the processors then never
        branch on tensor values, which would break a ``torch.compile`` graph (or sync a GPU) in every layer.
        ``banks``: with several references, the reference of every row of the call (``batch * frames`` ints)."""
        if isinstance(conditional, torch.Tensor):
            conditional = conditional.tolist()
        conditional = tuple(bool(c) for c in conditional)
        banks = tuple(int(b) for b in banks) if banks is not None else None
        for reader in self.readers.values():
            reader.conditional = conditional
            reader.banks = banks

    def clear(self) -> None:
        for writer in self.writers.values():
            writer.bank = None
        for reader in self.readers.values():
            reader.set_reference(None)
            reader.conditional = None
            reader.banks = None
