"""`mediaseal completion bash|zsh|tcsh`: a shell completion script, generated from the parser itself.

shtab (pinned) writes a static script from the argparse tree, so completion never drifts from the
options, and pressing TAB runs no Python at all: argcomplete instead starts `mediaseal` on every TAB
(paying its start-up each time) and needs a hook in main() before parsing. shtab is imported only here.
"""

from __future__ import annotations

import argparse

from mediaseal.agent.cli._options import SubParsers, command

SHELLS = ("bash", "zsh", "tcsh")


def register(sub: SubParsers) -> None:
    sp = command(sub, "completion", cmd_completion, "print a shell completion script (bash, zsh or tcsh)",
                 "mediaseal completion bash | sudo tee /etc/bash_completion.d/mediaseal",
                 "mediaseal completion zsh > \"${fpath[1]}/_mediaseal\"",
                 "source <(mediaseal completion bash)     # this shell only")
    sp.add_argument("shell", choices=SHELLS, help="the shell to complete for")


def cmd_completion(args: argparse.Namespace) -> None:
    import shtab

    from mediaseal.agent.cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
