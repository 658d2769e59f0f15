"""Transfer learning on frozen VGG features: prepare, extract, train and evaluate stages for DVC."""
