"""Training/preprocess.py: the same as `ctsliceinterp preprocess` (a dataset of cases -> cache).

    python Training/preprocess.py --dataset /data/cases --out /data/cache --workers 8
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Backend" / "src"))  # a checkout without pip install

from ctsliceinterp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
