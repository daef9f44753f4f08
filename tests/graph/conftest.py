import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the graph's chunks here are tiny, and on a shared 2-core machine every
    parallel region (scatter_add_ always opens one) waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
