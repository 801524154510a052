"""A torchrun rank's entry point: ``python -m pipeline.worker <output_dir>``.

The parent composed and validated the job and handed its configuration over in the environment
(``pipeline.contract.CONFIG_ENV``: resolved values, secrets included, so it lives in process memory
only, never in a file of the run folder, whose ``resolved_config.yaml`` is redacted). A rank neither
re-composes the command line with Hydra nor checks the rules again: it types the stages from that
configuration (the same dataclasses, so a value means the same) and runs them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import launch, quiet
from pipeline.contract import CONFIG_ENV, is_worker
from pipeline.validate import build


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or CONFIG_ENV not in os.environ or not is_worker():
        sys.exit("pipeline.worker runs a rank of a torchrun job that optipipe started (launcher=torchrun); "
                 "start the job with optipipe instead")
    cfg = OmegaConf.create(json.loads(os.environ[CONFIG_ENV]))
    quiet.apply(OmegaConf.select(cfg, "pipeline.verbose", default=False) is True)  # before stages import packages
    launch.run_worker(build(cfg), Path(args[0]))  # ends the process


if __name__ == "__main__":
    main()
