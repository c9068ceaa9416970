import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(1)


@pytest.fixture
def root(tmp_path):
    """A fresh runs root."""
    return tmp_path / "runs"
