"""Write completions/{dsv4.bash,_dsv4,dsv4.fish} from the app's command tree.

Run it after adding or changing a command or an option:  python completions/generate.py
With --check it writes nothing and exits 1 when a committed script is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from dsv4cli import completion  # noqa: E402


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for shell in completion.SHELLS:
        path = HERE / completion.FILE_NAMES[shell]
        text = completion.script(shell)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path.name)
        if not check:
            path.write_text(text, encoding="utf-8")
    if check and stale:
        print(f"out of date: {', '.join(stale)} (run: python completions/generate.py)", file=sys.stderr)
        return 1
    if stale:
        print(f"wrote {', '.join(stale)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
