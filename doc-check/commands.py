#!/usr/bin/env python3
"""Writes docs/reference/commands.md from the binaries' own --help.

    cargo build -p fedpref-coordinator -p fedpref-client-sdk -p fedpref-simulations
    python3 doc-check/commands.py target/debug > docs/reference/commands.md

Every subcommand is visited (the "Commands:" list of each help text), depth first, in the
order the binary lists them; the help text is copied verbatim.
"""

import subprocess
import sys
from pathlib import Path

BINARIES = [
    ("fedpref-coordinator", "the coordinator: accountant, runs, ledger, report, admin client, init, serve"),
    ("fedpref-device", "the reference device program over the client SDK"),
    ("fedpref-sim", "the simulator"),
]


def help_text(binary: Path, path: list[str]) -> str:
    out = subprocess.run([str(binary), *path, "--help"], capture_output=True, text=True)
    if out.returncode != 0:
        # Say so on the page rather than leave the command out.
        why = next((l for l in out.stderr.splitlines() if l.strip() and "panicked" not in l), "")
        return f"`--help` failed (exit {out.returncode}): {why.strip()}\n"
    return out.stdout.rstrip() + "\n"


def subcommands(text: str) -> list[str]:
    names, inside = [], False
    for line in text.splitlines():
        if line.strip() == "Commands:":
            inside = True
            continue
        if inside:
            if not line.startswith("  "):
                break
            name = line.split()[0]
            if name != "help":
                names.append(name)
    return names


def visit(binary: Path, name: str, path: list[str], out: list[str]) -> None:
    text = help_text(binary, path)
    level = "#" * min(2 + len(path), 6)
    out.append(f"{level} {' '.join([name, *path])}\n\n```text\n{text}```\n")
    for sub in subcommands(text):
        visit(binary, name, [*path, sub], out)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: commands.py TARGET_DIR  (e.g. target/debug)")
    target = Path(sys.argv[1])
    out = [
        "# Commands and flags\n\n"
        "Every command and flag of the three binaries, as their `--help` prints it. This page is\n"
        "generated; do not edit it by hand. After changing a command line, regenerate it:\n\n"
        "```sh\n"
        "cargo build -p fedpref-coordinator -p fedpref-client-sdk -p fedpref-simulations\n"
        "python3 doc-check/commands.py target/debug > docs/reference/commands.md\n"
        "```\n\n"
        + "".join(f"- [`{n}`](#{n}): {what}\n" for n, what in BINARIES)
        + "\nGuides that explain when to use them: [operators](../operators.md) (`fedpref-coordinator`),\n"
        "[app developers](../app-developers.md) (`fedpref-device`), [ML engineers](../ml-engineers.md)\n"
        "(`fedpref-sim`), [compliance and privacy teams](../compliance.md) (`accountant`, `ledger`, `report`).\n"
    ]
    for name, _ in BINARIES:
        visit(target / name, name, [], out)
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
