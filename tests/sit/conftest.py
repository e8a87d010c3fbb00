import sys
from pathlib import Path

# examples/sit holds flat DiT-style scripts that import their siblings by plain name.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "sit"))
