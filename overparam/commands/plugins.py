"""``overparam plugins``: list every installed plugin and the classes it provides."""

from __future__ import annotations

import argparse

from overparam.registry import format_plugins, load_plugins


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="overparam plugins", description=__doc__)
    parser.parse_args(argv)
    plugins = load_plugins()
    print(format_plugins(plugins))
    return 1 if any(p.error for p in plugins.values()) else 0
