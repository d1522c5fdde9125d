"""`python -m seer_pipeline.train` = `seer-train`."""
from seer_pipeline.train.cli import main

raise SystemExit(main())
