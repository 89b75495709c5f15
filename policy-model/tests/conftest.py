import os
import sys

import torch

# Tests share the CPU with cargo and the simulator: one torch thread (two collapse ~80x).
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# Paths in the trainer (configs/, data/) are relative to the repository root.
os.chdir(os.path.join(os.path.dirname(__file__), "..", ".."))
