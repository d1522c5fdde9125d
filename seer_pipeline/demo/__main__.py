"""`python -m seer_pipeline.demo`: the whole pipeline on CPU (see run.py)."""
from seer_pipeline.demo.run import main

raise SystemExit(main())
