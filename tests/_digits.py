"Small real images for tests: sklearn's 8×8 digits as 3-channel tensors, upsampled, in fastai `DataLoaders`."
import torch, torch.nn.functional as F
from sklearn.datasets import load_digits
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.torch_core import TensorImage, TensorCategory

def digits_tensors(size=16, n=None):
    "Digits as normalised (N, 3, size, size) float images and int labels; the first `n` only if given."
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target[:n])

def digits_dls(size=16, n=None, bs=64, n_valid=300, seed=0):
    "fastai `DataLoaders` over digits (picklable, so `learn.export` works): a random `n_valid` images for validation."
    x, y = digits_tensors(size, n)
    items = [(TensorImage(a), TensorCategory(b)) for a, b in zip(x, y)]
    idx = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    dsets = Datasets(items, tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=(idx[:-n_valid], idx[-n_valid:]))
    dls = dsets.dataloaders(bs=bs, drop_last=True, device='cpu')
    dls.c = 10
    return dls
