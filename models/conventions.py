"""Conventions the data path and the models share, defined once.

Standard library only, so the light modules (readers, the store, the CLI) import them without
importing torch.
"""

# Label of pixels that count nowhere: object boundaries (VOC), crowd regions (COCO), void
# values of a layout file and padding. Stored masks, episode labels and every loss and metric
# use it; class ids therefore stop at 254.
IGNORE_INDEX = 255

# Per-channel RGB mean and standard deviation of ImageNet: images in [0, 1] are normalised
# with them before any backbone (what ImageNet, MoCo and DINO weights were trained on).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
