"""KVBPlugin: the key-value bottleneck's lifecycle, wired to Avalanche's hooks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

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

    def before_training(self, strategy, **kwargs) -> None:
        # with its own key data it can fit now, so an initial periodic eval (eval_every)
        # already sees fitted keys
        if self.key_init_loader is not None:
            self.prepare(strategy.model, None, strategy.device)

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


class FrozenCodesPlugin(SupervisedPlugin):
    """Train and evaluate a :class:`KVBModel` from cached key indices.

    Once encoder and keys are frozen, an input's key indices never change, so each
    experience's inputs are looked up once (after its dataset is adapted) and replaced by
    their codes (n, codebooks, topk); an epoch then costs a gather of values and the
    decoder, whatever ``num_pairs`` and ``dim_keys``. Codes are cached per input content
    and per :meth:`KVBModel.fingerprint`, so a change of encoder, projection, keys (or of
    the eval-time mask) recomputes them instead of serving stale ones.

    Only the strategy's adapted dataset is replaced: plugins that read
    ``strategy.experience.dataset`` themselves (EWC, Replay) still see the raw inputs.

    The training loader is replaced too, by one that indexes the code tensors a batch at a
    time (:class:`CodesLoader`), where that gives exactly the batches Avalanche's loader
    would: a single task, no custom sampler. Per-sample fetching and collating would
    otherwise cost more than the training step itself.
    """

    def __init__(self, batch_size: int = 1024, progress: bool = True) -> None:
        super().__init__()
        self.batch_size, self.progress = batch_size, progress
        self._codes: dict[tuple[str, str], torch.Tensor] = {}
        self._train: tuple[object, tuple[torch.Tensor, ...]] | None = None

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        tensors = self._use_codes(strategy)
        self._train = (strategy.adapted_dataset, tensors)

    def after_eval_dataset_adaptation(self, strategy, **kwargs) -> None:
        if bool(strategy.model.bottleneck.keys_frozen):
            self._use_codes(strategy)
        # else: an eval before the keys are fitted (Avalanche's initial periodic eval); the
        # model then says itself whether it can run without fitted keys

    def before_training_exp(self, strategy, **kwargs) -> None:
        dataset, tensors = self._train or (None, ())
        if strategy.adapted_dataset is not dataset:
            return  # another plugin changed the data since
        # the loader the strategy made just before this hook
        settings = _plain_loader_settings(strategy.dataloader, dataset)
        if settings is not None:
            batch_size, shuffle, drop_last = settings
            strategy.dataloader = CodesLoader(*tensors, batch_size=batch_size, shuffle=shuffle,
                                              drop_last=drop_last)

    def _use_codes(self, strategy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Swap the adapted dataset for its codes; returns (codes, targets, task labels)."""
        model = strategy.model
        if not bool(model.bottleneck.keys_frozen):
            raise RuntimeError("FrozenCodesPlugin needs frozen keys: put KVBPlugin before it")
        x, y, t = _tensors(strategy.adapted_dataset, self.batch_size)
        if not x.is_floating_point():
            return x, y, t  # already codes
        fingerprint = model.fingerprint()
        key = (_content_hash(x), fingerprint)
        if key not in self._codes:
            self._codes = {k: v for k, v in self._codes.items() if k[1] == fingerprint}
            self._codes[key] = self.compute(model, x, torch.device(strategy.device))
        strategy.adapted_dataset = _make_taskaware_tensor_classification_dataset(
            self._codes[key], y, targets=y.tolist(), task_labels=t.tolist()
        )
        return self._codes[key], y, t

    def compute(self, model: KVBModel, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Codes (n, codebooks, topk) of inputs x, in chunks, with a progress bar."""
        chunks = range(0, len(x), self.batch_size)
        bar = tqdm(chunks, desc="key lookup (code cache)", disable=not self.progress, leave=False)
        return torch.cat([model.codes(x[i : i + self.batch_size].to(device)).cpu() for i in bar])


class CodesLoader:
    """Training batches ``[codes, targets, task labels]`` by indexing whole tensors.

    Draws from the global RNG exactly what Avalanche's single-task training loader draws
    per epoch (PyTorch's ``DataLoader`` iterator takes a base seed, then its
    ``RandomSampler`` a permutation seed) and yields the same batches in the same order, so
    training from it is bit-identical to training from the Avalanche loader.
    """

    def __init__(self, codes: torch.Tensor, targets: torch.Tensor, task_labels: torch.Tensor,
                 batch_size: int, shuffle: bool = True, drop_last: bool = False) -> None:
        self.tensors = (codes, targets, task_labels)  # (n, codebooks, topk), (n,), (n,)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last

    def __len__(self) -> int:
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        n = len(self.tensors[0])
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
        if self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            batch = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield [t[batch] for t in self.tensors]


def _plain_loader_settings(loader, dataset) -> tuple[int, bool, bool] | None:
    """(batch_size, shuffle, drop_last) if ``loader`` is one that Avalanche builds for a
    single task over ``dataset`` with a plain random or sequential sampler, the dataset's
    own collate and no persistent workers (the batches :class:`CodesLoader` reproduces);
    otherwise ``None``."""
    if type(loader) is TaskBalancedDataLoader:
        custom = {"sampler", "batch_sampler", "generator", "ffcv_args"} & set(loader.loader_kwargs)
        if (custom or len(loader.datasets) != 1 or len(loader.datasets[0]) != len(dataset)
                or loader.distributed_sampling or loader.never_ending):
            return None
        kwargs = loader.loader_kwargs
        if _persistent(kwargs.get("num_workers", 0), kwargs.get("persistent_workers", False)):
            return None
        if kwargs.get("collate_fn", dataset.collate_fn) != dataset.collate_fn:
            return None
        return (loader.batch_sizes[0], bool(kwargs.get("shuffle", False)),
                bool(kwargs.get("drop_last", False)))
    if (type(loader) is DataLoader and loader.dataset is dataset and loader.generator is None
            and loader.collate_fn == dataset.collate_fn
            and not _persistent(loader.num_workers, loader.persistent_workers)):
        sampler = loader.sampler
        plain = type(sampler) is SequentialSampler or (
            type(sampler) is RandomSampler and sampler.generator is None
            and not sampler.replacement and sampler.num_samples == len(dataset))
        if plain and type(loader.batch_sampler) is BatchSampler:
            return loader.batch_size, type(sampler) is RandomSampler, loader.drop_last
    return None


def _persistent(num_workers: int, persistent_workers: bool) -> bool:
    """Persistent workers draw their base seed once, not every epoch as CodesLoader does."""
    return bool(persistent_workers) and num_workers > 0


def _tensors(dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (inputs, targets, task labels) of an Avalanche dataset, in order.

    The loader has its own generator: iterating a DataLoader draws a seed from the global
    RNG otherwise, which would change the strategy's shuffling compared to no cache.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=getattr(dataset, "collate_fn", None),
                        generator=torch.Generator())
    xs, ys, ts = zip(*((b[0], b[1], b[-1]) for b in loader), strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def _content_hash(x: torch.Tensor) -> str:
    return hashlib.blake2b(x.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
