"""`moekit bench` argument errors: one line naming the bad value, no traceback."""

from __future__ import annotations

import pytest

from moekit.cli import main


@pytest.mark.parametrize("shape", ["1,2,3", "a,b,c,d,e", "64,32,32,0,2"])
def test_a_bad_shape_is_one_clear_error(capsys, shape):
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--shapes", shape])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: moekit bench")
    assert f"error: a shape is 'T,d,h,E,k' (5 positive integers); got '{shape}'" in err


def test_bench_comm_is_a_listed_sub_command(capsys):
    assert main(["bench", "comm", "--model", "tiny", "--ep", "1", "2", "--tokens", "1024"]) == 0
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.strip().splitlines()[-2:]] == ["1", "2"]
    assert captured.err == ""
    assert main(["--help"]) == 0
    assert "  bench comm   " in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--help"])
    assert stopped.value.code == 0
    assert "moekit bench comm" in capsys.readouterr().out


def test_bench_dash_dash_comm_still_runs_and_says_it_is_deprecated(capsys):
    assert main(["bench", "--comm", "--model", "tiny", "--ep", "1", "--tokens", "1024"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "moekit bench --comm is deprecated; use `moekit bench comm`\n"
    assert captured.out.strip().splitlines()[-1].split()[0] == "1"


def test_a_bad_bench_comm_model_is_one_error_line(capsys):
    assert main(["bench", "comm", "--model", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("moekit bench comm: error: ")
