"""Tables of rows (dicts) as CSV text: evaluation.csv, sweep.csv, `--runs --csv`."""

import csv
import io


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """CSV with a header; the columns are every key of the rows, in first-seen order."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()
