"""The `rpiae` command line: thin commands over the library API.

Exit codes: 0 success; 1 error (bad input, missing file, unavailable backend);
2 usage error; 3 a parity/accuracy check failed; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import click

from rpiae import __version__
from rpiae.cli.bench_cmd import bench
from rpiae.cli.doctor import doctor
from rpiae.cli.eval_cmd import eval_cmd
from rpiae.cli.export_cmd import export, info, samples, verify
from rpiae.cli.hub_cmd import push
from rpiae.cli.run import decode, encode, extract
from rpiae.cli.train import train
from rpiae.cli.triton_cmd import serve, triton


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rpiae")
def main() -> None:
    """Train, export and serve the RPiAE image tokenizer.

    Exit codes: 0 success, 1 error, 2 usage error, 3 a parity check failed, 130 interrupted (Ctrl-C).
    """


for command in (export, encode, decode, extract, eval_cmd, verify, info, samples, bench, triton, serve, push, doctor):
    main.add_command(command)
main.add_command(train)

if __name__ == "__main__":
    main()
