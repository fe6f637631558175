"""The check both Stable Diffusion command tests share: a bad input is one line on stderr, exit status 2."""

import pytest


def one_line_error(capsys, main, argv, *names):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
