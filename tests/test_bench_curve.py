"""The training-curve reader: what the pretraining log says, step by step."""
from clipsr.bench.curve import parse_log

LOG = """
(RayTrainWorker pid=1) step 100/300 loss 0.0626 lr 2.50e-04 33.6 patches/s eta 7.0 min
(RayTrainWorker pid=1) step 200/300 loss 0.0400 lr 4.00e-04 33.0 patches/s eta 3.0 min val/set5/psnr_y=29.706 val/set14/psnr_y=26.885
unrelated line
(RayTrainWorker pid=2) resumed from checkpoint at step 100
(RayTrainWorker pid=2) step 200/300 loss 0.0390 lr 4.00e-04 31.0 patches/s eta 3.0 min val/set5/psnr_y=29.800 val/set14/psnr_y=26.900
(RayTrainWorker pid=2) step 300/300 loss 0.0350 lr 1.00e-05 31.0 patches/s eta 0.0 min
"""


def test_log_is_parsed_with_the_latest_value_of_a_repeated_step():
    curve = parse_log(LOG)
    assert curve["steps"] == [100, 200, 300]
    assert curve["loss"] == [0.0626, 0.039, 0.035]
    assert curve["val"] == {"set5": [(200, 29.8)], "set14": [(200, 26.9)]}
