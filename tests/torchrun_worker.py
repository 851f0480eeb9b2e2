"""A worker for unpaired.torchrun's launcher tests (tests/test_torchrun.py): it writes
`started-<RANK>` into its working folder, then rank 0 records an error the way
unpaired.distributed.session does (torchrun's error file) and exits with status 2, while the other
ranks sleep with Python's default signal handling (SIGTERM ends them without a record, as it ends a
rank still importing torch)."""

import os
import sys
import time
from pathlib import Path

from unpaired.torchrun import record_failure

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    Path(f"started-{rank}").write_text("")
    if rank == 0:
        time.sleep(1.0)  # the other ranks are up (and sleeping) by then
        record_failure("error: params.yaml: train.lr: rank 0's own error", 2)
        sys.exit(2)
    time.sleep(120)
