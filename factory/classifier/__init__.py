"""The degradation classifier of the paper's diversity analysis (Section 4.3.1): train it, label pairs with it, and
measure a dataset's degradation diversity (Eq. 2).

    factory classifier train --data photos/ --arch resnet18 --per-class 200 --epochs 5 --out classifier.safetensors
    factory label --classifier classifier.safetensors --dataset vqvae2-ep8

One module per job, read in this order:

    synthesis.py    the training set: a Tiny-ImageNet-C-like corrupted set synthesised from any image folder
    network.py      the network: torchvision's ResNet with a 64x64 stem, and its input conventions
    training.py     training from scratch, the held-out accuracy and the confusion matrix
    checkpoint.py   the safetensors checkpoint: saving, and loading with every check
    labeler.py      the Labeler: class probabilities of LR images of any size, from 64x64 tiles
    relabel.py      `factory label`: rewrites a dataset's manifests' label columns (and its card's labels)

Diversity. H = -sum_c P(c) log P(c) over the proportions of predicted classes (Eq. 2), in nats: `factory.diversity`
(torch-free).

This file imports no torch: ARCHITECTURES, the registry's names, feed the CLI's choices.
"""

ARCHITECTURES: tuple[str, ...] = ("resnet152", "resnet50", "resnet18")  # torchvision ResNets (network.py)
