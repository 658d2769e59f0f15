"""Transfer learning on frozen VGG features: prepare, extract, train and evaluate stages for DVC."""

import gc
import sys

# `python -m pipeline.<stage>`: Python imports this package first, while sys.argv[0] is still "-m" (it names the
# module only once found). The stage's imports then run with the collector off: torch, torchvision and scikit-learn
# make millions of objects, and the collections they set off took 0.4-0.6 s of every stage's start. run_stage
# freezes what the imports made and turns the collector back on before the stage's work begins.
if sys.argv[:1] == ["-m"]:
    gc.disable()
