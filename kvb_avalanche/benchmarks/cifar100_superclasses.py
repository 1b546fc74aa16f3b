"""Domain-incremental CIFAR-100: its 20 superclasses are the classes, their 5 subclasses
the domains (the standard CIFAR-100 superclass benchmark of domain-incremental learning).

Experience ``d`` holds, for every superclass, the images of its ``d``-th subclass (in
alphabetical order): the same 20 classes each time, of another kind (``maple_tree`` then
``oak_tree`` ... for ``trees``). The metric is the domain-incremental one: accuracy over
the 20 classes on every domain's test images (all domains are the same size, so the mean
over test experiences is the accuracy on the whole test set). The images are CIFAR-100's,
read and embedded as split CIFAR-100's (one embedding cache for both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvb_avalanche.benchmarks.registry import DomainIncremental, register_benchmark

# the 20 superclasses (coarse labels 0..19) and their subclasses, as CIFAR-100's meta file
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant",
                                       "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
FINE = sorted(name for names in SUPERCLASSES.values() for name in names)  # label order
_COARSE = torch.empty(100, dtype=torch.long)  # fine label -> superclass
_DOMAIN = torch.empty(100, dtype=torch.long)  # fine label -> its rank in its superclass
for _coarse, _names in enumerate(SUPERCLASSES.values()):
    for _rank, _name in enumerate(_names):
        _COARSE[FINE.index(_name)], _DOMAIN[FINE.index(_name)] = _coarse, _rank


@register_benchmark
class CIFAR100Superclasses(DomainIncremental):
    """20 superclasses in 5 domains of one subclass each; keys fitted on CIFAR-10."""

    name = "cifar100_superclasses"
    dataset = "cifar100"
    num_classes = 20
    num_domains = 5
    n_experiences = 5
    key_init_data = "cifar10"
    description = ("CIFAR-100's 20 superclasses, domain-incremental: 5 domains of one "
                   "subclass each, keys fitted on CIFAR-10")

    @classmethod
    def targets(cls, labels: Tensor) -> tuple[Tensor, Tensor]:
        return _COARSE[labels], _DOMAIN[labels]
