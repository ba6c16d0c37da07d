"""The coherence probe: intact snippets of held-out files against spliced ones, for every family."""

import json

from research.data import coherence


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_the_probe_holds_intact_and_spliced_snippets_of_validation_files_only(tmp_path):
  assert coherence.write(str(tmp_path), 40, 60, seed=0) == {
      'train.jsonl': 40, 'train.pairs.jsonl': 40, 'dev.jsonl': 20, 'dev.pairs.jsonl': 20}
  validation = coherence.validation_texts(5)  # The files pretraining holds out.
  train, dev = _rows(tmp_path / 'train.jsonl'), _rows(tmp_path / 'dev.jsonl')
  for rows in (train, dev):
    assert [row['label'] for row in rows] == [0, 1] * (len(rows) // 2)
    for row in rows:
      text = row['text']
      assert len(text) == 60
      whole = any(text in source for source in validation)
      if row['label'] == 1:
        assert whole
      else:  # Its outer thirds come from one file, its middle from another.
        assert not whole
        assert any(text[:20] in s and text[40:] in s for s in validation)
        assert any(text[20:40] in s for s in validation)
  assert not {row['text'] for row in train} & {row['text'] for row in dev}
  pairs = _rows(tmp_path / 'dev.pairs.jsonl')
  assert [(p['input'], p['target']) for p in pairs] == [
      (row['text'], coherence.LABELS[row['label']]) for row in dev]
