"""Print the vLLM -> SGLang flag table (ichat/engines/args.py) as markdown, for README.md.

python scripts/print_arg_table.py            # print it
python scripts/print_arg_table.py --write    # replace the table in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ichat.engines.args import markdown_table

DOC = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- arg-table:begin -->", "<!-- arg-table:end -->"


def main() -> int:
    table = markdown_table()
    if "--write" not in sys.argv[1:]:
        print(table)
        return 0
    text = DOC.read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")
    print(f"wrote the table into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
