"""One gpu_pool job: ``python -m hydra_plugins.gpu_pool_launcher.job FILE [key=value ...]``.

FILE holds what the launcher composed; Hydra's ``run_job`` runs it without composing again.
The overrides are set on that config: Lightning's DDP starts its other processes so."""

import pickle
import sys
from typing import List

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import run_job, setup_globals
from hydra.types import HydraContext
from omegaconf import OmegaConf, open_dict, read_write


def main(argv: List[str]) -> None:
    with open(argv[0], "rb") as f:
        job = pickle.load(f)  # written by cloudpickle, whose output plain pickle reads
    Singleton.set_state(job["singletons"])
    setup_globals()
    config = job["config"]
    with read_write(config), read_write(config.hydra), open_dict(config):
        for override in OverridesParser.create().parse_overrides(argv[1:]):
            OmegaConf.update(config, override.key_or_group, override.value(), merge=True)
    context = HydraContext(config_loader=GlobalHydra.instance().config_loader(),
                           callbacks=job["callbacks"])
    ret = run_job(hydra_context=context, task_function=job["task_function"], config=config,
                  job_dir_key="hydra.run.dir", job_subdir_key=None)
    _ = ret.return_value  # raises the task's error, as Hydra's own single run does


if __name__ == "__main__":
    main(sys.argv[1:])
