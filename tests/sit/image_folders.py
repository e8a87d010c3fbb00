"""Image folders written by the tests (shared by the data and extraction tests)."""
import os

import numpy as np
from PIL import Image


def write_image_folder(root, sizes=((48, 40), (20, 30), (64, 64)), classes=("cat", "dog")):
    """Random RGB PNGs under root/<class>/; returns root."""
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(os.path.join(root, name))
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, name, f"{i}.png"))
    return str(root)
