"""Entry point: one Hydra job = one sweep point. All logic lives in ipsweep/.

    python launch.py --cfg job
    python launch.py -m experiment=demo
"""

import hydra

from ipsweep.config import register
from ipsweep.job import run

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> list[dict]:
    return run(cfg)


if __name__ == "__main__":
    main()
