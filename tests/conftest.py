import os

import torch

# The suite runs many tiny models: on a 2-core CI machine, intra-op threads only contend with each other.
torch.set_num_threads(int(os.environ.get("ANM_TEST_THREADS", "1")))
