"""Runs an example script with the work rank 0 does alone made SLOW_RANK0_S seconds slower, in a process group
whose timeout is GROUP_TIMEOUT_S seconds: what a slow file system does to a job under NCCL's watchdog.

    RANK=0 WORLD_SIZE=2 ... python tests/sit/slow_rank_zero.py sample_ddp.py --ckpt ... (and RANK=1)

Slowed on rank 0 only: hashing the checkpoint and packing the .npz (sample_ddp.py), writing meta.json and the
reference (build_reference.py, with the stub network), writing meta.json and labels.npy (extract_latents.py),
every checkpoint write and read (train.py: torch.save to a file, torch.load of a .pt).
"""
import io
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples" / "sit"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DELAY = float(os.environ.get("SLOW_RANK0_S", "0"))
RANK0 = os.environ.get("RANK", "0") == "0"


def slowed(fn, when=lambda *args, **kwargs: True):
    """fn, sleeping DELAY seconds first on rank 0 when when(*args, **kwargs) holds."""
    def wrapper(*args, **kwargs):
        if RANK0 and when(*args, **kwargs):
            time.sleep(DELAY)
        return fn(*args, **kwargs)
    return wrapper


def short_timeouts() -> None:
    """init_process_group with GROUP_TIMEOUT_S seconds unless the script asks for a timeout of its own."""
    real = dist.init_process_group

    def init(*args, timeout=None, **kwargs):
        return real(*args, timeout=timeout or timedelta(seconds=float(os.environ["GROUP_TIMEOUT_S"])), **kwargs)

    dist.init_process_group = init


def main() -> None:
    script, argv = sys.argv[1], sys.argv[2:]
    short_timeouts()
    from runtime.cli import run

    if script == "sample_ddp.py":
        import sample_ddp as module
        for name in ("file_sha256", "pack_samples"):
            setattr(module, name, slowed(getattr(module, name)))
        main_fn = module.main
    elif script == "build_reference.py":
        import build_reference as module
        from stub_features import stub_factory

        module.write_reference = slowed(module.write_reference)
        module.atomic_write = slowed(module.atomic_write, lambda path, *a, **k: path.endswith("meta.json"))

        def main_fn(args):
            return module.main(args, extractor_factory=stub_factory)
    elif script == "extract_latents.py":
        import extract_latents as module
        module.write_meta = slowed(module.write_meta)
        main_fn = module.main
    elif script == "train.py":
        import train as module
        torch.save = slowed(torch.save, lambda obj, f, *a, **k: not isinstance(f, io.BytesIO))
        torch.load = slowed(torch.load, lambda f, *a, **k: str(f).endswith(".pt"))
        main_fn = module.main
    else:
        raise SystemExit(f"unknown script {script}")
    sys.argv = [script, *argv]
    run(main_fn, module.parse_args)


if __name__ == "__main__":
    main()
