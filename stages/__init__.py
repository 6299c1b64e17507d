"""The DVC stages, each run as `python -m stages.<name>`.

Importing this package pins the CPU numerical paths to AVX2 (pipelines.cpu_pins) before any stage imports
numpy, torch or cv2, so a stage computes the same bytes on any x86-64 CPU with AVX2 (REFFACE_CPU_PINS=0
turns the pins off). Under `python -m` this import comes first, and a library already loaded unpinned is
refused; imported elsewhere (a notebook, a Ray worker of another cluster) it warns instead. It also keeps
the memory a training step frees in the process (pipelines.malloc: the same bytes, fewer page faults).
"""

import sys as _sys

from pipelines.cpu_pins import pin_cpu_numerics as _pin
from pipelines.malloc import keep_freed_memory as _keep_freed_memory

# While `python -m stages.<name>` imports this package, sys.argv[0] is "-m".
_pin(strict=bool(_sys.argv) and _sys.argv[0] == "-m")
_keep_freed_memory()
