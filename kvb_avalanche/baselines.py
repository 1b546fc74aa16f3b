"""The field's frozen-feature baselines, as Avalanche strategies: NCM, SimpleCIL, FeCAM, RanPAC.

None of them takes a gradient step. After each experience a plugin updates a closed-form
classifier from that experience's features alone (no exemplars), which is what each
method's paper does on a frozen pretrained backbone:

- **NCM**: Avalanche's ``NCMClassifier`` (L2-normalised class means, Euclidean distance),
  its means exact running means (class-incrementally: Avalanche's ``CurrentDataNCMUpdate``).
- **SimpleCIL** (Zhou et al., 2023): the prototype of a class is the mean of its raw
  features; a feature goes to the prototype of highest cosine similarity.
- **FeCAM** (Goswami et al., NeurIPS 2023): Avalanche's ``FeCAMClassifier`` (Tukey's
  transform, per-class shrunk and normalised covariances, Mahalanobis distance), its
  statistics exact running ones (class-incrementally: Avalanche's
  ``CurrentDataFeCAMUpdate``); the inverse covariances are computed once per update
  instead of once per batch and class.
- **RanPAC** without its PETL stage (McDonnell et al., NeurIPS 2023): a fixed Gaussian
  projection to ``M`` dimensions with a ReLU, then ridge regression onto one-hot targets
  from Gram matrices accumulated over every experience so far; the ridge ``λ`` is chosen
  for each experience on a held-out 20 % of its data, from RanPAC's grid 1e-8 .. 1e13.

SLDA stays Avalanche's ``StreamingLDA``; :class:`BatchedStreamingLDA` updates its very
statistics a batch at a time instead of a sample at a time.

Every classifier scores all ``num_classes`` classes; a class that no experience has shown
yet scores below every seen class (Avalanche's own classifiers give unseen classes a zero
prototype, which can win).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.models import FeCAMClassifier, NCMClassifier, TrainEvalModel
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.supervised import StreamingLDA
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

RANPAC_RIDGES = 10.0 ** np.arange(-8, 14)  # RanPAC's λ grid
RANPAC_HELD_OUT = 0.2  # share of an experience held out to choose λ


def _below_seen(scores: Tensor, seen: Tensor) -> Tensor:
    """``scores`` (batch, classes) with every unseen class one below the row's lowest seen
    score: never predicted, and finite (so the loss metric stays finite)."""
    if seen.all() or not seen.any():
        return scores
    floor = scores[:, seen].min(1, keepdim=True).values - 1
    return torch.where(seen, scores, floor)


def _padded(scores: Tensor, num_classes: int) -> Tensor:
    """(batch, k) -> (batch, num_classes), zeros on the right (for classes beyond k)."""
    return F.pad(scores, (0, num_classes - scores.shape[1])) if scores.shape[1] < num_classes \
        else scores


def _check_features(x: Tensor, method: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{method} takes features of shape (batch, dim), got {tuple(x.shape)}")


class NCM(NCMClassifier):
    """Avalanche's ``NCMClassifier`` over ``num_classes`` classes, unseen classes masked."""

    def __init__(self, num_classes: int, normalize: bool = True) -> None:
        super().__init__(normalize=normalize)
        self.num_classes = num_classes
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def update_class_means_dict(self, class_means_dict: dict, momentum: float = 0.5) -> None:
        super().update_class_means_dict(class_means_dict, momentum)
        self.seen[[int(k) for k in class_means_dict]] = True

    def set_class_means(self, means: dict[int, Tensor]) -> None:
        """Replace the means of the classes in ``means`` (the others stay)."""
        self.class_means_dict.update(means)
        self._vectorize_means_dict()
        self.seen[list(means)] = True

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, "NCM")
        if not self.seen.any():
            return x.new_zeros(len(x), self.num_classes)
        return _below_seen(_padded(super().forward(x), self.num_classes), self.seen.to(x.device))


class FeCAM(FeCAMClassifier):
    """Avalanche's ``FeCAMClassifier`` (its defaults, FeCAM's paper's) over ``num_classes``
    classes, unseen classes masked, the inverse covariances cached between updates.

    Tukey's transform is a square root: the features must be non-negative (pooled ReLU
    features are); negative ones are refused rather than turned into NaN.
    """

    SCORES_KEPT = 512  # batches whose scores are kept (the test stream's, evaluated again)

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self._inverse: dict[int, Tensor] = {}
        # a class's distances to a batch, kept while its statistics stay: after every
        # experience the whole test stream is scored again, and class-incrementally only
        # the new classes' statistics change (the distances are n x dim^2 per class: on
        # split CIFAR-100 recomputing them all took an hour a seed, these minutes)
        self._version = torch.zeros(num_classes, dtype=torch.long)
        self._scores: dict[bytes, tuple[Tensor, Tensor]] = {}  # batch -> versions, scores

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a checkpoint) without the kept inverses and scores, which are derived
        and can be recomputed: on split CIFAR-100 they passed pickle's 4 GiB limit."""
        return {**super().__getstate__(), "_inverse": {}, "_scores": {}}

    def update_class_cov_dict(self, class_cov_dict: dict, momentum: float = 0.5) -> None:
        super().update_class_cov_dict(class_cov_dict, momentum)
        self._inverse = {}
        self._version += 1

    def adaptation(self, experience: Any) -> None:
        """Only note the classes an experience names: Avalanche's gives each unseen class a
        zero mean and an identity covariance and re-stacks every covariance, for every
        test experience (100 x 1280^2 floats a time on CIFAR-100); unseen classes are
        masked here instead, so the scores are the same."""
        if not self.training:
            self.max_class = max(self.max_class, *experience.classes_in_this_experience)

    def update_class_means_dict(self, class_means_dict: dict, momentum: float = 0.5) -> None:
        super().update_class_means_dict(class_means_dict, momentum)
        self.seen[[int(k) for k in class_means_dict]] = True
        self._version += 1

    def replace_class_cov_dict(self, class_cov_dict: dict) -> None:
        super().replace_class_cov_dict(class_cov_dict)
        self._inverse = {}
        self._version += 1

    def set_class_statistics(self, means: dict[int, Tensor], covs: dict[int, Tensor]) -> None:
        """Replace the means and covariances of the classes given (the others, and their
        cached inverses, stay)."""
        self.class_means_dict.update(means)
        self.class_cov_dict.update(covs)
        self._vectorize_means_dict()
        self._vectorize_cov_dict()
        for c in covs:
            self._inverse.pop(c, None)
        self._version[list({*means, *covs})] += 1
        self.seen[list(means)] = True

    def apply_transforms(self, features: Tensor) -> Tensor:
        if self.tukey and self.tukey1 != 0 and bool((features < 0).any()):
            raise ValueError("FeCAM's Tukey transform (a square root) needs non-negative "
                             f"features; these reach {features.min().item():.3g}. Use an "
                             "encoder with pooled ReLU features, or FeCAM(tukey=False)")
        return super().apply_transforms(features)

    def _tukey_transforms(self, x: Tensor) -> Tensor:  # Avalanche's, without copying x
        return torch.log(x) if self.tukey1 == 0 else torch.pow(x, self.tukey1)

    def _inverse_cov(self, class_id: int, device: torch.device) -> Tensor:
        if class_id not in self._inverse:
            # the pseudo-inverse, as Avalanche's; in float64 by the symmetric eigensolver,
            # where float32 SVD can fail to converge on a class of few, collinear features
            cov = self.class_cov_dict[class_id].double()
            self._inverse[class_id] = torch.linalg.pinv(cov, hermitian=True).float().to(device)
        return self._inverse[class_id]

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, "FeCAM")
        if not self.seen.any():
            return x.new_zeros(len(x), self.num_classes)
        key = hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(),
                              digest_size=16).digest() + repr(tuple(x.shape)).encode()
        versions, scores = self._scores.pop(key, (None, None))
        if scores is None or scores.device != x.device:
            versions = torch.full_like(self._version, -1)
            scores = x.new_zeros(len(x), self.num_classes)
        stale = [c for c in self.seen.nonzero().flatten().tolist()
                 if versions[c] != self._version[c]]
        if stale:
            xn = F.normalize(self.apply_transforms(x), p=2, dim=-1)  # (batch, dim)
            for c in stale:
                diff = xn - F.normalize(self.class_means_dict[c].to(x.device), p=2, dim=-1)
                scores[:, c] = -((diff @ self._inverse_cov(c, x.device)) * diff).sum(1)
            versions = versions.clone()
            versions[stale] = self._version[stale]
        self._scores[key] = (versions, scores)
        while len(self._scores) > self.SCORES_KEPT:
            self._scores.pop(next(iter(self._scores)))
        return _below_seen(scores.clone(), self.seen.to(x.device))


class CosinePrototypes(nn.Module):
    """SimpleCIL's classifier: per-class means of raw features, scored by cosine similarity.

    Means are exact running means (sums and counts), so a class seen again (a
    domain-incremental stream) averages all its features."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Add features ``x`` (n, dim) of classes ``y`` (n,)."""
        self.sums.index_add_(0, y, x.to(self.sums.dtype))
        self.counts += torch.bincount(y, minlength=len(self.counts)).to(self.counts.dtype)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, "SimpleCIL")
        seen = self.counts > 0
        prototypes = (self.sums / self.counts.clamp(min=1)[:, None]).float()  # (classes, dim)
        scores = F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).T  # (batch, classes)
        return _below_seen(scores, seen)


class RandomProjectionRidge(nn.Module):
    """RanPAC's classifier (no PETL): ``h = relu(x W)``, ``W`` (dim, M) fixed Gaussian;
    scores ``h Wo`` with ``Wo = (G + λ I)^-1 Q``, ``G = Σ h hᵀ`` and ``Q = Σ h yᵀ`` over every
    experience so far (float64), ``λ`` as chosen at the last update."""

    def __init__(self, num_classes: int, dim: int, projection_dim: int = 2000,
                 seed: int = 0) -> None:
        super().__init__()
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive integer, got {projection_dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(dim, projection_dim, generator=g))
        self.register_buffer("gram", torch.zeros(projection_dim, projection_dim,
                                                 dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(projection_dim, num_classes,
                                                    dtype=torch.float64))
        self.register_buffer("weights", torch.zeros(projection_dim, num_classes))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self.ridge: float | None = None
        self.num_classes = num_classes

    def expand(self, x: Tensor) -> Tensor:
        """(n, dim) -> (n, M): the random ReLU features."""
        return torch.relu(x.to(self.projection.device) @ self.projection)

    @staticmethod
    def choose_ridge(h: Tensor, y_onehot: Tensor, held_out: Tensor) -> float:
        """RanPAC's λ: fit on the kept rows of one experience, the λ of least mean squared
        error on its ``held_out`` rows (bool mask), from :data:`RANPAC_RIDGES`."""
        fit, val = h[~held_out], h[held_out]
        gram, q = fit.T @ fit, fit.T @ y_onehot[~held_out]
        eye = torch.eye(len(gram), dtype=gram.dtype)
        losses = [F.mse_loss(val @ torch.linalg.solve(gram + r * eye, q),
                             y_onehot[held_out]).item() for r in RANPAC_RIDGES]
        return float(RANPAC_RIDGES[int(np.argmin(losses))])

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor, held_out: Tensor) -> None:
        """Add one experience's features ``x`` (n, dim) and classes ``y`` (n,); ``held_out``
        (n,) bool marks the rows λ is chosen on (all rows enter the statistics)."""
        h = self.expand(x).double()  # (n, M)
        y_onehot = F.one_hot(y, self.num_classes).double()  # (n, classes)
        self.gram += h.T @ h
        self.targets += h.T @ y_onehot
        self.seen[y.unique()] = True
        self.ridge = self.choose_ridge(h, y_onehot, held_out)
        eye = torch.eye(len(self.gram), dtype=self.gram.dtype)
        self.weights.copy_(torch.linalg.solve(self.gram + self.ridge * eye, self.targets))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, "RanPAC")
        if not self.seen.any():
            return x.new_zeros(len(x), self.num_classes)
        return _below_seen(self.expand(x) @ self.weights, self.seen.to(x.device))


class ExperienceFeaturesUpdate(SupervisedPlugin):
    """After each experience, hands its features and labels (dataset order) to
    :meth:`update`; subclasses update their classifier there."""

    def update(self, strategy: Any, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        loader = torch.utils.data.DataLoader(strategy.experience.dataset.eval(),
                                             batch_size=strategy.train_mb_size, shuffle=False)
        xs, ys = [], []
        for x, y, *_ in loader:
            xs.append(strategy.model.feature_extractor(x.to(strategy.device)))
            ys.append(y.to(strategy.device).long())
        self.update(strategy, torch.cat(xs), torch.cat(ys))


class PrototypeUpdate(ExperienceFeaturesUpdate):
    """Adds each experience's features to the eval head's running class means."""

    def update(self, strategy: Any, x: Tensor, y: Tensor) -> None:
        strategy.model.eval_classifier.update(x, y)


class ClassMeansUpdate(ExperienceFeaturesUpdate):
    """NCM's prototypes as exact running means over every experience so far: the mean of a
    class's L2-normalised features, normalised (Avalanche's ``compute_class_means``).

    Where each class comes in one experience (class-incremental) this is Avalanche's
    ``CurrentDataNCMUpdate`` (tested equal); where a class comes back (domain-incremental,
    online) Avalanche's update averages the old and new means with weight 0.5 each, which
    weighs the latest mini-batch as much as everything before it."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[int, Tensor] = {}
        self.counts: dict[int, int] = {}

    def update(self, strategy: Any, x: Tensor, y: Tensor) -> None:
        head = strategy.model.eval_classifier
        x = F.normalize(x, dim=1) if head.normalize else x
        means = {}
        for c in y.unique().tolist():
            rows = x[y == c].double()
            self.sums[c] = self.sums.get(c, 0) + rows.sum(0)
            self.counts[c] = self.counts.get(c, 0) + len(rows)
            mean = (self.sums[c] / self.counts[c]).float()
            means[c] = mean / mean.norm() if head.normalize else mean
        head.set_class_means(means)


class ClassCovariancesUpdate(ExperienceFeaturesUpdate):
    """FeCAM's means and covariances as exact running statistics over every experience so
    far (of the Tukey-transformed features; unbiased covariance, then FeCAM's shrinkage and
    normalisation). Class-incrementally this is Avalanche's ``CurrentDataFeCAMUpdate``
    (tested equal); see :class:`ClassMeansUpdate` for a class that comes back."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[int, tuple[int, Tensor, Tensor]] = {}  # count, sum, sum of x xᵀ

    def update(self, strategy: Any, x: Tensor, y: Tensor) -> None:
        head = strategy.model.eval_classifier
        x = head.apply_transforms(x)
        means, covs = {}, {}
        for c in y.unique().tolist():  # only the classes this experience brings change
            rows = x[y == c].double()  # (n, dim)
            n, total, outer = self.stats.get(c, (0, 0, 0))
            n, total, outer = n + len(rows), total + rows.sum(0), outer + rows.T @ rows
            self.stats[c] = (n, total, outer)
            mean = total / n
            means[c] = mean.float()
            covs[c] = ((outer - n * torch.outer(mean, mean)) / max(n - 1, 1)).float()
        head.set_class_statistics(means, head.apply_cov_transforms(covs))


class RidgeUpdate(ExperienceFeaturesUpdate):
    """Adds each experience to RanPAC's statistics; the rows λ is chosen on are drawn from
    ``seed`` and the experience's index (the same after a resume)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def update(self, strategy: Any, x: Tensor, y: Tensor) -> None:
        g = torch.Generator().manual_seed(self.seed * 100_003 + strategy.clock.train_exp_counter)
        held_out = torch.zeros(len(y), dtype=torch.bool)
        held_out[torch.randperm(len(y), generator=g)[: max(1, int(RANPAC_HELD_OUT * len(y)))]] \
            = True
        strategy.model.eval_classifier.update(x, y, held_out.to(x.device))


class ClosedFormTemplate(SupervisedTemplate):
    """A strategy that takes no gradient step: a ``TrainEvalModel`` (feature extractor,
    identity train head, closed-form eval head) whose eval head the plugins update after
    each experience. Keyword-only, as Avalanche's strategies."""

    def __init__(self, *, eval_classifier: nn.Module, update: SupervisedPlugin,
                 feature_extractor: nn.Module | None = None, plugins: list | None = None,
                 **kwargs: Any) -> None:
        model = TrainEvalModel(feature_extractor or nn.Identity(), nn.Identity(),
                               eval_classifier)
        super().__init__(model=model, optimizer=None,  # type: ignore[arg-type]
                         criterion=nn.CrossEntropyLoss(), train_epochs=1,
                         plugins=[update, *(plugins or [])], **kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        """No optimiser: nothing is trained by gradient."""

    def training_epoch(self, **kwargs: Any) -> None:
        """No gradient steps: the update plugin reads the experience after training."""


class BatchedStreamingLDA(StreamingLDA):
    """Avalanche's ``StreamingLDA`` whose update takes a batch in closed form.

    Avalanche's ``fit`` takes one sample at a time: ``Sigma <- (t Sigma + t/(t+1) d d^T)
    / (t+1)`` with ``d = x - muK[y]`` (the class's running mean before the sample, ``t``
    the samples seen before), then the running mean and counts. Over a batch that is
    ``t' Sigma' = t Sigma + D^T diag(t_i / (t_i + 1)) D``, where row ``i`` of ``D`` is the
    sample minus its class's mean over everything before it (the earlier samples of the
    batch included), and the class means become the means of all their samples: the same
    statistics, in one matrix product (float64) instead of a (dim, dim) update per sample.
    Scoring is Avalanche's.
    """

    CHUNK = 1024  # samples per closed-form update

    def training_epoch(self, **kwargs: Any) -> None:
        for batch in self.dataloader:
            self.mbatch = batch
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output, feats = self.forward(return_features=True)
            self._after_forward(**kwargs)
            self.loss += self.criterion()
            self._before_update(**kwargs)
            self.fit_batch(feats, self.mb_y)
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)

    @torch.no_grad()
    def predict(self, X: Tensor) -> Tensor:  # noqa: N803 - Avalanche's signature
        """Avalanche's scores. Its ``Lambda``, the pseudo-inverse of the shrunk covariance,
        is redone after every update, which in training is every batch (the template scores
        each batch before fitting it): taken here by the symmetric eigensolver
        (``hermitian=True``) instead of a general SVD, the same matrix, several times faster."""
        if self.prev_num_updates != self.num_updates:
            eye = torch.eye(self.input_size, device=self.device)
            self.Lambda = torch.linalg.pinv(
                (1 - self.shrinkage_param) * self.Sigma + self.shrinkage_param * eye,
                hermitian=True)
            self.prev_num_updates = self.num_updates
        return super().predict(X)

    @torch.no_grad()
    def fit_batch(self, x: Tensor, y: Tensor) -> None:
        """Add samples x (batch, dim) of labels y (batch,) as ``fit`` would one by one."""
        _check_features(x, "SLDA")
        n = x.shape[0]
        if n > self.CHUNK:  # the (batch, batch) same-label matrix stays small
            for start in range(0, n, self.CHUNK):
                self.fit_batch(x[start : start + self.CHUNK], y[start : start + self.CHUNK])
            return
        if n == 0:
            return
        x64, y = x.double(), y.long()
        onehot = F.one_hot(y, self.muK.shape[0]).double()  # (batch, classes)
        counts = self.cK.double()  # (classes,)
        sums = self.muK.double() * counts[:, None]  # (classes, dim)
        if self.streaming_update_sigma:
            # earlier samples of the batch with the same label: (batch, batch), j < i
            same = (onehot @ onehot.T).tril(-1)
            before = counts[y] + same.sum(1)  # (batch,) the class's samples before i
            mean_before = (sums[y] + same @ x64) / before.clamp_min(1)[:, None]
            d = x64 - mean_before  # the class's mean is 0 before its first sample
            t = self.num_updates + torch.arange(n, dtype=torch.float64, device=x.device)
            scatter = (d * (t / (t + 1))[:, None]).T @ d
            total = self.num_updates + n
            self.Sigma = ((self.num_updates * self.Sigma.double() + scatter) / total).to(
                self.Sigma.dtype)
        new_counts = counts + onehot.sum(0)
        new_sums = sums + onehot.T @ x64
        seen = new_counts > 0
        self.muK[seen] = (new_sums[seen] / new_counts[seen, None]).to(self.muK.dtype)
        self.cK.copy_(new_counts.to(self.cK.dtype))
        self.num_updates += n


def _need_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def NCMStrategy(*, num_classes: int, **kwargs: Any) -> ClosedFormTemplate:  # noqa: N802
    """Nearest class mean on L2-normalised features (Avalanche's classes)."""
    _need_positive(num_classes=num_classes)
    return ClosedFormTemplate(eval_classifier=NCM(num_classes), update=ClassMeansUpdate(),
                              **kwargs)


def SimpleCILStrategy(*, num_classes: int, dim: int, **kwargs: Any  # noqa: N802
                      ) -> ClosedFormTemplate:
    """SimpleCIL: cosine similarity to class prototypes of raw features."""
    _need_positive(num_classes=num_classes, dim=dim)
    return ClosedFormTemplate(eval_classifier=CosinePrototypes(num_classes, dim),
                              update=PrototypeUpdate(), **kwargs)


def FeCAMStrategy(*, num_classes: int, **kwargs: Any) -> ClosedFormTemplate:  # noqa: N802
    """FeCAM: Mahalanobis distance to class means under shrunk per-class covariances."""
    _need_positive(num_classes=num_classes)
    return ClosedFormTemplate(eval_classifier=FeCAM(num_classes),
                              update=ClassCovariancesUpdate(), **kwargs)


def RanPACStrategy(*, num_classes: int, dim: int, projection_dim: int = 2000,  # noqa: N802
                   seed: int = 0, **kwargs: Any) -> ClosedFormTemplate:
    """RanPAC without PETL: random ReLU projection to ``projection_dim``, ridge regression
    on accumulated Gram matrices, λ chosen per experience on a seeded 20 % held out."""
    _need_positive(num_classes=num_classes, dim=dim, projection_dim=projection_dim)
    return ClosedFormTemplate(
        eval_classifier=RandomProjectionRidge(num_classes, dim, projection_dim, seed),
        update=RidgeUpdate(seed), **kwargs)
