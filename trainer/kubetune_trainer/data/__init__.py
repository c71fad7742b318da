"""Task data: read, validate, clean, redact PII, split and fingerprint.

Every problem with the data raises `InvalidDataError` naming the file, the line (JSONL/CSV) or row
(Parquet), the field and what was expected; nothing is skipped silently. The prepared rows are
canonical, whatever the input field names were:

    chat            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    instruction     {"prompt": str, "completion": str}
    text            {"text": str}
    classification  {"text": str, "label": int}     (an index into PreparedData.labels)

Modules: `readers` (files and S3 objects to records), `validation` (records to canonical rows),
`cleaning`, `pii` (pure; the server uses it too), `prepare` (the pipeline), `rows` and `errors`.
"""

from kubetune_trainer.data.errors import InvalidDataError
from kubetune_trainer.data.pii import luhn_ok, redact_pii
from kubetune_trainer.data.prepare import fingerprint, prepare_data
from kubetune_trainer.data.readers import load_rows
from kubetune_trainer.data.rows import DataReport, PreparedData, Row

__all__ = [
    "DataReport",
    "InvalidDataError",
    "PreparedData",
    "Row",
    "fingerprint",
    "load_rows",
    "luhn_ok",
    "prepare_data",
    "redact_pii",
]
