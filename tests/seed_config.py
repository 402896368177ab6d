"""The tutorial config users will paste (shared/reference/seed-config.md), shared by the tests."""

import os

SEED_TOML = open(os.path.join(os.path.dirname(__file__), "data", "seed_config.toml"), encoding="utf-8").read()
