"""`python -m engine.core`: import every module of the seam and show that torch never came
in (the twin, the workloads and the reports stand on this alone)."""

import importlib
import pkgutil
import sys

import engine.core

names = sorted(m.name for m in pkgutil.walk_packages(engine.core.__path__, "engine.core.")
               if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
print(f"engine.core: {len(names)} modules imported: {', '.join(n[12:] for n in names)}")
print(f"torch imported: {'torch' in sys.modules}")
sys.exit(1 if "torch" in sys.modules else 0)
