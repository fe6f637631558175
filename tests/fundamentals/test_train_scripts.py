"""Every fundamentals train.py runs end to end on its `tiny` preset and reports its figure.

These check the plumbing (data, loop, summary.json, the PNG), not the accuracy: the figures
quoted in notes/fundamentals.md come from the default presets, which take seconds to minutes.
"""

import json

import pytest

from fundamentals.autograd import train as autograd_train
from fundamentals.cnn import train as cnn_train
from fundamentals.nn import train as nn_train
from fundamentals.rnn import train as rnn_train
from fundamentals.vae import train as vae_train

SCRIPTS = [
    (autograd_train, "test_accuracy"),
    (nn_train, "test_accuracy"),
    (cnn_train, "test_accuracy"),
    (vae_train, "test_elbo_nats_per_image"),
]


@pytest.mark.parametrize("script, figure", SCRIPTS, ids=[s[0].__name__.split(".")[1] for s in SCRIPTS])
def test_tiny_run_writes_its_figure(script, figure, tmp_path, capsys):
    result = script.main(["--preset", "tiny", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text())[figure] == result[figure]
    assert f'"{figure}"' in capsys.readouterr().out  # the one parsable "result {...}" line


def test_vae_writes_its_sample_grid(tmp_path):
    vae_train.main(["--preset", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_char_lstm_reports_validation_nats_per_char(corpus, tmp_path):
    result = rnn_train.main(["--preset", "tiny", "--dataset", str(corpus), "--out", str(tmp_path)])
    assert 0 < result["val_nats_per_char"] < 10  # finite: 20 tiny steps promise nothing better
    assert result["corpus"] == str(corpus)


def test_a_misspelt_option_or_bad_choice_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        nn_train.main(["--preset", "tiny", "--epoch", "3"])
    assert "unknown option --epoch; valid options are" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cnn_train.main(["--preset", "tiny", "--model", "vgg", "--out", str(tmp_path)])
    assert "--model 'vgg' is not one of 'resnet', 'small'" in capsys.readouterr().err
