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
