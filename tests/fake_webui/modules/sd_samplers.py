"""Test fake of A1111 v1.10.1 ``modules/sd_samplers.py``: the sampler names, ``get_sampler_and_scheduler`` and
``fix_p_invalid_sampler_and_scheduler`` (which process_images calls first; it logs a warning for every picture
whose sampler or scheduler it has to correct). ``autocorrected`` keeps those warnings for the tests."""
import functools
import logging
from types import SimpleNamespace

_NAMES = [("DPM++ 2M", {"scheduler": "karras"}), ("DPM++ SDE", {"scheduler": "karras"}),
          ("DPM++ 2M SDE", {"scheduler": "exponential"}), ("DPM++ 2S a", {"scheduler": "karras"}), ("Euler a", {}),
          ("Euler", {}), ("LMS", {}), ("Heun", {}), ("DPM2", {"scheduler": "karras"}),
          ("DPM2 a", {"scheduler": "karras"}), ("DPM fast", {}), ("DPM adaptive", {}), ("DDIM", {}), ("PLMS", {}),
          ("UniPC", {}), ("LCM", {})]
all_samplers = [SimpleNamespace(name=n, options=o) for n, o in _NAMES]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
_SCHEDULERS = [("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
               ("exponential", "Exponential"), ("sgm_uniform", "SGM Uniform"), ("ddim", "DDIM")]
schedulers = [SimpleNamespace(name=n, label=label) for n, label in _SCHEDULERS]
schedulers_map = {**{x.name: x for x in schedulers}, **{x.label: x for x in schedulers}}
autocorrected: list[str] = []


@functools.cache
def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):
    default_sampler = samplers[0]
    found_scheduler = schedulers_map.get(scheduler_name, schedulers[0])
    name = sampler_name or default_sampler.name
    for scheduler in schedulers:
        for option in (scheduler.label, scheduler.name):
            if name.endswith(" " + option):
                found_scheduler = scheduler
                name = name[0:-(len(option) + 1)]
                break
    sampler = all_samplers_map.get(name, default_sampler)
    if convert_automatic and sampler.options.get("scheduler", None) == found_scheduler.name:
        found_scheduler = schedulers[0]
    return sampler.name, found_scheduler.label


def fix_p_invalid_sampler_and_scheduler(p):
    i_sampler_name, i_scheduler = p.sampler_name, p.scheduler
    p.sampler_name, p.scheduler = get_sampler_and_scheduler(p.sampler_name, p.scheduler, convert_automatic=False)
    if p.sampler_name != i_sampler_name or i_scheduler != p.scheduler:
        msg = (f'Sampler Scheduler autocorrection: "{i_sampler_name}" -> "{p.sampler_name}", "{i_scheduler}" -> '
               f'"{p.scheduler}"')
        autocorrected.append(msg)
        logging.warning(msg)
