"Data loaders: Imagenette's layout through `untar_data` with no network, digits, and the errors raised before training."
import urllib.error
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from fastai.torch_core import set_seed
from fastai.data.external import fastai_cfg
from bnet_fastai.data import (imagenette_dls, digits_dls, fake_imagenette, imagenette_url, IMAGENETTE_CLASSES,
                              IMAGEWOOF_CLASSES)

def tree_snapshot(p: Path): return sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob('*'))

@pytest.fixture
def fastai_home(tmp_path, monkeypatch):
    "An empty FASTAI_HOME. fastai reads it once per process (`fastai_cfg` is cached), so the cache is cleared around the test."
    monkeypatch.setenv('FASTAI_HOME', str(tmp_path/'fastai_home'))
    fastai_cfg.cache_clear()
    yield tmp_path/'fastai_home'
    fastai_cfg.cache_clear()

@pytest.fixture
def nette(fastai_home):
    return fake_imagenette(fastai_home/'data'/'imagenette2-160', n_train=2, n_val=1)

def test_fake_tree_has_imagenettes_layout(nette):
    for split in ('train', 'val'):
        assert sorted(d.name for d in (nette/split).iterdir()) == sorted(IMAGENETTE_CLASSES)
    f = next((nette/'val'/'n03888257').iterdir())
    assert f.suffix == '.JPEG' and Image.open(f).format == 'JPEG'

def test_imagenette_through_untar_data(nette):
    dls = imagenette_dls(size=64, bs=8, workers=0)
    assert Path(dls.path) == nette
    xb, yb = dls.one_batch()
    assert xb.shape == (8, 3, 64, 64)
    assert list(dls.vocab) == list(IMAGENETTE_CLASSES.values())
    # each validation item's label is the ImageNet name of its wnid folder
    for f, (_, y) in zip(dls.valid.items, dls.valid_ds):
        assert dls.vocab[y] == IMAGENETTE_CLASSES[Path(f).parent.name]
    assert len(dls.train_ds) == 20 and len(dls.valid_ds) == 10

def test_imagewoof_and_320px_urls(fastai_home):
    woof = fake_imagenette(fastai_home/'data'/'imagewoof2-320', n_train=1, n_val=1, classes=IMAGEWOOF_CLASSES)
    dls = imagenette_dls(size=192, bs=4, woof=True, workers=0)
    assert Path(dls.path) == woof and imagenette_url(192, True).endswith('imagewoof2-320.tgz')
    assert list(dls.vocab) == list(IMAGEWOOF_CLASSES.values())

def test_validation_is_deterministic(nette):
    set_seed(0); dls = imagenette_dls(size=64, bs=8, workers=0)
    v1, v2 = [torch.cat([x for x, _ in dls.valid]) for _ in range(2)]
    assert torch.equal(v1, v2)
    # a differently seeded build sees the same validation tensors, while training crops change
    set_seed(1); other = imagenette_dls(size=64, bs=8, workers=0)
    assert torch.equal(torch.cat([x for x, _ in other.valid]), v1)
    assert not torch.equal(dls.train.one_batch()[0], dls.train.one_batch()[0])

def test_valid_is_resize_and_centre_crop(nette):
    "A 140x100 validation image, blue with a 5 px red border on top and bottom, 25 px left and right: the centre crop keeps only blue."
    f = nette/'val'/'n01440764'/'n01440764_0.JPEG'
    img = np.zeros((100, 140, 3), np.uint8); img[:, :] = (255, 0, 0); img[5:95, 25:115] = (0, 0, 255)
    Image.fromarray(img).save(f, quality=100)
    dls = imagenette_dls(size=64, bs=8, workers=0)
    i = [Path(o) for o in dls.valid.items].index(f)
    xs = torch.cat([x for x, _ in dls.valid])  # validation keeps the items' order
    x = dls.valid.decode((xs[i:i+1],))[0][0].float()
    assert x.shape == (3, 64, 64)
    assert (x[2] > 200).all() and (x[0] < 60).all()  # all blue: the red frame was cropped away, nothing squished

def test_missing_split_folders(nette):
    (nette/'val').rename(nette.parent/'val_elsewhere')
    before = tree_snapshot(nette.parent)
    with pytest.raises(FileNotFoundError, match=r"imagenette2-160 has no val/ folder"): imagenette_dls(size=64, bs=8)
    assert tree_snapshot(nette.parent) == before
    (nette/'train').rename(nette.parent/'train_elsewhere'); (nette/'val').mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no train/ folder"): imagenette_dls(path=nette)
    with pytest.raises(FileNotFoundError, match=r"nope does not exist"): imagenette_dls(path=nette/'nope')
    assert not (nette/'nope').exists() and list((nette/'val').iterdir()) == []

def test_empty_class_folder(nette):
    for f in (nette/'train'/'n03445777').iterdir(): f.unlink()
    before = tree_snapshot(nette)
    with pytest.raises(ValueError, match=r"class folder .*train/n03445777 holds no images"): imagenette_dls(path=nette)
    assert tree_snapshot(nette) == before

def test_unreadable_image_is_named(nette):
    bad = nette/'train'/'n03000684'/'broken.JPEG'
    bad.write_bytes(b'\x00garbage, not a JPEG')
    before = tree_snapshot(nette)
    with pytest.raises(ValueError, match=r"cannot read image .*n03000684/broken\.JPEG"): imagenette_dls(path=nette)
    assert tree_snapshot(nette) == before

def truncate(f: Path):
    data = f.read_bytes(); f.write_bytes(data[:len(data)//2])
    with Image.open(f) as im: assert im.size  # the header still opens: only a full decode finds it

def test_truncated_image_is_found_before_training(nette):
    "A JPEG whose header opens but whose data is cut off is reported by name when the loaders are built."
    f = nette/'val'/'n03028079'/'n03028079_0.JPEG'
    truncate(f)
    before = tree_snapshot(nette)
    with pytest.raises(ValueError, match=r"cannot read image .*n03028079_0\.JPEG \(truncated, or not an image\)"):
        imagenette_dls(size=64, bs=8, workers=0)
    assert tree_snapshot(nette) == before
    # Without the check, loading it still names the file
    dls = imagenette_dls(size=64, bs=8, workers=0, check=False)
    with pytest.raises(Exception, match=r"cannot read image .*n03028079_0\.JPEG"): list(dls.valid)

def test_skip_bad_images(nette):
    bad = [nette/'train'/'n03028079'/'n03028079_0.JPEG', nette/'train'/'n01440764'/'n01440764_1.JPEG']
    for f in bad: truncate(f)
    with pytest.warns(UserWarning, match=r"skipping 2 images that cannot be read: .*n01440764_1\.JPEG.*n03028079_0\.JPEG|"
                                         r"skipping 2 images that cannot be read: .*n03028079_0\.JPEG.*n01440764_1\.JPEG"):
        dls = imagenette_dls(size=64, bs=8, workers=0, skip_bad_images=True)
    assert sorted(dls.skipped_images) == sorted(bad)
    items = {Path(o) for o in dls.train.items} | {Path(o) for o in dls.valid.items}
    assert len(items) == 30 - 2 and not items & set(bad)
    # a class folder whose only images are bad is empty after skipping
    truncate(nette/'val'/'n03028079'/'n03028079_0.JPEG')  # the folder's only image
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"class folder .*val/n03028079 holds no readable images"):
        imagenette_dls(size=64, bs=8, workers=0, skip_bad_images=True)

def test_offline_download_says_how_to_pass_path(fastai_home, monkeypatch):
    import fastdownload.core
    def offline(url, *args, **kwargs): raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(fastdownload.core, 'download_url', offline)
    with pytest.raises(ConnectionError, match=r"imagenette2-160.*offline.*imagenette_dls\(path=.*--dataset") as e:
        imagenette_dls(size=64, bs=8)
    assert not (fastai_home/'data'/'imagenette2-160').exists()
    # fastdownload's lock file beside the archive it never got, and the empty archive folder, are gone
    assert not list(fastai_home.rglob('*.lock')) and not (fastai_home/'archive').exists()

def test_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    dls = digits_dls(size=32, bs=64)
    xb, yb = dls.one_batch()
    assert xb.shape == (64, 3, 32, 32) and list(dls.vocab) == [str(i) for i in range(10)]
    assert len(dls.valid_ds) == round(0.2*len(d.images)) and len(dls.train_ds) + len(dls.valid_ds) == len(d.images)
    # items are sklearn's images and targets: the 8x8 image with 0-16 scaled to 0-255, in all 3 channels
    for k in (0, 100):
        i = dls.valid.items[k]
        img, y = dls.valid_ds[k]
        assert dls.vocab[y] == str(d.target[i])
        ref = np.rint(d.images[i]*255/16).astype(np.uint8)
        assert np.array_equal(np.asarray(img), np.stack([ref]*3, -1))
    # the split depends on `seed` only
    assert list(digits_dls().valid.items) == list(dls.valid.items)
    assert list(digits_dls(seed=0).valid.items) != list(dls.valid.items)
