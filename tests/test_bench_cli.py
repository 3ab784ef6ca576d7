"""`moekit bench` argument errors: one line naming the bad value, no traceback."""

from __future__ import annotations

import pytest

from moekit.cli import main


def test_a_bad_shape_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--shapes", "1,2,3"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: a shape is 'T,d,h,E,k' (5 integers); got '1,2,3'" in err
