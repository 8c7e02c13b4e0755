"""Check a COCO image folder against VQA-X annotation files before a long run, and report what is missing.

    python scripts/prepare_vqax.py ../shared/data/vqax/val.json --image-dir /data/coco
    python scripts/prepare_vqax.py train.json val.json test.json --image-dir /data/coco --verify \
        --report runs/images.json

Annotation files are ILLUME's column JSON, NLX-GPT's or e-ViL's VQA-X JSON, or JSONL (the format is detected;
--format forces one). Images are looked up exactly as a run's loader looks them up (a flat COCO folder,
train2014/ and val2014/ sub-folders, or plain 2017 names). --verify also decodes every image found.

Exit code: 0 every image is there (and readable), 1 some are missing or unreadable, 2 an annotation file is
malformed (the message names the file, the row and the field) or the image folder does not exist.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from illume.data.prepare import FORMATS, check_annotations, exit_code, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("annotations", nargs="+", type=Path, help="annotation files (JSON or JSONL)")
    parser.add_argument("--image-dir", required=True, type=Path, help="COCO image folder (a run's data.image_dir)")
    parser.add_argument("--format", choices=FORMATS, help="loader format for every file (default: detected)")
    parser.add_argument("--split", choices=("train", "val", "test"),
                        help="COCO split hint for ILLUME's column JSON (default: from the file name)")
    parser.add_argument("--verify", action="store_true", help="also decode every image found (slow)")
    parser.add_argument("--show", type=int, default=10, metavar="N", help="missing files listed per annotation file")
    parser.add_argument("--report", type=Path, help="write a JSON report listing every missing/unreadable file")
    args = parser.parse_args(argv)

    if not args.image_dir.is_dir():
        # Most likely a typo; reporting every image missing would hide that. An empty folder is fine.
        print(f"error: image folder {args.image_dir} does not exist (create it to list what to fetch)",
              file=sys.stderr)
        return 2
    checks = [check_annotations(path, args.image_dir, args.format, split_name=args.split, verify=args.verify)
              for path in args.annotations]

    table = Table(title=f"Images in {escape(str(args.image_dir))}")
    for column in ("annotations", "format", "rows", "images", "found", "missing", "unreadable"):
        # fold, not ellipsis: the annotation path is the one column a reader must see whole.
        table.add_column(column, justify="left" if column in ("annotations", "format") else "right",
                         overflow="fold")
    for check in checks:
        if check.error:
            table.add_row(escape(check.annotations), check.format, "[red]malformed[/]", "", "", "", "")
            continue
        unreadable = str(len(check.unreadable)) if args.verify else "-"  # not looked for without --verify
        table.add_row(escape(check.annotations), check.format, str(check.rows), str(check.images),
                      str(check.found), str(len(check.missing)), unreadable)
    Console().print(table)

    for check in checks:
        if check.error:
            print(f"error: {check.error}", file=sys.stderr)
        if check.missing:
            shown = check.missing[: args.show]
            more = f" (first {len(shown)} of {len(check.missing)})" if len(shown) < len(check.missing) else ""
            print(f"missing for {check.annotations}{more}:")
            for issue in shown:
                rows = ", ".join(issue.rows[:3]) + (", ..." if len(issue.rows) > 3 else "")
                print(f"  {issue.file}  (rows {rows})")
        for issue in check.unreadable:
            print(f"unreadable for {check.annotations}: {issue.file}: {issue.error}")

    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report(checks, args.image_dir, args.verify), indent=2) + "\n")
        print(f"report written to {args.report}")
    code = exit_code(checks)
    print({0: "all images present" + (" and readable" if args.verify else ""),
           1: "some images are missing or unreadable", 2: "an annotation file is malformed"}[code])
    return code


if __name__ == "__main__":
    sys.exit(main())
