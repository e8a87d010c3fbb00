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


def add_disk_junk(root) -> dict[str, list[str]]:
    """What real disks add to an image folder written by write_image_folder (classes cat, dog): a named pipe
    and a Unix socket named like images, macOS AppleDouble files, Jupyter checkpoint folders (one beside
    the classes, one inside a class). Returns the paths it made, by kind."""
    import socket

    root = str(root)
    fifo = os.path.join(root, "cat", "fifo.png")
    os.mkfifo(fifo)
    sock_path = os.path.join(root, "dog", "sock.jpg")
    here = os.getcwd()
    os.chdir(os.path.dirname(sock_path))  # a relative bind: a Unix socket path is limited to ~107 bytes
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(os.path.basename(sock_path))  # the socket file outlives the closed socket
    finally:
        os.chdir(here)
    apple = []
    for name in ("cat", "dog"):
        path = os.path.join(root, name, "._0.png")
        with open(path, "wb") as f:
            f.write(b"\x00\x05\x16\x07" + bytes(78))  # the AppleDouble magic: no image PIL can open
        apple.append(path)
    checkpoints = [os.path.join(root, ".ipynb_checkpoints"), os.path.join(root, "dog", ".ipynb_checkpoints")]
    for folder in checkpoints:
        os.makedirs(folder)
        Image.new("RGB", (8, 8)).save(os.path.join(folder, "0-checkpoint.png"))
    return dict(not_regular=[fifo, sock_path], hidden=apple + checkpoints)
