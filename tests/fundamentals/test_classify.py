"""Specification of fundamentals.rnn.classify: sequence classification with the written-out LSTM.

The data side: speaker turns are parsed as "NAME:" + lines up to a blank line, split by turn
(stratified, deterministic, no turn on both sides); labelled text sets are read through
`datasets` from local parquet / JSON files in IMDB's layout (the hub download is not run). The
model side: padding a text in a batch does not change its logits, and the classifier on cells.py's
LSTM equals the one on nn.LSTM holding the same weights, to 1e-10 in float64 (the same formulas,
summed in another order). End to end, both tasks run on tiny settings and report test accuracy
beside the majority baseline.
"""

import dataclasses
import json

import pyarrow as pa  # installed with datasets, a dependency of the zoo
import pyarrow.parquet as pq
import pytest
import torch

from fundamentals.rnn.classify import (PRESETS, SequenceClassifier, load_labelled_texts, main, pad, speaker_turns,
                                       split_turns)

# A play in Tiny Shakespeare's format: 12 turns of ALPHA, 8 of BETA, 4 of GAMMA, 1 of DELTA, one header
# whose speech was cut (dropped), and a triple newline (as the corpus has twice).
LINES = {"ALPHA": "To be or not to be,\nthat is the question.", "BETA": "My lord, the horses wait.",
         "GAMMA": "Peace! Here comes the king.", "DELTA": "Exeunt."}
ORDER = ["ALPHA", "BETA", "ALPHA", "GAMMA", "ALPHA", "BETA"] * 4 + ["DELTA"]
PLAY = "\n\n".join(f"{name}:\n{LINES[name]} ({i})" for i, name in enumerate(ORDER)) + "\n\nBETA:\n\n\nALPHA:\nAdieu.\n"


def test_a_turn_is_a_name_colon_line_then_its_lines_up_to_a_blank_line():
    turns = speaker_turns(PLAY)
    assert len(turns) == len(ORDER) + 1  # the empty BETA turn is dropped
    assert turns[0] == ("ALPHA", "To be or not to be,\nthat is the question. (0)")
    assert [name for name, _ in turns] == ORDER + ["ALPHA"]
    assert turns[-1] == ("ALPHA", "Adieu.")  # no turn keeps the newline that ends the file


def test_the_split_is_by_turn_stratified_deterministic_and_shares_no_turn():
    turns = speaker_turns(PLAY)
    train, test, speakers = split_turns(turns, k=3, test_fraction=0.25, seed=0)
    assert speakers == ["ALPHA", "BETA", "GAMMA"]  # the 3 most frequent; DELTA's one turn is left out
    train_ids, test_ids = {i for i, _, _ in train}, {i for i, _, _ in test}
    assert not train_ids & test_ids and len(train_ids | test_ids) == 13 + 8 + 4
    assert [sum(y == c for _, _, y in test) for c in range(3)] == [3, 2, 1]  # round(0.25 n) of each speaker
    assert all(turns[i] == (speakers[y], s) for i, s, y in train + test)
    assert split_turns(turns, 3, 0.25, seed=0) == (train, test, speakers)
    assert split_turns(turns, 3, 0.25, seed=1)[1] != test
    with pytest.raises(ValueError, match="speaker 'DELTA' has 1 turns"):
        split_turns(turns, k=4, test_fraction=0.25, seed=0)
    with pytest.raises(ValueError, match="the corpus has 4 speakers, fewer than --speakers 5"):
        split_turns(turns, k=5, test_fraction=0.25, seed=0)


def model(pool, cell="ours"):
    torch.manual_seed(0)
    return SequenceClassifier(20, 3, dataclasses.replace(PRESETS["tiny"], pool=pool, cell=cell)).double()


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_padding_does_not_change_a_texts_logits(pool):
    """The batch pads the short text with 6 PAD ids; its logits must equal those of the text alone."""
    clf = model(pool)
    short, long = [3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    ids, lengths = pad([short, long])
    assert ids.shape == (2, 10) and lengths.tolist() == [4, 10]
    batched = clf(ids, lengths)
    alone = clf(*pad([short]))
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched[1], clf(*pad([long]))[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_the_written_out_lstm_classifies_as_nn_lstm_with_the_same_weights(pool):
    ours, ref = model(pool, "ours"), model(pool, "torch")
    ref.load_state_dict(ours.state_dict())  # cells.LSTM keeps nn.LSTM's parameter names
    ids, lengths = pad([[2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]])
    torch.testing.assert_close(ours(ids, lengths), ref(ids, lengths), rtol=1e-10, atol=1e-10)


def test_speaker_task_reports_test_accuracy_beside_the_majority_baseline(tmp_path, capsys):
    (tmp_path / "play.txt").write_text(PLAY)
    result = main(["--preset", "tiny", "--data", str(tmp_path / "play.txt"), "--speakers", "3",
                   "--test-fraction", "0.25", "--out", str(tmp_path / "out")])
    assert result["classes"] == ["ALPHA", "BETA", "GAMMA"]
    assert (result["train_texts"], result["test_texts"]) == (19, 6)
    assert result["majority_baseline"] == 0.5  # ALPHA, the most frequent in training, has 3 of the 6 test turns
    assert 0 <= result["test_accuracy"] <= 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["test_accuracy"] == result["test_accuracy"]
    assert '"majority_baseline"' in capsys.readouterr().out  # the one parsable "result {...}" line


def imdb_rows(n):
    """n reviews sorted by label, as the hub's IMDB splits are."""
    return [{"text": f"{'great' if i >= n // 2 else 'awful'} film number {i}", "label": int(i >= n // 2)}
            for i in range(n)]


def test_imdb_task_reads_a_local_folder_in_the_hubs_parquet_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "imdb" / "plain_text"
    folder.mkdir(parents=True)
    for split, n in (("train", 16), ("test", 8)):
        pq.write_table(pa.Table.from_pylist(imdb_rows(n)), folder / f"{split}-00000-of-00001.parquet")
    result = main(["--preset", "tiny", "--task", "imdb", "--data", str(tmp_path / "imdb"), "--out", str(tmp_path / "o")])
    assert (result["train_texts"], result["test_texts"], result["majority_baseline"]) == (16, 8, 0.5)
    assert result["classes"] == ["0", "1"]  # a plain parquet file has no ClassLabel names; the hub's says neg, pos


def test_limit_draws_random_rows_not_the_first_ones_of_a_label_sorted_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in imdb_rows(20)))
    texts, labels, names = load_labelled_texts(str(path), "train", cache=str(tmp_path / "cache"))
    assert (texts[3], labels[3], labels[-1], names) == ("awful film number 3", 0, 1, None)
    _, some, _ = load_labelled_texts(str(path), "train", limit=6, seed=0, cache=str(tmp_path / "cache"))
    assert len(some) == 6 and set(some) == {0, 1}  # the first 6 rows would all be negative


def test_a_file_without_text_and_label_columns_names_the_columns_it_has(tmp_path):
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps([{"review": "fine", "stars": 4}]))
    with pytest.raises(ValueError, match=r"has columns \['review', 'stars'\]; a labelled text set needs a 'text' column"):
        load_labelled_texts(str(path), cache=str(tmp_path / "cache"))


def test_a_bad_choice_is_one_error_line(tmp_path, command_error):
    (tmp_path / "play.txt").write_text(PLAY)
    tiny = ["--preset", "tiny", "--data", str(tmp_path / "play.txt"), "--speakers", "3", "--out", str(tmp_path)]
    assert "--pool 'max' is not one of 'last', 'mean'" in command_error(main, tiny + ["--pool", "max"])
    assert "--task 'mnist' is not one of 'speaker', 'imdb'" in command_error(main, tiny + ["--task", "mnist"])
    assert "--task imdb needs a hub name or a folder" in command_error(main, tiny + ["--task", "imdb"])
