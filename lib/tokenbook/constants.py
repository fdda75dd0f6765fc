"""Dataset constants as plain numbers (a leaf module, as timm keeps them in ``timm/data/constants.py``): the models
read their normalisation from here without importing :mod:`tokenbook.data` (torch, datasets, loaders).
:mod:`tokenbook.data` re-exports every name, so ``from tokenbook.data import FASHION_MNIST_MEAN`` keeps working.
Imports nothing."""

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# mean/std of the Fashion-MNIST training pixels (in [0, 1])
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
