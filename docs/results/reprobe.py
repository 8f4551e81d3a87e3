"""Re-measure an experiment's probe with the current instrument, on the same checkpoints.

    PYTHONPATH=. python docs/results/reprobe.py artifacts/experiment

The first CoinRun run measured its probe before the probe reported information in bits and
tested the floor-to-ceiling gap against noise. This reruns ``probe_references`` on the finished
stage-1 checkpoint, the untrained IDM of the same seed and the finished ceiling (nothing is
trained again but the probes), keeps the old probe.json as probe-v1.json, and puts the new one
into the experiment's pretrain step so ``jobs/experiment.py --report-only true`` reports it.
"""

import json
import os
import sys

from lapo_ray import storage
from lapo_ray.config import PretrainConfig, config_from_dict


def main(exp: str) -> None:
    from lapo_ray.pipelines.pretrain import run_pretrain
    from lapo_ray.runtime import init_ray

    pre = os.path.join(exp, "pretrain")
    old = os.path.join(pre, "probe.json")
    if os.path.exists(old) and not os.path.exists(os.path.join(pre, "probe-v1.json")):
        os.rename(old, os.path.join(pre, "probe-v1.json"))
    config_json = os.path.join(pre, "config.json")
    original = open(config_json, "rb").read()
    cfg = config_from_dict(PretrainConfig, json.loads(original))
    cfg.stages = "stage1"  # finished: only the probe runs
    cfg.allow_config_change = True
    init_ray()
    try:
        summary = run_pretrain(cfg)
    finally:
        storage.write_bytes(config_json, original)  # the run's own config stays the record
    from lapo_ray.pipelines.experiment import versions

    probe = {**summary["probe"], "remeasured_at_commit": versions()["lapo_ray_commit"]}
    storage.write_json(old, probe)
    step = os.path.join(exp, "steps", "pretrain.json")
    done = json.load(open(step))
    done["probe"] = probe
    storage.write_json(step, done)
    print(json.dumps({k: v for k, v in probe.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
