"""`python -m sim`: run.py's twin in the terminal (`run.sim_main`), configured by the same
Hydra overrides, e.g. `python -m sim capacity model=mistral_7b_v0_3 hardware=l4_24gb
engine.gpu_memory_utilization=0.7`."""

import sys

from run import sim_main

sys.exit(sim_main())
