"""Running the CLI in-process from tests, and reading its one-line errors."""

from __future__ import annotations

from erasekit.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("erasekit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
