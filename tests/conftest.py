import os, pytest, torch
from fastai.data.external import fastai_cfg
from bnet_fastai.data import fake_imagenette

# Under pytest-xdist (`make test` runs two workers) each worker, and every process it starts, gets one thread: two
# workers on two cores rather than four threads taking turns. Alone, at most two threads.
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
else: torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

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
