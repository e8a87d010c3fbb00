import os
import sys
from pathlib import Path

import torch

# Shared test helpers (numerics.py, toy_models.py) import by plain name from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The suite runs many tiny models: on a 2-core CI machine, intra-op threads only contend with each other.
torch.set_num_threads(int(os.environ.get("ANM_TEST_THREADS", "1")))
