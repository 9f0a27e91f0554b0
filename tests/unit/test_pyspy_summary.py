"""The py-spy profile summary: samples split by thread group and attributed to the leaf frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import pyspy_summary

PROFILE = """\
_run_module_as_main (<frozen runpy>:198);Runner.run (asyncio/runners.py:118) 6
AdscoreApp._score (service/fast_path.py:96);ScoringPipeline.score (service/scoring.py:234) 3
AdscoreApp._score (service/fast_path.py:96) 1
Thread._bootstrap (threading.py:1002);Session.run (onnxruntime/session.py:406) 7
Thread._bootstrap (threading.py:1002);_fill (feature_client/assembly.py:53) 3

"""


def test_samples_are_split_by_thread_group_and_attributed_to_the_running_frame() -> None:
    summary = pyspy_summary.summarise(PROFILE.splitlines(keepends=True))
    main, threads = summary["main"], summary["threads"]
    assert (main.total, threads.total) == (10, 10)
    # The loop's own C code shows as the frame that entered it; a coroutine's leaf is its own.
    assert main.by_file == {"event loop (native)": 6, "service/scoring.py": 3,
                            "service/fast_path.py": 1}  # fmt: skip
    assert threads.by_file["onnxruntime/session.py"] == 7
    assert threads.by_frame["_fill (feature_client/assembly.py:53)"] == 3


def test_the_rendered_summary_gives_each_groups_shares() -> None:
    text = pyspy_summary.render(pyspy_summary.summarise(PROFILE.splitlines()), top=2)
    lines = text.splitlines()
    assert lines[:4] == [
        "main thread (event loop): 10 samples",
        "  by file:",
        "   60.0 %  event loop (native)",
        "   30.0 %  service/scoring.py",  # top=2: fast_path.py's 10 % is left out
    ]
    assert "   70.0 %  onnxruntime/session.py" in lines


def test_a_line_that_is_not_a_stack_and_count_is_refused_with_its_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "profile.txt"
    profile.write_text("a (x.py:1) 2\nnot a profile line\n")
    with pytest.raises(SystemExit) as exit_info:
        pyspy_summary.main([str(profile)])
    assert exit_info.value.code == 2
    assert "line 2: expected 'frame;frame;... COUNT'" in capsys.readouterr().err


def test_a_top_below_one_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "profile.txt"
    profile.write_text(PROFILE)
    with pytest.raises(SystemExit):
        pyspy_summary.main([str(profile), "--top", "0"])
    assert "--top must be at least 1, got 0" in capsys.readouterr().err


def test_the_command_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "profile.txt"
    profile.write_text(PROFILE)
    assert pyspy_summary.main([str(profile), "--top", "3"]) == 0
    assert "threads (inference, drift): 10 samples" in capsys.readouterr().out
