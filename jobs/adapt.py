"""`ray job submit ... -- python jobs/adapt.py --domain NAME=URI ... --out REGISTRY`: few-shot
adaptation of many domains in parallel, same arguments as `clipsr adapt`. Exit status 0 when every
domain was adapted and published (promoted or not), 2 when some failed, 1 when the run could not
complete; the last line printed sums it up.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

from clipsr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["adapt", *sys.argv[1:]]))
