import pytest
import torch

torch.set_num_threads(1)  # tiny models; leaves a core for the server processes tests start


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
