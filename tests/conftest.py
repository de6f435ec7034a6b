import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="No pretrained weights loaded")
