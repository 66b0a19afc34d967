"Importing `bnet_fastai.models` imports every module that registers architectures, so `arch_registry` is complete."
from . import xresnet, zoo
