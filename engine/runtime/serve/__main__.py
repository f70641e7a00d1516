"""`python -m engine.runtime.serve [OVERRIDE ...]`: `python run.py mode=serve` under another
name, configured by the same Hydra overrides (one way to build an EngineConfig):

    python -m engine.runtime.serve model=tiny_qwen3 engine=cpu_tiny serve.port=8000
    python -m engine.runtime.serve model=qwen3_0_6b model.path=/models/Qwen3-0.6B \\
        serve.max_queue=1024

The server's records (what it served) land in the run folder on Ctrl-C.
"""

import sys

import run

sys.argv = [sys.argv[0], "mode=serve", *sys.argv[1:]]
run.main()
