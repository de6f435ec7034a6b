import os
import sys
import warnings

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
