"""`ray job submit ... -- python jobs/enhance.py ARGS`: the enhancement job, same arguments and exit
status as `clipsr enhance` (0 finished within --max-failed-fraction, 2 above it, 1 could not
complete). `ray job submit` itself exits 1 for any non-zero status: the summary line printed last
is what tells an operator which.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

from clipsr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["enhance", *sys.argv[1:]]))
