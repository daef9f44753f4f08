import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tree's tensors are small: on a shared machine one thread avoids OpenMP contention
    (several times faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
