"""Entry point: one Hydra job = one sweep point. All logic lives in ipsweep/.

    python launch.py --cfg job
    python launch.py -m experiment=demo
    python launch.py -m experiment=demo --dry-run      # check and list every point; launch nothing
"""

import sys

import hydra

from ipsweep.config import register
from ipsweep.job import run
from ipsweep.validate import unknown_override_keys

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> list[dict]:
    try:
        return run(cfg)
    except KeyboardInterrupt:  # Ctrl-C: the job has logged that its run is recorded as interrupted; no traceback
        sys.exit(130)


if __name__ == "__main__":
    if "--dry-run" in sys.argv:  # shorthand for the sweeper's own option
        sys.argv = [a if a != "--dry-run" else "hydra.sweeper.dry_run=true" for a in sys.argv]
    if unknown := unknown_override_keys(sys.argv[1:]):  # before Hydra, whose message lists no valid keys
        sys.exit("Error: " + "\n".join(unknown))
    main()
