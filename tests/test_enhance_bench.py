"""The plain-loop baseline of `clipsr bench enhance` (the Ray side is the job itself, tested end to end)."""
from __future__ import annotations

from clipsr import imaging
from clipsr.bench.enhance_loop import make_images, plain_loop


def test_plain_loop_runs_the_job_stages_on_every_image(tmp_path):
    make_images(str(tmp_path / "in"), count=3, size=12)
    again = tmp_path / "again"
    make_images(str(again), count=3, size=12)
    assert (tmp_path / "in" / "img_00002.png").read_bytes() == (again / "img_00002.png").read_bytes()
    figures = plain_loop(str(tmp_path / "in"), str(tmp_path / "out"), "bicubic", 2, threads=1)
    assert (figures["images"], figures["failed"]) == (3, 0)
    assert figures["images_per_s"] > 0 and figures["output_mp_per_s"] > 0 and figures["peak_memory_mb"] > 0
    decoded = imaging.decode((tmp_path / "out" / "img_00000.png").read_bytes())
    assert (decoded.height, decoded.width) == (24, 24)


def test_plan_bench_decides_every_synthetic_key_and_commits_the_index(tmp_path):
    from clipsr.bench import plan

    result = plan.run(2000, workdir=str(tmp_path))
    # one key in four was changed since the indexed run: those are planned, the rest skipped unread
    assert result["decided"] == {"to_process": 500, "skipped": 1500}
    assert result["index_rows"] == 2000 and result["index_bytes"] > 0
    assert result["manifest_bytes_per_skipped_row"] > 0 and result["manifest_bytes_per_ok_row"] > 0
    assert result["driver_peak_rss_mb"] >= result["driver_rss_before_mb"] > 0
