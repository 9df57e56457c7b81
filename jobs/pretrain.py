"""`ray job submit ... -- python jobs/pretrain.py --config FILE [--set KEY=VALUE ...]`: source
pretraining on Ray Train, same arguments as `clipsr pretrain`. Rerunning with the same run name
resumes from its last checkpoint. Exit status 0 when the model was exported, 1 otherwise.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install`

from clipsr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
