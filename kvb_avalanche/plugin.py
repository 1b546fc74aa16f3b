"""KVBPlugin: the key-value bottleneck's lifecycle, wired to Avalanche's hooks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import DataLoader

from kvb_avalanche.decoders import VotingDecoder
from kvb_avalanche.keys import KeyFitConfig, fit_keys
from kvb_avalanche.model import KVBModel


class _Embedded:
    """Re-iterable view of a loader of model inputs as embedding batches."""

    def __init__(self, loader: Iterable, model: KVBModel, device: torch.device) -> None:
        self.loader, self.model, self.device = loader, model, device

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            with torch.no_grad():
                yield self.model.embed(x.to(self.device))


class KVBPlugin(SupervisedPlugin):
    """Freeze the encoder, fit the keys without labels, freeze them; then only values learn.

    Acts at the start of the first training experience, before its dataset is adapted, so
    every later hook (a code cache, replay) sees frozen keys; or on an explicit
    :meth:`prepare`. The state it leaves (``keys_initialized``, ``keys_frozen``) lives in the
    model's ``state_dict``, so a checkpointed strategy resumes without refitting.

    Args:
        key_init_loader: unlabelled model inputs (batches, or tuples whose first item is the
            batch) to fit keys on; ``None`` uses the first experience's training inputs.
        key_fit: EMA k-means settings.
        freeze_decoder: freeze the decoder's parameters; ``None`` freezes it only when it
            is the non-parametric :class:`VotingDecoder`.
        batch_size: batch size of the loader built from an experience.
        progress: show a progress bar while fitting.
    """

    def __init__(
        self,
        key_init_loader: Iterable | None = None,
        key_fit: KeyFitConfig | None = None,
        freeze_decoder: bool | None = None,
        batch_size: int = 256,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.key_init_loader = key_init_loader
        self.key_fit = key_fit or KeyFitConfig()
        self.freeze_decoder = freeze_decoder
        self.batch_size = batch_size
        self.progress = progress

    def before_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        self.prepare(strategy.model, strategy.experience, strategy.device)

    def prepare(self, model: KVBModel, experience=None, device: str | torch.device = "cpu") -> None:
        """Freeze encoder (and decoder), fit and freeze keys once; idempotent."""
        if not isinstance(model, KVBModel):
            raise TypeError(f"KVBPlugin needs a KVBModel, got {type(model).__name__}")
        model.freeze_encoder()
        freeze = self.freeze_decoder
        if freeze if freeze is not None else isinstance(model.decoder, VotingDecoder):
            model.decoder.requires_grad_(False)
        bottleneck = model.bottleneck
        if bool(bottleneck.keys_frozen):
            return
        loader = self.key_init_loader
        if loader is None:
            if experience is None:
                raise ValueError("prepare() needs key_init_loader or an experience to fit keys on")
            loader = DataLoader(experience.dataset, batch_size=self.batch_size, shuffle=False)
        fit_keys(bottleneck, _Embedded(loader, model, torch.device(device)), self.key_fit,
                 progress=self.progress)
        bottleneck.freeze_keys()
