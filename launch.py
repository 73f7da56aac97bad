"""Entry point: one Hydra job = one sweep point. All logic lives in ipsweep/.

python launch.py --cfg job
python launch.py -m experiment=demo
python launch.py -m experiment=demo --dry-run      # check and list every point; launch nothing (-m optional)
"""

import sys

import hydra

from ipsweep.config import register
from ipsweep.validate import unknown_override_keys

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> list[dict]:
    from ipsweep.job import run  # here, not at the top: --help, --cfg and shell completion need no torch

    try:
        return run(cfg)
    # Ctrl-C: the job has logged that its run is recorded as interrupted; no traceback
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    if "--dry-run" in sys.argv:  # shorthand for the sweeper's own option; a dry run never trains, -m or not
        if any(a.startswith("hydra/sweeper=") and a != "hydra/sweeper=ipsweep" for a in sys.argv):
            sys.exit(
                "Error: --dry-run is a feature of ipsweep's sweeper (the default); fix: drop the "
                "hydra/sweeper= override"
            )
        sys.argv = [a if a != "--dry-run" else "hydra.sweeper.dry_run=true" for a in sys.argv]
        if not {"-m", "--multirun"} & set(sys.argv):
            sys.argv.insert(1, "-m")
    if unknown := unknown_override_keys(sys.argv[1:]):  # before Hydra, whose message lists no valid keys
        sys.exit("Error: " + "\n".join(unknown))
    main()
