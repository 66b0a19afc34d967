import os, pytest, torch
from fastai.torch_core import set_seed
from fastai.data.external import fastai_cfg
from bnet_fastai.data import fake_imagenette

# Under pytest-xdist (`make test` runs two workers) each worker, and every process it starts, gets one thread: two
# workers on two cores rather than four threads taking turns. Alone, at most two threads.
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
else: torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Python's `random` (fastai's DataLoader draws its shuffle seed from it), NumPy and torch, before every test: a test's
# data order and init then do not depend on which tests ran before it in the same worker.
@pytest.fixture(autouse=True)
def _seed():
    set_seed(0, reproducible=True)

# A small tree with Imagenette's layout under a temporary FASTAI_HOME: `untar_data` returns it without the network.
@pytest.fixture(scope='module')
def nette_home(tmp_path_factory):
    home = tmp_path_factory.mktemp('fastai_home')
    fake_imagenette(home/'data'/'imagenette2-160', n_train=4, n_val=2)
    return home

@pytest.fixture
def use_home(monkeypatch):
    "Point fastai at another FASTAI_HOME inside this process (`fastai_cfg` caches the first one it reads)."
    def _use(home):
        monkeypatch.setenv('FASTAI_HOME', str(home)); fastai_cfg.cache_clear()
    yield _use
    fastai_cfg.cache_clear()

# The longest files first: two xdist workers take one file at a time in this order, so the run does not end with one
# worker alone on a long file. Within a file, and among the rest, the order stays as collected.
LONGEST_FIRST = ['test_readme.py', 'test_train_cli.py', 'test_fastai_contract.py', 'test_distributed.py']
def pytest_collection_modifyitems(items):
    rank = {n: i for i, n in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))
