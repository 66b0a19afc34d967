import os, pytest, torch

# Two cores: keep torch from oversubscribing when pytest or notebooks run in parallel.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
