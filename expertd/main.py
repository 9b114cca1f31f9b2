"""The ``expertd`` command: parse the command line, load config and experts, run the master.

Exit status: 0 after a clean stop; 2 for a bad command line or config; 3 when
an expert fails to import or a hook fails (before fork, or in the first
workers); 1 when the socket cannot be set up or the master fails otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys

from expertd import __version__
from expertd.config import SETTINGS, load_config
from expertd.errors import ConfigError, ExpertLoadError
from expertd.listener import ListenerError

DEFAULT_CONFIG = "/etc/expertd.conf"
EXIT_CONFIG = 2
EXIT_EXPERT = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertd",
        description="Serve Python experts from a prefork worker daemon over a Unix socket.",
        epilog="Every setting is described in docs/config.md. Signals: TERM/INT stop gracefully, QUIT stops at once.",
    )
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"configuration file (default: {DEFAULT_CONFIG})")
    for setting in SETTINGS:
        if setting.cli:
            parser.add_argument(setting.flag, dest=setting.name, metavar=setting.name.upper(),
                                help=f"{setting.help} Overrides [expertd] {setting.name} ({setting.type.name}).")
    parser.add_argument("--check", action="store_true",
                        help="load the config and import the experts, then exit 0 if all is well")
    parser.add_argument("--version", action="version", version=f"expertd {__version__}")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {s.name: getattr(args, s.name) for s in SETTINGS if s.cli}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"expertd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.log_level)

    # Imported here so that --help and config errors stay fast.
    from expertd.loader import load_experts
    from expertd.runtimes import quiet_native_logs

    try:
        with quiet_native_logs(config.tf_log_level in ("warning", "error")):
            experts = load_experts(config)
    except ExpertLoadError as exc:
        print(f"expertd: {exc}", file=sys.stderr)
        return EXIT_EXPERT
    if args.check:
        print(f"expertd: {config.path}: OK, {len(experts)} experts: {', '.join(sorted(experts))}")
        return 0

    from expertd.master import Master

    try:
        return Master(config, experts).run()
    except ListenerError as exc:
        print(f"expertd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
