"""KVBPlugin and FrozenCodesPlugin: the key-value bottleneck's lifecycle and its code cache,
wired to Avalanche's hooks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kvb_avalanche.avalanche_api import tensor_classification_dataset
from kvb_avalanche.codes import (
    CodeMemo,
    CodesLoader,
    content_hash,
    plain_loader_settings,
    random_transforms,
    read_dataset,
)
from kvb_avalanche.decoders import VotingDecoder
from kvb_avalanche.keys import KeyFitConfig, fit_keys
from kvb_avalanche.model import KVBModel

log = logging.getLogger(__name__)

CacheCodes = bool | Literal["auto"]


def check_model(model: object, who: str) -> KVBModel:
    """``model`` if it is a KVBModel, else a TypeError naming ``who`` and the expected form."""
    if not isinstance(model, KVBModel):
        raise TypeError(
            f"{who} needs model=KVBModel(encoder, KeyValueBottleneck(...), decoder), got "
            f"{type(model).__name__}: wrap the encoder (or None for embeddings), a "
            f"KeyValueBottleneck and a decoder such as VotingDecoder in a KVBModel"
        )
    return model


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

    Periodic evaluation (``eval_every >= 0``) evaluates before the first experience. With
    ``key_init_loader`` the keys are fitted first (``before_training``). :class:`KVBStrategy`
    also fits them first without it, on the experience about to be trained. Under another
    template, with no key data yet, that evaluation reports the untrained model: every
    input gets key 0 of each codebook, whose value is untrained, so all inputs get the
    same logits (chance level); a warning says so once.

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
        self._warned_unfitted = False

    def before_training(self, strategy, **kwargs) -> None:
        check_model(strategy.model, "KVBPlugin")
        if self.key_init_loader is not None:
            self.prepare(strategy.model, None, strategy.device)

    def before_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        self.prepare(strategy.model, strategy.experience, strategy.device)

    def before_eval_forward(self, strategy, **kwargs) -> None:
        bottleneck = check_model(strategy.model, "KVBPlugin").bottleneck
        if bool(bottleneck.keys_initialized):
            return
        if not self._warned_unfitted:
            log.warning("KVBPlugin: evaluating before any key was fitted (eval_every >= 0 "
                        "without key_init_loader): this evaluation gives every input the "
                        "same, untrained value codes, i.e. chance level. Pass key_init_loader, "
                        "or use KVBStrategy, which fits the keys before it.")
            self._warned_unfitted = True
        x = strategy.mbatch[0]
        strategy.mbatch[0] = torch.zeros(len(x), bottleneck.codebooks, bottleneck.topk,
                                         dtype=torch.long, device=x.device)

    def prepare(self, model: KVBModel, experience=None, device: str | torch.device = "cpu") -> None:
        """Freeze encoder (and decoder), fit and freeze keys once; idempotent."""
        check_model(model, "KVBPlugin")
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
            if len(experience.dataset) == 0:
                raise ValueError(
                    f"experience {experience.current_experience} is empty: the keys are fitted "
                    "on the first training experience's inputs when there is no "
                    "key_init_loader; pass key_init_loader (unlabelled inputs) or a non-empty "
                    "first experience")
            # its own generator: fitting keys draws nothing from the global RNG
            loader = DataLoader(experience.dataset, batch_size=self.batch_size, shuffle=False,
                                collate_fn=getattr(experience.dataset, "collate_fn", None),
                                generator=torch.Generator())
        fit_keys(bottleneck, _Embedded(loader, model, torch.device(device)), self.key_fit,
                 progress=self.progress)
        bottleneck.freeze_keys()


class FrozenCodesPlugin(SupervisedPlugin):
    """Train and evaluate a :class:`KVBModel` from cached key indices (codes).

    Once encoder and keys are frozen, an input's codes never change, so each input is
    looked up once instead of once per epoch; an epoch then costs a gather of values and
    the decoder, whatever ``num_pairs`` and ``dim_keys``. How each experience is served:

    - **Cached codes** when the training data are repeatable (no random transform, see
      :func:`~kvb_avalanche.codes.random_transforms`) and the training loader is still the
      plain one the template built: the loader is swapped, at the first epoch, for a
      :class:`CodesLoader` over the dataset's codes, which yields exactly the batches
      Avalanche's loader would. Same result as no cache, bit for bit (tested, with and
      without an encoder; it rests on the encoder giving an input the same embedding in
      any batch, which PyTorch's kernels do not promise to the last bit).
    - **A content-keyed memo** when another plugin replaced the loader (``ReplayPlugin``,
      ``GDumbPlugin``, ...): its batches mix raw inputs of the experience and of the
      buffer, and each batch is mapped to codes before the forward pass; rows seen before
      (every row after the first epoch) are served from :class:`CodeMemo`, new ones looked
      up. Exact for any batch, since codes depend on content only.
    - **A lookup per batch** (no cache) when the training data have random transforms: a
      crop or a flip gives new content, hence new codes, at every read. A log line says so.

    Evaluation datasets are swapped for their codes under the same condition (repeatable
    reads). Codes are cached per input content and per :meth:`KVBModel.fingerprint`, so a
    change of encoder, projection, keys (or of the eval-time mask) recomputes them instead
    of serving stale ones.

    Args:
        cache_codes: ``"auto"`` as above; ``True`` also caches the codes of data with random
            transforms, freezing one draw of each sample's augmentation for every epoch (a
            warning says so); ``False`` turns the plugin off (lookups per batch).
        batch_size: batch size of the lookups that fill the cache.
        progress: show a progress bar while filling the cache.
    """

    def __init__(self, cache_codes: CacheCodes = "auto", batch_size: int = 1024,
                 progress: bool = True) -> None:
        super().__init__()
        if cache_codes not in (True, False, "auto") or not isinstance(cache_codes, bool | str):
            raise ValueError(f"cache_codes must be 'auto', True or False, got {cache_codes!r}")
        self.cache_codes, self.batch_size, self.progress = cache_codes, batch_size, progress
        self._codes: dict[tuple[str, str], torch.Tensor] = {}
        self._memo = CodeMemo()
        self._made = self._loader = None  # the template's training loader, and ours
        self._decided = self._memo_on = False
        self.mode: str | None = None  # how the last training experience was served

    def __getstate__(self) -> dict:
        # a checkpoint keeps the settings, not the caches (they are rebuilt on demand)
        state = self.__dict__.copy()
        state.update(_codes={}, _memo=CodeMemo(), _made=None, _loader=None)
        return state

    # ------------------------------------------------------------------ training
    def before_training_exp(self, strategy, **kwargs) -> None:
        check_model(strategy.model, "FrozenCodesPlugin")
        self._made, self._loader = strategy.dataloader, None  # the one the template just made
        self._decided = self._memo_on = False

    def before_training_epoch(self, strategy, **kwargs) -> None:
        if self._decided or self.cache_codes is False:
            return
        self._decided = True
        model = strategy.model
        if not bool(model.bottleneck.keys_frozen):
            raise RuntimeError("FrozenCodesPlugin needs frozen keys: put KVBPlugin before it")
        dataset, loader = strategy.adapted_dataset, strategy.dataloader
        random = random_transforms(dataset)
        if random is not None and self.cache_codes is True:
            log.warning("cache_codes=True although the training data are not repeatable (%s): "
                        "each sample's codes are computed from one read and reused every "
                        "epoch, freezing that draw of its augmentation", random)
        settings = plain_loader_settings(loader, dataset) if loader is self._made else None
        if random is not None and self.cache_codes == "auto":
            self.mode = "lookup per batch"
            log.info("code cache off for this experience: the training data are not "
                     "repeatable (%s); keys are looked up for every batch", random)
        elif settings is not None:
            codes, targets, tasks = self._dataset_codes(model, dataset, strategy.device)
            batch_size, shuffle, drop_last = settings
            self._loader = CodesLoader(codes, targets, tasks, batch_size, shuffle, drop_last,
                                       dataset=dataset)
            strategy.dataloader = self._loader
            self.mode = "cached codes"
        else:
            self._memo.check(model.fingerprint())
            self._memo_on = True
            self.mode = "content-keyed memo"
            log.info("code cache: the training loader is %s, not the template's plain loader "
                     "(a plugin changed it): its batches are mapped to codes through a "
                     "content-keyed memo", type(loader).__name__)

    def before_forward(self, strategy, **kwargs) -> None:
        x = strategy.mbatch[0]
        if self._memo_on and not strategy.model.is_codes(x):
            strategy.mbatch[0] = self._memo.codes(strategy.model, x)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._made = self._loader = None  # release the experience's loaders
        self._memo_on = False

    # ------------------------------------------------------------------ evaluation
    def after_eval_dataset_adaptation(self, strategy, **kwargs) -> None:
        model = check_model(strategy.model, "FrozenCodesPlugin")
        if self.cache_codes is False or not bool(model.bottleneck.keys_frozen):
            return  # before the keys exist the model says itself what it can do
        dataset = strategy.adapted_dataset
        if self.cache_codes == "auto" and (random := random_transforms(dataset)) is not None:
            log.info("evaluation codes not cached: the data are not repeatable (%s)", random)
            return
        codes, targets, tasks = self._dataset_codes(model, dataset, strategy.device)
        strategy.adapted_dataset = tensor_classification_dataset(
            codes, targets, targets=targets.tolist(), task_labels=tasks.tolist())

    # ------------------------------------------------------------------ the cache
    def _dataset_codes(self, model: KVBModel, dataset, device) -> tuple[torch.Tensor, ...]:
        """(codes (n, codebooks, topk), targets (n,), task labels (n,)) of a dataset, cached
        per content and model fingerprint.

        One pass reads and hashes the inputs (keeping none: an image dataset may not fit in
        memory); a second computes the codes only when they are not cached yet.
        """
        targets, tasks, inputs = [], [], []

        def stream():
            for batch in read_dataset(dataset, self.batch_size):
                targets.append(batch[1])
                tasks.append(batch[-1])
                if model.is_codes(batch[0]):
                    inputs.append(batch[0])  # already codes
                yield batch[0]

        digest = content_hash(stream())
        targets, tasks = torch.cat(targets), torch.cat(tasks)
        if inputs:
            return torch.cat(inputs), targets, tasks
        fingerprint = model.fingerprint()
        key = (digest, fingerprint)
        if key not in self._codes:
            self._codes = {k: v for k, v in self._codes.items() if k[1] == fingerprint}
            batches = tqdm(read_dataset(dataset, self.batch_size), desc="key lookup (code cache)",
                           total=-(-len(dataset) // self.batch_size), disable=not self.progress,
                           leave=False)
            self._codes[key] = torch.cat([model.codes(b[0].to(device)).cpu() for b in batches])
        return self._codes[key], targets, tasks
