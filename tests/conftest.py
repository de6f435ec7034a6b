import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="No pretrained weights loaded")


def pytest_addoption(parser):
    parser.addoption("--graphs", action="store_true",
                     help="decomposers run every call as a recorded graph (trace_and_decompose(graphs=True))")


def pytest_configure(config):
    if config.getoption("--graphs"):
        import decompose.decomposer

        decompose.decomposer.GRAPHS_BY_DEFAULT = True


@pytest.fixture(scope="session")
def train_shortened():
    """``train(out)``: every toy-world model into ``out`` as `vit-decompose toyworld train --steps 2
    --eval-images 64` writes it (the pipeline and its bytes are under test, not the accuracies)."""
    from vit_decompose.cli import main

    def train(out):
        assert main(["toyworld", "train", "--out", str(out), "--steps", "2", "--eval-images", "64"]) == 0
        return out
    return train


@pytest.fixture(scope="session")
def shortened_toy_weights(tmp_path_factory, train_shortened):
    """A folder of ``train_shortened``'s models, shared by the tests that only read it."""
    return train_shortened(tmp_path_factory.mktemp("shortened-weights"))
