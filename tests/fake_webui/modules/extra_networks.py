"""Test fake of A1111 v1.10.1 ``modules/extra_networks.py``, written from the documented behaviour (reference §4):

- two registries, ``extra_network_registry`` (name → network) and ``extra_network_aliases`` (alias → network);
  registering is a plain dict write (the last writer wins); ``initialize()`` empties both;
- ``<name:arg:arg…>`` tags (regex ``<(\\w+):([^>]+)>``) are removed from prompts wherever they are; each becomes an
  ``ExtraNetworkParams`` of its ``:``-separated args; a batch uses the first prompt's tags only;
- ``activate`` calls each mentioned network with its params, then every other registered network with ``[]``;
  exceptions are reported and swallowed; ``deactivate`` is called by processing only for non-empty data.
"""
import json
import logging
import os
import re
from collections import defaultdict

from modules import errors

extra_network_registry = {}
extra_network_aliases = {}


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


def register_default_extra_networks():
    from modules.extra_networks_hypernet import ExtraNetworkHypernet
    register_extra_network(ExtraNetworkHypernet())


class ExtraNetworkParams:
    """``items``: the tag's args; an item of the form ``key=value`` goes to ``named``, anything else to
    ``positional``."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else ()
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    """Base class: ``activate(p, params_list)`` replaces whatever the previous call set up (``[]`` = off);
    ``deactivate(p)`` is housekeeping at the end of a job."""

    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data):
    """{network object: [params, …]} for the tag names in ``extra_network_data``; the registry is tried before the
    aliases, unknown names are skipped."""
    found = {}
    for tag_name, params in extra_network_data.items():
        network = extra_network_registry.get(tag_name) or extra_network_aliases.get(tag_name)
        if network is None:
            logging.info("unknown extra network %r ignored", tag_name)
            continue
        found.setdefault(network, []).extend(params)
    return found


def activate(p, extra_network_data):
    mentioned = lookup_extra_networks(extra_network_data)
    calls = list(mentioned.items())
    calls += [(network, []) for network in extra_network_registry.values() if network not in mentioned]
    for network, params in calls:
        try:
            network.activate(p, params)
        except Exception as e:
            errors.display(e, f"activating extra network {network.name}")


def deactivate(p, extra_network_data):
    mentioned = lookup_extra_networks(extra_network_data)
    for network in list(mentioned) + [n for n in extra_network_registry.values() if n not in mentioned]:
        try:
            network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {network.name}")


tag_pattern = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    """(prompt without any tags, {tag name: [ExtraNetworkParams, …]})."""
    tags = defaultdict(list)
    for name, args in tag_pattern.findall(prompt):
        tags[name].append(ExtraNetworkParams(items=args.split(":")))
    return tag_pattern.sub("", prompt), tags


def parse_prompts(prompts):
    """Every prompt stripped of its tags, and the tags of the first prompt only."""
    parsed = [parse_prompt(prompt) for prompt in prompts]
    return [text for text, _ in parsed], (parsed[0][1] if parsed else defaultdict(list))


def get_user_metadata(filename, lister=None):
    """The ``<stem>.json`` sidecar of a network file as a dict ({} when there is none or it can't be read)."""
    if filename is None:
        return {}
    sidecar = os.path.splitext(filename)[0] + ".json"
    try:
        if (lister.exists(sidecar) if lister is not None else os.path.exists(sidecar)):
            with open(sidecar, encoding="utf8") as f:
                return json.load(f)
    except Exception as e:
        errors.display(e, f"reading user metadata from {sidecar}")
    return {}
