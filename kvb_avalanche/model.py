"""KVBModel: encoder -> key-value bottleneck -> decoder, as one Avalanche-ready module."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from kvb_avalanche.bottleneck import KeyValueBottleneck
from kvb_avalanche.decoders import VotingDecoder


class KVBModel(nn.Module):
    """A classifier that Avalanche strategies train like any other ``nn.Module``.

    Args:
        encoder: a (pretrained) module mapping inputs to embeddings (batch, dim_embed), or
            ``None`` when the inputs already are embeddings.
        bottleneck: the :class:`KeyValueBottleneck`.
        decoder: maps fetched values to logits (e.g. :class:`VotingDecoder`).

    ``forward`` also accepts integer key indices (batch, codebooks, topk), as produced by
    :meth:`codes`: the encoder and the key search are then skipped. That is how frozen
    keys let a strategy train values from cached codes. Any other integer tensor (uint8
    images, say) is refused with a message saying what the model takes.
    """

    def __init__(
        self, encoder: nn.Module | None, bottleneck: KeyValueBottleneck, decoder: nn.Module
    ) -> None:
        super().__init__()
        if isinstance(decoder, VotingDecoder) and decoder.num_classes != bottleneck.dim_values:
            raise ValueError(
                f"with a VotingDecoder, bottleneck.dim_values must equal num_classes "
                f"({decoder.num_classes}), got dim_values={bottleneck.dim_values}"
            )
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.decoder = decoder

    @property
    def num_classes(self) -> int | None:
        """The decoder's number of classes (None for a decoder that does not say)."""
        return getattr(self.decoder, "num_classes", None)

    def embed(self, x: Tensor) -> Tensor:
        """Inputs -> embeddings; no graph through a frozen encoder."""
        if self.encoder is None:
            return x
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.encoder(x)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Inputs -> key indices (batch, codebooks, topk), the int16 form where it fits."""
        self.bottleneck.check_embeddings(emb := self.embed(x), name="embeddings")
        idx = self.bottleneck.lookup(emb.reshape(-1, self.bottleneck.dim_embed)).indices
        return idx.to(torch.int16) if self.bottleneck.num_pairs <= 2**15 else idx

    def is_codes(self, x: Tensor) -> bool:
        """Whether x is cached codes: integer (batch, codebooks, topk)."""
        return (not x.is_floating_point() and x.dtype != torch.bool and x.dim() == 3
                and x.shape[1] == self.bottleneck.codebooks)

    def forward(self, x: Tensor) -> Tensor:
        if self.is_codes(x):  # (batch, codebooks, topk)
            return self.decoder(self.bottleneck.fetch(x, name="x (cached codes)"))
        if not x.is_floating_point():
            return self.decoder(self.bottleneck(self._embed_integer(x)))
        return self.decoder(self.bottleneck(self.embed(x)))

    def _embed_integer(self, x: Tensor) -> Tensor:
        """Embeddings of an integer input that is not codes: only an encoder may take it."""
        bn = self.bottleneck
        what = (f"KVBModel input x is an integer tensor of shape {tuple(x.shape)} ({x.dtype}); "
                f"the model takes floating-point inputs, or cached codes: integer "
                f"(batch, {bn.codebooks}, topk) key indices in [0, {bn.num_pairs})")
        if self.encoder is None:
            raise ValueError(f"{what}. Without an encoder the inputs are embeddings: float "
                             f"(batch, {bn.dim_embed}).")
        try:
            return self.embed(x)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"{what}. The encoder failed on it ({str(e).splitlines()[0]}): images must "
                f"reach the model as floats, e.g. with torchvision's ToTensor() or "
                f"ToDtype(torch.float32, scale=True) in the transforms."
            ) from e

    def fingerprint(self) -> str:
        """Hash of the frozen state that decides the codes: encoder weights, projection, keys."""
        h = hashlib.sha1(self.bottleneck.fingerprint().encode(), usedforsecurity=False)
        if self.encoder is not None:
            for t in self.encoder.state_dict().values():
                h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
        return h.hexdigest()

    def freeze_encoder(self) -> None:
        """Freeze the encoder's parameters and keep it in eval mode (batch-norm statistics)."""
        if self.encoder is None:
            return
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> KVBModel:
        super().train(mode)
        if self.encoder is not None and not any(p.requires_grad for p in self.encoder.parameters()):
            self.encoder.eval()  # a frozen encoder never leaves eval mode
        return self
