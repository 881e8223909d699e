"""Write the middle N slices of a CT volume, geometry kept (an evaluation subset that fits a CPU budget).

    python Training/middle_slices.py ../shared/data/volumes/chest_ricord000082_1p25mm.nii.gz 96 runs/eval/ricord_mid96.nii.gz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "Backend" / "src"))

from ctsliceinterp.io import read_volume, write_volume  # noqa: E402
from ctsliceinterp.core.volume import Volume  # noqa: E402


def main(argv=None) -> int:
    source, count, out = (argv or sys.argv[1:])[:3]
    volume = read_volume(source)
    g = volume.geometry
    count = min(int(count), g.shape[0])
    first = (g.shape[0] - count) // 2
    geometry = g.with_slices(float(g.slice_positions()[first]), count, g.slice_spacing)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_volume(Volume(np.asarray(volume.array[first : first + count]), geometry, dict(volume.metadata)), out, inputs=[source])
    print(f"{out}: slices {first}..{first + count - 1} of {g.shape[0]} ({count} x {g.slice_spacing:g} mm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
