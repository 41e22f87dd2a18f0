"""edgellm package [--package-config mlc-package-config.json] [-o dist]"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--package-config", default="mlc-package-config.json",
                   help="the package config (default: ./mlc-package-config.json)")
    p.add_argument("-o", "--output", default="dist", help="output directory (default: dist)")


def run(args: argparse.Namespace) -> int:
    from edgellm.compile.packager import package

    package(args.package_config, args.output)
    return 0
